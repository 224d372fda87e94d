"""`save_pretrained` / `from_pretrained` / `push_to_hub` for the Transformer, in the Hugging Face layout:
config.json (our Config: model, ttt, ...) and the weights as safetensors, one `model.safetensors` or, for large
models, shards with a `model.safetensors.index.json`. huggingface_hub does the work: PyTorchModelHubMixin (config,
model card, Hub upload) and save_torch_state_dict (sharding); loading is `ttt_e2e.load_pretrained`."""
from __future__ import annotations

from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Optional

from huggingface_hub import PyTorchModelHubMixin

from ttt_e2e.config import TTTConfig


class HubMixin(PyTorchModelHubMixin, library_name="ttt-e2e", tags=["ttt-e2e", "test-time-training"],
               repo_url="https://github.com/test-time-training/e2e",
               paper_url="https://test-time-training.github.io/e2e.pdf"):

    def pretrained_config(self, config: Any = None) -> dict:
        """The config.json contents: `config` (our Config, or a dict of its sections) or, without one, the model's
        own settings and the TTT settings it was built with (`Transformer(cfg, ttt)`)."""
        if config is not None:
            return asdict(config) if is_dataclass(config) else dict(config)
        ttt = (self._hub_mixin_config or {}).get("ttt") or asdict(TTTConfig())
        return {"model": asdict(self.cfg), "ttt": ttt}

    def save_pretrained(self, save_directory, *, config: Any = None, max_shard_size: int | str = "5GB",
                        **kwargs) -> Optional[str]:
        """Write config.json and the weights (sharded above max_shard_size, with an index) to save_directory;
        push_to_hub=True, repo_id=... also uploads it (PyTorchModelHubMixin.save_pretrained)."""
        from huggingface_hub import save_torch_state_dict

        save_directory = Path(save_directory)
        save_directory.mkdir(parents=True, exist_ok=True)
        save_torch_state_dict(self.state_dict(), save_directory, max_shard_size=max_shard_size)
        return super().save_pretrained(save_directory, config=self.pretrained_config(config), **kwargs)

    def _save_pretrained(self, save_directory: Path) -> None:
        pass  # the weights are written by save_pretrained above (sharded), before the config and model card

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision=None, cache_dir=None, force_download=False,
                         local_files_only=False, token=None, **_):
        from ttt_e2e.pretrained import load_pretrained

        return load_pretrained(model_id, revision=revision, cache_dir=cache_dir, force_download=force_download,
                               local_files_only=local_files_only, token=token)[0]
