"""transformers imports Hugging Face's `kernels` package; from the repository root our `kernels/` folder is a module
of that name too. kernels/__init__.py hands the name to the installed package (or fails as a missing module)."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_at_root(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # a fresh interpreter imports torch and transformers
def test_transformers_imports_from_the_repository_root():
    pytest.importorskip("transformers")
    out = run_at_root("import sys; assert sys.path[0] == ''; "
                      "from transformers import LlamaForCausalLM, Qwen3ForCausalLM; "
                      "import kernels, ttt_e2e.kernels.swa as swa; "
                      "print(kernels.__file__); print(swa.__file__)")
    assert out.returncode == 0, out.stderr[-2000:]
    hf, ours = out.stdout.split()
    assert not hf.startswith(ROOT + os.sep)  # the Hugging Face package, not our folder
    assert ours.startswith(os.path.join(ROOT, "kernels"))


# Hugging Face's kernels package absent (as on a machine where transformers came without it): its finder and its
# metadata hidden, as if it were not installed
WITHOUT_HF_KERNELS = """
import importlib.machinery, importlib.metadata
find, version = importlib.machinery.PathFinder.find_spec, importlib.metadata.version
def hidden_find(cls, name, path=None, target=None):
    return None if name == "kernels" and path is not None else find(name, path, target)
def hidden_version(name):
    if name == "kernels":
        raise importlib.metadata.PackageNotFoundError(name)
    return version(name)
importlib.machinery.PathFinder.find_spec = classmethod(hidden_find)
importlib.metadata.version = hidden_version
"""


@pytest.mark.slow
def test_without_the_hugging_face_package_transformers_imports_and_sees_none():
    pytest.importorskip("transformers")
    out = run_at_root(WITHOUT_HF_KERNELS + "from transformers import LlamaForCausalLM, Qwen3ForCausalLM\n"
                      "from transformers.utils.import_utils import is_kernels_available\n"
                      "import kernels, ttt_e2e.kernels.swa\n"
                      "assert not is_kernels_available() and kernels.__file__ is None\n"
                      "m = LlamaForCausalLM(__import__('transformers').LlamaConfig(num_hidden_layers=1, hidden_size=8,"
                      " intermediate_size=8, num_attention_heads=2, vocab_size=16))\n")
    assert out.returncode == 0, out.stderr[-2000:]


@pytest.mark.slow
def test_the_converter_runs_from_the_repository_root(tmp_path):
    """python -m ttt_e2e.convert from-hf, as a user runs it (the Hugging Face kernels package hidden: either way)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama")
    code = (WITHOUT_HF_KERNELS + "import runpy, sys\n"
            f"sys.argv = ['ttt_e2e.convert', 'from-hf', {str(tmp_path / 'llama')!r}, {str(tmp_path / 'ours')!r}, "
            "'--window', '8']\n"
            "runpy.run_module('ttt_e2e.convert', run_name='__main__')\n")
    out = run_at_root(code)
    assert out.returncode == 0 and (tmp_path / "ours" / "model.pt").is_file(), out.stderr[-2000:]
