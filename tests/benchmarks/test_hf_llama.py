"""benchmarks/inference/hf_llama.py measures the meta step that train.py takes, not another one."""
from pathlib import Path

import yaml

from benchmarks.core.models import HF_CONFIGS
from benchmarks.inference import hf_llama

ROOT = Path(__file__).resolve().parents[2]


def test_meta_step_settings_are_the_trainers():
    conf = yaml.safe_load((ROOT / "conf" / "config.yaml").read_text())
    assert hf_llama.meta_ttt().remat_inner == conf["ttt"]["remat_inner"]
    assert hf_llama.meta_ttt(True).remat_inner is True
    assert hf_llama.LLAMA_32_1B is HF_CONFIGS["llama-3.2-1b"]
