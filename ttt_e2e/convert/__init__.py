"""The weight formats, in one place that imports the model (never the reverse): ours (`steps.py`: the step dir,
its format version and migration, the one writer), save_pretrained (`pretrained_dir.py`), the authors' JAX
(`layout.py`, `orbax_io.py`, `reference.py`: from-jax / to-jax), Hugging Face Llama and Qwen3 (`hf.py`: from-hf),
and the one loader of them all (`load.py`: load). See __main__.py for the command line."""
from .hf import from_hf
from .layout import ConvertError
from .load import Loaded, load
from .reference import from_jax, to_jax
from .steps import CheckpointError

__all__ = ["CheckpointError", "ConvertError", "Loaded", "from_hf", "from_jax", "load", "to_jax"]
