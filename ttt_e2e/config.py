"""Typed configs. Model and TTT settings live here; trainer settings extend this file.

Every check that a user can trip with a bad setting is made in `validate()`, so a model refuses to be built
with a config that would fail (or silently misbehave) later.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


class ConfigError(ValueError):
    """A setting is invalid; the message names it."""


@dataclass
class ModelConfig:
    vocab_size: int = 258  # the built-in byte-level tokenizer: 256 bytes + BOS + EOS
    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    n_kv_heads: Optional[int] = None  # grouped-query attention: key/value heads, dividing n_heads (query head h reads
    # kv head h // (n_heads / n_kv_heads), Hugging Face's layout); None: n_heads
    attn_head_dim: Optional[int] = None  # width of each attention head; None: d_model // n_heads (Qwen3 sets its own)
    mlp_width: int = 384
    prime_mlp_width: Optional[int] = None  # width of MLP' (the inner weights); None: same as mlp_width
    suffix_len: int = 1  # the last `suffix_len` blocks form the suffix
    prime_mlp: bool = True  # suffix blocks carry MLP', the weights TTT updates
    seq_length: int = 512  # training context length T
    window: Optional[int] = 128  # sliding window W; None: full causal attention over seq_length
    qk_norm: bool = True
    pre_norm: bool = True
    post_norm: bool = True
    tie_embeddings: bool = True
    rope_theta: float = 500000.0
    # RoPE frequency scaling: None, or "llama3" (Llama 3.1/3.2's rope_scaling: the frequencies whose wavelength
    # exceeds rope_original_max_positions / rope_low_freq_factor divided by rope_factor, those below
    # ... / rope_high_freq_factor kept, the band between interpolated)
    rope_scaling: Optional[str] = None
    rope_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_positions: int = 8192
    norm_eps: float = 1e-6
    init_std: float = 0.02
    attention_backend: str = "auto"  # auto: triton on CUDA, torch elsewhere | torch | triton | sdpa (full causal only)
    compute_dtype: str = "auto"  # auto: bfloat16 autocast on CUDA, parameters' dtype elsewhere
    fused_kernels: Optional[bool] = None  # cross-entropy, RMSNorm, RoPE, SwiGLU gate, inner SGD as Triton kernels
    # on CUDA (kernels/), and the meta step's weight gradients formed once per weight (model/linear.py); false: all
    # in PyTorch ops, gradients per use. None: all on, except the elementwise kernels and the deferred gradients for
    # meta-mode training without a CUDA graph, which is host-bound and faster without them. Resolved once per run
    # into a `Kernels` value (below), which is passed down

    @property
    def head_dim(self) -> int:
        return self.attn_head_dim or self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def rope_scale(self) -> Optional[tuple]:
        """The RoPE scaling as model/rope.py takes it: None, or (kind, factor, low_freq_factor, high_freq_factor,
        original_max_positions)."""
        if self.rope_scaling is None:
            return None
        return (self.rope_scaling, self.rope_factor, self.rope_low_freq_factor, self.rope_high_freq_factor,
                self.rope_original_max_positions)

    @property
    def prime_width(self) -> int:
        return self.prime_mlp_width or self.mlp_width

    @property
    def attention_window(self) -> int:
        """The window the attention uses: full causal is a window as long as the sequence."""
        return self.window if self.window is not None else self.seq_length

    @property
    def n_prefix(self) -> int:
        return self.n_layers - self.suffix_len

    def validate(self) -> None:
        for name in ("vocab_size", "n_layers", "d_model", "n_heads", "mlp_width", "seq_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.attn_head_dim is None and self.d_model % self.n_heads:
            raise ConfigError(f"model.n_heads={self.n_heads} does not divide model.d_model={self.d_model} (or set "
                              f"model.attn_head_dim)")
        if self.attn_head_dim is not None and self.attn_head_dim < 1:
            raise ConfigError(f"model.attn_head_dim must be >= 1 (or null), got {self.attn_head_dim}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim = {self.head_dim} must be even for RoPE")
        if self.n_kv_heads is not None and (self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads):
            raise ConfigError(f"model.n_kv_heads={self.n_kv_heads} must be >= 1 and divide model.n_heads="
                              f"{self.n_heads}")
        if self.rope_scaling not in (None, "llama3"):
            raise ConfigError(f"model.rope_scaling must be null or llama3, got {self.rope_scaling!r}")
        if self.rope_scaling is not None and not (self.rope_factor > 0 and self.rope_original_max_positions >= 1
                                                  and 0 < self.rope_low_freq_factor < self.rope_high_freq_factor):
            raise ConfigError(f"model.rope_scaling=llama3 needs rope_factor > 0, rope_original_max_positions >= 1 "
                              f"and 0 < rope_low_freq_factor < rope_high_freq_factor, got {self.rope_factor}, "
                              f"{self.rope_original_max_positions}, {self.rope_low_freq_factor}, "
                              f"{self.rope_high_freq_factor}")
        if self.window is not None and self.window < 1:
            raise ConfigError(f"model.window must be >= 1 (or null for full attention), got {self.window}")
        if not 0 <= self.suffix_len <= self.n_layers:
            raise ConfigError(f"model.suffix_len={self.suffix_len} must be in [0, model.n_layers={self.n_layers}]")
        if self.prime_mlp_width is not None and self.prime_mlp_width < 1:
            raise ConfigError(f"model.prime_mlp_width must be >= 1, got {self.prime_mlp_width}")
        if self.attention_backend not in ("auto", "torch", "triton", "sdpa"):
            raise ConfigError(f"model.attention_backend must be auto, torch, triton or sdpa, "
                              f"got {self.attention_backend!r}")
        if self.compute_dtype not in ("auto", "float32", "bfloat16", "float16", "float64"):
            raise ConfigError(f"model.compute_dtype must be auto, float32, bfloat16, float16 or float64, "
                              f"got {self.compute_dtype!r}")


@dataclass(frozen=True)
class Kernels:
    """Which ops run through their Triton kernels (on CUDA tensors; elsewhere always PyTorch ops; attention follows
    model.attention_backend): model.fused_kernels resolved once per run and passed down whole, to the model's own
    modules (Transformer.use_fused_kernels) and to the loss and the inner loop (sequence_loss, InnerSettings, the
    inference engine, the evaluation's stream_loss). Outside training `Kernels.of(cfg.model)`, every function's
    default; the trainer resolves its own (train/plan.py: use_fused_kernels) and gives it to its LossModule,
    which sets the model's modules from the same value."""
    elementwise: bool = True  # RMSNorm, RoPE, the SwiGLU gate, the inner SGD update; and the meta step's weight
    # gradients formed once per weight (model/linear.py)
    cross_entropy: bool = True  # the loss's cross-entropy (kernels/cross_entropy)

    @classmethod
    def of(cls, cfg: ModelConfig) -> "Kernels":
        """model.fused_kernels outside training: false all off, else (true or None) all on."""
        on = cfg.fused_kernels is not False
        return cls(elementwise=on, cross_entropy=on)


@dataclass
class TTTConfig:
    train_mode: str = "meta"  # pretrain: plain next-token loss | meta: TTT-E2E inner loop inside the outer loss
    mini_batch_size: int = 64  # b: tokens per inner step
    inner_lr: float = 1.0  # eta, before the ilr multiplier
    inner_grad_clip: float = 1.0  # clip of the inner gradient's global norm (per sequence); <= 0 disables
    ilr_init: float = 0.1  # the ilr multiplier warms up linearly from this to 1 ...
    ilr_warmup_steps: int = 0  # ... over this many outer steps
    # The reference's warm-up instead: ilr_init is an absolute inner lr, and the inner lr of step s is
    # ilr_init + (inner_lr - ilr_init) min(1, (s + 1) / ilr_warmup_steps) (its get_ilr_multiplier)
    reference_ilr_warmup: bool = False
    # Evaluate (eval.py, and the trainer's validation) with the full inner lr, as the reference's evaluation
    # mode does, rather than with the warm-up value of the checkpoint's step
    eval_full_ilr: bool = False
    # Keep every inner step for the outer backward (what train.py runs: conf/config.yaml); true recomputes each in
    # the outer backward instead: less memory, more time (3B sets it to fit)
    remat_inner: bool = False
    remat_prefix: bool = False  # recompute each prefix block in the outer backward
    remat_prefix_blocks: Optional[int] = None  # with remat_prefix: only the first N prefix blocks (None: all), the
    # rest keep their activations: memory for time between the two extremes
    recompute_logits: bool = False  # cross-entropy without keeping the head's logits
    # (kernels/cross_entropy/linear_ce.py): less memory, more time, since the logits are recomputed in the backward
    # (the measured trade: docs/results-history/RESULTS-diary.md)

    def ilr_multiplier(self, step: int) -> float:
        if self.ilr_warmup_steps <= 0:
            return 1.0
        if self.reference_ilr_warmup:
            if self.inner_lr == 0:
                return 1.0  # every multiple of a zero inner lr is zero
            progress = min(1.0, (step + 1) / self.ilr_warmup_steps)
            return (self.ilr_init + (self.inner_lr - self.ilr_init) * progress) / self.inner_lr
        if step >= self.ilr_warmup_steps:
            return 1.0
        return self.ilr_init + (1.0 - self.ilr_init) * step / self.ilr_warmup_steps

    def eval_ilr_multiplier(self, step: int) -> float:
        """The multiplier an evaluation of a step-`step` model uses."""
        return 1.0 if self.eval_full_ilr else self.ilr_multiplier(step)

    def validate(self, model: ModelConfig) -> None:
        if self.train_mode not in ("pretrain", "meta"):
            raise ConfigError(f"ttt.train_mode must be pretrain or meta, got {self.train_mode!r}")
        if self.mini_batch_size < 1:
            raise ConfigError(f"ttt.mini_batch_size must be >= 1, got {self.mini_batch_size}")
        if model.seq_length % self.mini_batch_size:
            raise ConfigError(f"model.seq_length={model.seq_length} is not divisible by "
                              f"ttt.mini_batch_size={self.mini_batch_size}")
        if model.attention_backend == "sdpa" and (self.train_mode == "meta" or model.window is not None):
            raise ConfigError("model.attention_backend=sdpa serves only full attention (model.window=null) in "
                              "ttt.train_mode=pretrain: it has no sliding window and no double backward")
        if self.train_mode == "meta":
            if model.suffix_len < 1:
                raise ConfigError("ttt.train_mode=meta needs model.suffix_len >= 1 (the suffix holds the inner weights)")
            if not model.prime_mlp:
                raise ConfigError("ttt.train_mode=meta needs model.prime_mlp=true (MLP' holds the inner weights)")
        if self.ilr_warmup_steps < 0:
            raise ConfigError(f"ttt.ilr_warmup_steps must be >= 0, got {self.ilr_warmup_steps}")
        if self.remat_prefix_blocks is not None and not 0 <= self.remat_prefix_blocks <= model.n_prefix:
            raise ConfigError(f"ttt.remat_prefix_blocks must be null or in [0, {model.n_prefix}] (the prefix "
                              f"blocks), got {self.remat_prefix_blocks}")

    def prefix_remat_blocks(self, model: ModelConfig) -> int:
        """How many of the first prefix blocks recompute their activations in the backward."""
        if not self.remat_prefix:
            return 0
        return model.n_prefix if self.remat_prefix_blocks is None else self.remat_prefix_blocks


@dataclass
class DataConfig:
    # "stdlib": the Python standard library's own source files (on every machine, no download); otherwise a
    # Hugging Face hub dataset name, or local files/folder (.txt, .json/.jsonl, .parquet) read with `datasets`.
    source: str = "stdlib"
    name: Optional[str] = None  # hub dataset config name
    split: str = "train"
    text_field: str = "text"
    tokenizer: str = "bytes"  # "bytes": built-in byte-level; otherwise a transformers tokenizer name or local path
    cache_dir: str = "~/.cache/ttt_e2e"  # tokenized streams, memory-mapped, keyed by source + tokenizer
    val_fraction: float = 0.05  # tail of the token stream held out for validation / eval.py
    max_docs: Optional[int] = None  # cap on documents read (quick runs)
    seed: int = 0  # sampling order


# ----------------------------------------------------------------------------------------------------------------
# Trainer settings (train.py). Hydra composes conf/ onto `Config`; the same dataclasses work without Hydra.


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay to `min_lr` (docs/METHOD.md section 3), and the spike policy."""
    lr: float = 3e-3  # peak learning rate
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    warmup_fraction: float = 0.1  # of training.steps, linear from 0 to lr
    min_lr: float = 1e-5  # end of the cosine
    # The reference's optax warmup_cosine_decay_schedule(init 0): lr step / warmup during the warm-up (0 on the
    # first update), then the cosine over total - warmup steps; false: lr (step + 1) / warmup, and the cosine
    # reaches min_lr at the last step
    reference_schedule: bool = False
    decay_norms: bool = False  # weight decay on every parameter, RMSNorm gains included (as the reference's AdamW)
    grad_clip: float = 1.0  # global norm of the outer gradient; <= 0 disables
    # What a step with a bad gradient does (ttt_e2e/train/spikes.py). stop: a non-finite loss or gradient norm
    # ends the run. skip: a step whose loss or gradient norm is non-finite, or whose gradient norm exceeds
    # spike_factor x the median of the last spike_window accepted steps' norms (once spike_min_history are
    # known), takes no optimizer update (its batch is consumed, the schedule advances) and is counted in the
    # metrics; spike_max_consecutive skipped steps in a row end the run. rollback: skip, and once
    # spike_rollback_after spikes have come since the last snapshot (taken every spike_snapshot_every accepted
    # steps, in host memory), restore it and multiply the inner lr by spike_backoff_ilr and the outer lr by
    # spike_backoff_lr; spike_max_rollbacks rollbacks, then the run ends at the next one due.
    spike_policy: str = "stop"
    spike_factor: float = 10.0
    spike_window: int = 64
    spike_min_history: int = 8
    spike_max_consecutive: int = 20
    spike_snapshot_every: int = 10
    spike_rollback_after: int = 3
    spike_backoff_ilr: float = 0.5
    spike_backoff_lr: float = 1.0
    spike_max_rollbacks: int = 5

    def validate(self) -> None:
        if self.spike_policy not in ("stop", "skip", "rollback"):
            raise ConfigError(f"optim.spike_policy must be stop, skip or rollback, got {self.spike_policy!r}")
        if not self.spike_factor > 1:
            raise ConfigError(f"optim.spike_factor must be > 1, got {self.spike_factor}")
        for name in ("spike_window", "spike_min_history", "spike_max_consecutive", "spike_snapshot_every",
                     "spike_rollback_after"):
            if getattr(self, name) < 1:
                raise ConfigError(f"optim.{name} must be >= 1, got {getattr(self, name)}")
        if self.spike_max_rollbacks < 0:
            raise ConfigError(f"optim.spike_max_rollbacks must be >= 0, got {self.spike_max_rollbacks}")
        for name in ("spike_backoff_ilr", "spike_backoff_lr"):
            if not 0 < getattr(self, name) <= 1:
                raise ConfigError(f"optim.{name} must be in (0, 1], got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"optim.min_lr={self.min_lr} must be in [0, optim.lr={self.lr}]")
        if not 0 <= self.warmup_fraction <= 1:
            raise ConfigError(f"optim.warmup_fraction must be in [0, 1], got {self.warmup_fraction}")
        for name in ("b1", "b2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"optim.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")


@dataclass
class TrainConfig:
    steps: int = 100  # outer (optimizer) steps
    global_batch_size: int = 8  # sequences per optimizer step, summed over ranks and accumulation micro-steps
    micro_batch_size: Optional[int] = None  # sequences per forward/backward on one rank; None: no accumulation
    seed: int = 0  # model init (data order is data.seed)
    device: str = "auto"  # auto: cuda if available else cpu | cpu | cuda. Precision: model.compute_dtype
    compile: bool = False  # torch.compile the blocks that run as plain modules (see ttt_e2e/train/parallel.py)
    cuda_graph: Optional[bool] = None  # capture each micro-batch's forward + backward once and replay it (see
    # ttt_e2e/train/graphed.py), on one GPU, under DDP and FSDP2. None: on for CUDA without compile or CPU offload
    # (the rules between these settings: ttt_e2e/train/plan.py)
    distributed: str = "ddp"  # with a process group: ddp | fsdp (FSDP2 fully_shard, pretrain and meta mode;
    # also in one process: a 1-rank group)
    fsdp_cpu_offload: bool = False  # with fsdp: parameters, gradients and AdamW state in CPU memory (FSDP2's
    # CPUOffloadPolicy; the optimizer runs on the CPU): one GPU can then meta-train 3B
    checkpoint_every: int = 50  # steps; the last step is always saved; 0: only the last step
    save_checkpoints: bool = True  # false: write none at all (benchmarks)
    keep_last: int = 2  # checkpoints kept in the run dir (older ones deleted after a newer one is complete)
    resume: Optional[bool] = None  # None: resume if the run dir has a checkpoint | true: must resume | false: fresh
    init_from: Optional[str] = None  # a checkpoint (step dir, or a run/checkpoints dir: its latest) to start from
    load_part: str = "all"  # with init_from: all (params, optimizer, schedule, data position, step) | params
    eval_every: int = 50  # steps between validation losses; 0: only after the last step
    eval_batches: int = 4  # validation batches of global_batch_size windows per evaluation (the same windows
    # whatever the number of ranks: the head of the validation split)
    log_every: int = 1  # steps between metrics.jsonl / wandb records
    progress: bool = True  # tqdm progress bar (rank 0)

    def validate(self) -> None:
        for name in ("steps", "global_batch_size", "keep_last", "log_every", "eval_batches"):
            if getattr(self, name) < 1:
                raise ConfigError(f"training.{name} must be >= 1, got {getattr(self, name)}")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ConfigError(f"training.micro_batch_size must be >= 1 (or null), got {self.micro_batch_size}")
        for name in ("checkpoint_every", "eval_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"training.{name} must be >= 0, got {getattr(self, name)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"training.device must be auto, cpu or cuda, got {self.device!r}")
        if self.distributed not in ("ddp", "fsdp"):
            raise ConfigError(f"training.distributed must be ddp or fsdp, got {self.distributed!r}")
        if self.load_part not in ("all", "params"):
            raise ConfigError(f"training.load_part must be all or params, got {self.load_part!r}")
        if self.load_part == "params" and not self.init_from:
            raise ConfigError("training.load_part=params needs training.init_from=<the pretrained run dir or "
                              "checkpoint> (an extension starts from pretrained weights)")

    def accumulation(self, world_size: int) -> tuple[int, int]:
        """(micro_batch_size, accumulation steps) per rank for this world size."""
        if self.global_batch_size % world_size:
            raise ConfigError(f"training.global_batch_size={self.global_batch_size} is not divisible by the "
                              f"{world_size} ranks")
        per_rank = self.global_batch_size // world_size
        micro = self.micro_batch_size or per_rank
        if per_rank % micro:
            raise ConfigError(f"training.global_batch_size={self.global_batch_size} over {world_size} rank(s) is "
                              f"{per_rank} sequences per rank, not divisible by training.micro_batch_size={micro}")
        return micro, per_rank // micro


@dataclass
class LogConfig:
    logger: str = "wandb"  # wandb | none. metrics.jsonl in the run dir is written either way
    wandb_mode: str = "offline"  # offline (sync later with `wandb sync`) | online | disabled
    project: str = "ttt-e2e"
    entity: Optional[str] = None
    name: Optional[str] = None  # run name; None: the run dir's name
    peak_tflops: Optional[float] = None  # per device, for MFU; None: looked up from the GPU's name (see flops.py)

    def validate(self) -> None:
        if self.logger not in ("wandb", "none"):
            raise ConfigError(f"log.logger must be wandb or none, got {self.logger!r}")
        if self.wandb_mode not in ("offline", "online", "disabled"):
            raise ConfigError(f"log.wandb_mode must be offline, online or disabled, got {self.wandb_mode!r}")
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise ConfigError(f"log.peak_tflops must be > 0 (or null), got {self.peak_tflops}")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    ttt: TTTConfig = field(default_factory=TTTConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    training: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def validate(self) -> None:
        self.model.validate()
        self.ttt.validate(self.model)
        self.optim.validate()
        self.training.validate()
        self.log.validate()
        if not self.data.source:
            raise ConfigError("data.source is empty: give 'stdlib', a local path, or a hub dataset name "
                              "(e.g. data.source=/data/books)")
        if not 0 <= self.data.val_fraction < 1:
            raise ConfigError(f"data.val_fraction must be in [0, 1), got {self.data.val_fraction}")
