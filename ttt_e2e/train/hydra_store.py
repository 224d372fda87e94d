"""The structured schema behind conf/: `Config` registered in Hydra's ConfigStore as `config_schema`.

conf/config.yaml lists it first in its defaults, so every YAML value is merged onto the typed dataclass: a
misspelled key or a wrongly typed value is rejected at composition, and train.py receives a `Config`.
"""
from __future__ import annotations

from hydra.core.config_store import ConfigStore

from ttt_e2e.config import Config
from ttt_e2e.convert.load import register_resolvers


def register_configs() -> None:
    ConfigStore.instance().store(name="config_schema", node=Config)
    register_resolvers()  # ${checkpoint:PATH,KEY}: a setting saved with a checkpoint (conf/experiment/hf/)
