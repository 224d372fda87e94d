"""generate(): prompt -> prefill -> decode loop with sampling and stop tokens, for TTT-E2E and the baselines."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Union

import torch

from ttt_e2e.config import TTTConfig
from ttt_e2e.model.transformer import Transformer

from .engine import InferenceState, feed, start
from .graphs import InferenceGraphs
from .memory import check_memory
from .sampling import sample

Prompt = Union[torch.Tensor, Sequence[int], Sequence[Sequence[int]]]


@dataclass
class GenerateOutput:
    tokens: list[list[int]]  # per sequence: the generated ids, up to and including its stop token if one came
    finished: list[bool]  # whether the sequence ended with a stop token (else it hit max_new_tokens)
    prompt_losses: Optional[torch.Tensor]  # (steps, B) inner losses l_t of the TTT steps taken on the prompt
    state: InferenceState  # to continue (feed more tokens) or inspect


def as_batch(prompt_ids: Prompt, device: torch.device) -> torch.Tensor:
    """A (B, P) long tensor from a tensor (P,) / (B, P), a list of ids, or a list of equal-length lists."""
    if isinstance(prompt_ids, torch.Tensor):
        ids = prompt_ids
    else:
        rows = list(prompt_ids)
        if rows and not isinstance(rows[0], int) and hasattr(rows[0], "__len__"):
            lengths = {len(r) for r in rows}
            if len(lengths) > 1:
                raise ValueError(f"prompts of a batch must have the same length (no padding), got {sorted(lengths)}")
        try:
            ids = torch.tensor(rows, dtype=torch.long)
        except (TypeError, ValueError) as e:
            raise ValueError(f"prompt_ids must be token ids (ints), got {type(prompt_ids).__name__}: {e}") from e
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[0] == 0:
        raise ValueError(f"prompt_ids must be (length,) or (batch, length), got shape {tuple(ids.shape)}")
    if ids.shape[1] == 0:
        raise ValueError("empty prompt: need at least one token (e.g. BOS)")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"prompt_ids must be integers, got {ids.dtype}")
    return ids.to(device=device, dtype=torch.long)


@torch.no_grad()
def generate(model: Transformer, ttt_cfg: Optional[TTTConfig], prompt_ids: Prompt, max_new_tokens: int, *,
             temperature: float = 0.0, top_p: float = 1.0, stop_tokens: Iterable[int] = (),
             seed: Optional[int] = None, bos_id: Optional[int] = None, ilr_mult: float = 1.0,
             prefill_chunk: Optional[int] = None, check_mem: bool = True,
             graphs: Union[bool, InferenceGraphs, None] = None) -> GenerateOutput:
    """Generate up to max_new_tokens after each prompt of the batch.

    ttt_cfg: TTTConfig with train_mode meta for TTT-E2E; None (or train_mode pretrain) for the full-attention
    (model.window None) and SWA baselines. temperature 0 is greedy; otherwise sampling with temperature and
    top_p, reproducible with `seed`. A sequence stops at the first of `stop_tokens` it generates; the loop stops
    when every sequence has. bos_id: targets equal to it carry no inner loss (as in training).
    graphs: replay the inner steps and the decoding as CUDA graphs (default: on a GPU); pass an InferenceGraphs
    to keep its captures for the next call (same model and batch size).
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    device = model.wte.weight.device
    ids = as_batch(prompt_ids, device)
    stop = set(int(t) for t in stop_tokens)
    B = ids.shape[0]
    positions = ids.shape[1] + max_new_tokens
    if graphs is None:
        graphs = device.type == "cuda"
    if isinstance(graphs, bool):
        graphs = InferenceGraphs() if graphs else None
    state = start(model, ttt_cfg, B, bos_id=bos_id, ilr_mult=ilr_mult, prefill_chunk=prefill_chunk,
                  reserve=positions if model.cfg.window is None else 0,
                  graphs=graphs)  # validates; allocates nothing yet
    if check_mem:
        check_memory(model, ttt_cfg if state.ttt else None, B, positions, state.chunk, _activation_bytes(model))
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    logits = feed(state, ids)
    prompt_losses = torch.stack(state.losses) if state.losses else None
    out: list[list[int]] = [[] for _ in range(B)]
    finished = [False] * B
    for step in range(max_new_tokens):
        tok = sample(logits, temperature, top_p, generator)
        for i, t in enumerate(tok.tolist()):
            if not finished[i]:
                out[i].append(t)
                finished[i] = t in stop
        if all(finished) or step == max_new_tokens - 1:
            break
        logits = feed(state, tok[:, None])  # finished sequences keep running (batch in lockstep), unrecorded
    return GenerateOutput(out, finished, prompt_losses, state)


def _activation_bytes(model: Transformer) -> int:
    p = next(model.parameters())
    if model.cfg.compute_dtype == "auto":
        return 2 if p.is_cuda else p.element_size()
    return torch.empty((), dtype=getattr(torch, model.cfg.compute_dtype)).element_size()
