"""Held-out per-token losses at long context, in memory constant (meta) or linear (baselines) in the context: what
validation and eval.py run.

meta:     the window goes through the inference engine (inference/engine.py) as one prompt of T + 1 tokens (the
          inputs, then the last target), so that every one of the T / b mini-batches has its b targets and takes
          its inner step; each step's loss is computed with phi_t before its update, as in training (the engine's
          last step also updates phi, which nothing reads). The prefix runs in chunks with KV caches, the suffix
          mini-batch by mini-batch: memory is constant in T. On a GPU every inner step replays a CUDA graph
          (inference/graphs.py), captured once per evaluation.
pretrain: the training-mode forward over the whole window in one pass (no_grad: activations O(T d), SDPA's flash
          / cuDNN kernels for full attention, the Triton kernels for SWA), then the head and the cross-entropy
          over chunks of positions, so the (T, vocab) logits never exist at once (128K x 128K-vocab bf16 logits
          alone are 34 GB). The engine has nothing to add here: no inner loop, and its prefill computes only the
          last position's logits.

Equal to `sequence_loss(...).token_losses` (tests/eval/test_stream_loss.py): the engine's steps are the training
inner step (ttt/inner.py), and the mask is the same rule (targets equal to BOS carry no loss), checked.
"""
from __future__ import annotations

import contextlib
import gc
from typing import Optional

import torch

from ttt_e2e.config import Kernels, TTTConfig
from ttt_e2e.inference import InferenceGraphs, feed, start
from ttt_e2e.model.transformer import Transformer
from ttt_e2e.ttt.loss import masked_mean, token_losses

HEAD_CHUNK = 8192  # positions per head + cross-entropy call of the baselines: (8192, vocab) logits at a time


def meta_token_losses(model: Transformer, ttt: TTTConfig, inputs: torch.Tensor, targets: torch.Tensor,
                      mask: torch.Tensor, bos_id: int, ilr_mult: float = 1.0,
                      graphs: Optional[InferenceGraphs] = None, prefill_chunk: Optional[int] = None,
                      kernels: Optional[Kernels] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(token losses (B, T): every position's, masked or not, as in training; mini-batch losses (B, T / b)) of a
    meta-mode model through the engine. inputs, targets, mask as make_batch gives them: targets[:, :-1] ==
    inputs[:, 1:], mask == (targets != bos_id). kernels: as the engine's start (default Kernels.of(model.cfg))."""
    B, T = inputs.shape
    b = ttt.mini_batch_size
    if T % b:
        raise ValueError(f"sequence length {T} is not divisible by ttt.mini_batch_size={b}")
    # The engine masks by the BOS rule inside each inner step (the mask also shapes the step's gradient, so it
    # cannot be applied afterwards): any other mask would give other losses.
    if not torch.equal(mask, targets != bos_id):
        raise ValueError("the engine path masks exactly the targets equal to BOS (make_batch's mask); got another "
                         "mask: use the training-mode path (path=training)")
    if T > 1 and not torch.equal(targets[:, :-1], inputs[:, 1:]):
        raise ValueError("targets must be the inputs shifted by one (make_batch's windows) for the engine path")
    state = start(model, ttt, B, bos_id=bos_id, ilr_mult=ilr_mult, graphs=graphs, prefill_chunk=prefill_chunk,
                  kernels=kernels)
    feed(state, torch.cat((inputs, targets[:, -1:]), 1))
    if len(state.losses) != T // b:
        raise RuntimeError(f"the engine took {len(state.losses)} inner steps over {T} tokens, expected {T // b}")
    return torch.cat(state.token_losses, 1), torch.stack(state.losses, 1)


def baseline_token_losses(model: Transformer, inputs: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                          b: int, chunk: int = HEAD_CHUNK,
                          kernels: Optional[Kernels] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The same pair for a model without an inner loop (train_mode pretrain), the logits formed chunk by chunk.
    kernels: the cross-entropy's (default Kernels.of(model.cfg))."""
    B, T = inputs.shape
    if T % b:
        raise ValueError(f"sequence length {T} is not divisible by ttt.mini_batch_size={b}")
    h, _ = model.suffix(model.run_prefix(model.wte(inputs)))
    head = model.head_weight()
    ce_kernel = (Kernels.of(model.cfg) if kernels is None else kernels).cross_entropy
    tok = torch.cat([token_losses(h[:, i:i + chunk], head, targets[:, i:i + chunk], kernel=ce_kernel)
                     for i in range(0, T, chunk)], 1)
    return tok, masked_mean(tok.view(B, T // b, b), mask.view(B, T // b, b))


class StreamLoss:
    """loss_fn(inputs, targets, mask, ilr_mult) -> {"token_losses", "minibatch_losses"}, the interface of the
    trainer's LossModule, through the functions above. Holds the CUDA graphs of one evaluation (one set per
    batch size); close() frees them, and evaluate() makes a fresh StreamLoss each time. Weights that the
    optimizer changed in place are seen either way: each window starts a new state, which copies phi_0 from the
    weights into the graphs' buffers, and theta and the head are the parameter tensors themselves, read by
    address. Freeing the graphs with the evaluation keeps their memory pool out of training and no graph outlives
    the parameter tensors it names (a model moved to another device or rebuilt). kernels: the loss's and the inner
    steps' (default Kernels.of(model.cfg)); the trainer's evaluation passes its loss module's."""

    def __init__(self, model: Transformer, ttt: TTTConfig, bos_id: int, graphs: Optional[bool] = None,
                 prefill_chunk: Optional[int] = None, kernels: Optional[Kernels] = None):
        self.model, self.ttt, self.bos_id, self.prefill_chunk = model, ttt, bos_id, prefill_chunk
        self.kernels = kernels
        on_gpu = next(model.parameters()).is_cuda
        self.use_graphs = on_gpu if graphs is None else graphs
        self._graphs: dict[int, InferenceGraphs] = {}  # batch size -> graphs (a smaller last batch has its own)
        # Blocks compiled for training (training.compile) would recompile for every cache position here: eager
        compiled = any(getattr(m, "_compiled_call_impl", None) is not None for m in model.modules())
        self._eager = (lambda: torch.compiler.set_stance("force_eager")) if compiled else contextlib.nullcontext

    def __call__(self, inputs, targets, mask, ilr_mult: float) -> dict:
        with torch.no_grad(), self._eager():
            if self.ttt.train_mode == "meta":
                graphs = None
                if self.use_graphs:
                    if inputs.shape[0] not in self._graphs:
                        self._graphs[inputs.shape[0]] = InferenceGraphs()
                    graphs = self._graphs[inputs.shape[0]]
                tok, per_mb = meta_token_losses(self.model, self.ttt, inputs, targets, mask, self.bos_id, ilr_mult,
                                                graphs, self.prefill_chunk, self.kernels)
            else:
                tok, per_mb = baseline_token_losses(self.model, inputs, targets, mask, self.ttt.mini_batch_size,
                                                    kernels=self.kernels)
        return {"token_losses": tok, "minibatch_losses": per_mb.mean(0)}

    def close(self) -> None:
        """Frees the graphs and their memory pool (the captures leave reference cycles: collected here)."""
        self._graphs.clear()
        gc.collect()
        if torch.cuda.is_available() and self.use_graphs:
            torch.cuda.empty_cache()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
