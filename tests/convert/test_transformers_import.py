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


def test_without_the_hugging_face_package_transformers_imports_and_sees_none():
    pytest.importorskip("transformers")
    out = run_at_root(WITHOUT_HF_KERNELS + "from transformers import LlamaForCausalLM, Qwen3ForCausalLM\n"
                      "from transformers.utils.import_utils import is_kernels_available\n"
                      "import kernels, ttt_e2e.kernels.swa\n"
                      "assert not is_kernels_available() and kernels.__file__ is None\n"
                      "m = LlamaForCausalLM(__import__('transformers').LlamaConfig(num_hidden_layers=1, hidden_size=8,"
                      " intermediate_size=8, num_attention_heads=2, vocab_size=16))\n")
    assert out.returncode == 0, out.stderr[-2000:]
