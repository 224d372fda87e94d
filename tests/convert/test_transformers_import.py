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


def test_without_the_hugging_face_package_kernels_is_a_missing_module():
    out = run_at_root("import sys; sys.path = [p for p in sys.path if 'site-packages' not in p]; "
                      "import kernels")
    assert out.returncode == 1 and "ModuleNotFoundError: No module named 'kernels'" in out.stderr, out.stderr[-2000:]
