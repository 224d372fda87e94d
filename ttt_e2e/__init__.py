"""TTT-E2E in PyTorch. `ttt_e2e.load_pretrained(path) -> (model, cfg)` loads any saved model (ttt_e2e/pretrained.py)."""


def __getattr__(name):
    if name == "load_pretrained":  # imported on first use: `import ttt_e2e.kernels` etc. stay light
        from .pretrained import load_pretrained

        return load_pretrained
    raise AttributeError(f"module 'ttt_e2e' has no attribute {name!r}")
