"""The method: `naive.py` states it in one page; `meta.py` (the sequence loss), `inner.py` (one inner step),
`settings.py`, `loss.py` and `remat.py` compute the same function fast (docs/ARCHITECTURE.md)."""
