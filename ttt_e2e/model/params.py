"""Parameter accounting: E2E configs shrink every MLP so that, with the extra MLP' in the suffix, the total
matches the baseline of the same size (docs/METHOD.md section 5)."""
from __future__ import annotations

import torch

from ttt_e2e.config import ModelConfig

from .transformer import Transformer


def count_parameters(cfg: ModelConfig) -> dict[str, int]:
    """Counts of a model built on the meta device (no memory): total, embedding, non-embedding, inner (phi)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    total = sum(p.numel() for p in model.parameters())
    embedding = model.wte.weight.numel() + (model.lm_head.weight.numel() if model.lm_head is not None else 0)
    inner = sum(p.numel() for n, p in model.suffix.named_parameters() if n in set(model.suffix.inner_names()))
    return dict(total=total, embedding=embedding, non_embedding=total - embedding, inner=inner)


def main() -> None:
    from .sizes import PAPER_SIZES, paper_config

    print("| size | baseline total | E2E total | E2E / baseline | baseline non-embedding | E2E non-embedding | inner (phi) |")
    print("|---|---|---|---|---|---|---|")
    for size in PAPER_SIZES:
        base, e2e = count_parameters(paper_config(size, "fa")), count_parameters(paper_config(size, "e2e"))
        print(f"| {size} | {base['total']:,} | {e2e['total']:,} | {e2e['total'] / base['total']:.4f} | "
              f"{base['non_embedding']:,} | {e2e['non_embedding']:,} | {e2e['inner']:,} |")


if __name__ == "__main__":
    main()
