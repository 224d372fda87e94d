"""benchmarks/inference/hf_llama.py measures the meta step that train.py takes, not another one."""
from pathlib import Path

import yaml

from benchmarks.inference import hf_llama

ROOT = Path(__file__).resolve().parents[2]


def test_meta_step_settings_are_the_trainers():
    conf = yaml.safe_load((ROOT / "conf" / "config.yaml").read_text())
    assert hf_llama.meta_ttt().remat_inner == conf["ttt"]["remat_inner"]
