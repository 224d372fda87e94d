"""Shared pieces of the SWA kernels: input checks, launch geometry, tile configs.

Kept apart from the kernels so that forward/backward/double_backward stay small and the choice of tiles (the one
thing tuned per GPU) lives in one place.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch
import triton
from triton.tools.tensor_descriptor import TensorDescriptor

# Decided once, when this package is imported: `triton.jit` itself picks interpreter or compiler at decoration
# time, so setting TRITON_INTERPRET later would not turn the already-built kernels into interpreted ones.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Head dims the kernels are built for: the model's 64/80/96/128, plus the small powers of two the CPU tests use.
# tl.dot needs power-of-two tile sides: 80 and 96 run as 64 + 16 / 64 + 32 column blocks in the forward and
# backward (head_split), in a 128-wide tile with masked loads in the double backward.
SUPPORTED_HEAD_DIMS = (16, 32, 64, 80, 96, 128)

LOG2E = 1.4426950408889634


def use_triton(t: torch.Tensor) -> bool:
    """Whether `swa_attention` runs the Triton kernels for tensors like `t` (else: the materialized reference)."""
    return t.is_cuda or (t.device.type == "cpu" and INTERPRET)


def check_inputs(q, k, v, window, q_pos0, k_pos0, scale=None):
    """Raise a ValueError naming the problem for any input the kernels do not handle."""
    # The forward kernel takes each row's max of the unscaled scores: a scale <= 0 would turn it into the min
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0):
        raise ValueError(f"swa_attention: scale must be a number > 0 (or None: 1/sqrt(head dim)), got {scale!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"swa_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"swa_attention: {name} must be 4-D (B, H, T, D), got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"swa_attention: dtype mismatch q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"swa_attention: device mismatch q {q.device}, k {k.device}, v {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"swa_attention: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"swa_attention: q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch and head dim")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"swa_attention: k's {k.shape[1]} heads must divide q's {q.shape[1]} (grouped-query "
                         f"attention: query head h reads kv head h // (H // Hkv))")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"swa_attention: window must be an int >= 1, got {window!r}")
    for name, p in (("q_pos0", q_pos0), ("k_pos0", k_pos0)):
        if isinstance(p, bool) or not isinstance(p, int):
            raise ValueError(f"swa_attention: {name} must be an int, got {p!r}")


def check_cache(k_cache, k):
    """The cache and the block's keys are one sequence: as many heads in both."""
    if k_cache.shape[1] != k.shape[1]:
        raise ValueError(f"swa_attention: the cache has {k_cache.shape[1]} kv heads, the block's keys "
                         f"{k.shape[1]}: they must agree")


def kv_group(q, k) -> int:
    """Query heads per kv head (1: multi-head attention); query head h reads kv head h // group."""
    return q.shape[1] // k.shape[1]


def check_kernel_inputs(q):
    """Extra limits of the Triton path (the reference accepts anything)."""
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"swa_attention: dtype {q.dtype} not supported by the Triton kernels "
                         f"(use one of {SUPPORTED_DTYPES})")
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"swa_attention: head dim {q.shape[-1]} not supported (supported: {SUPPORTED_HEAD_DIMS})")


def as_kernel_operand(t: torch.Tensor) -> torch.Tensor:
    """The kernels take any strides for batch/head/time but need the head dim contiguous (vector loads)."""
    if t is None:
        return None
    if t.stride(-1) != 1:
        t = t.contiguous()
    # Row offsets are int32 inside the kernels (base offsets are int64).
    if t.shape[-2] * t.stride(-2) >= 2**31:
        t = t.contiguous()
    return t


def empty_like_layout(t: torch.Tensor, shape, dtype=None, parts: int = 0) -> torch.Tensor:
    """An empty (B, H, T, D) tensor of `shape` (with a leading (parts,) dim if parts) in t's order: (B, T, H, D) in
    memory where t has its heads inside time (the model's transposed view), else contiguous. The kernels write by
    strides; the outputs (o, dQ, dK, dV) then come back in the layout the projections read them in, where a
    contiguous (B, H, T, D) result would cost a copy at every reshape to (B, T, H * D)."""
    dtype = dtype or t.dtype
    B, H, T, D = shape
    lead = (parts,) if parts else ()
    if t.stride(1) >= t.stride(2):
        return torch.empty((*lead, B, H, T, D), dtype=dtype, device=t.device)
    n = len(lead)
    return torch.empty((*lead, B, T, H, D), dtype=dtype, device=t.device).transpose(n + 1, n + 2)


def unroll_ring(k, v, rot: int, block_n: int):
    """(k, v, rot) for a kernel with block_n-row key tiles: the ring as it is where its rotation and length are
    whole tiles (the kernels then rotate tile by tile), else rolled into position order here (a copy; rot 0)."""
    if rot and (rot % block_n or k.shape[2] % block_n):
        return k.roll(-rot, 2), v.roll(-rot, 2), 0
    return k, v, rot


def key_descriptors(tensors, block_n: int, main: int, tail: int):
    """TMA tensor descriptors of the (B, H, rows, D) key/value tensors, blocks of (1, 1, block_n, main) then, with
    a tail, (1, 1, block_n, tail): 8 with tail, the tail ones are the main ones' otherwise. None where a descriptor
    cannot take them: fp32 (the accuracy path keeps its pointer loads), strides or addresses not multiples of 16
    bytes (the TMA's rule), an empty tensor (an empty cache), or no Hopper-class GPU (the interpreter reads
    descriptors too)."""
    if not all(t.dtype in (torch.float16, torch.bfloat16) and t.numel() for t in tensors):
        return None
    if not INTERPRET and torch.cuda.get_device_capability(tensors[0].device)[0] < 9:
        return None
    for t in tensors:
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any(s * t.element_size() % 16 for s in t.stride()[:-1]):
            return None
    main_d = [TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, block_n, main]) for t in tensors]
    tail_d = ([TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, block_n, tail]) for t in tensors]
              if tail else main_d)
    k, v, k2, v2 = main_d
    kt, vt, k2t, v2t = tail_d
    return k, v, kt, vt, k2, v2, k2t, v2t


def block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def head_split(d: int) -> tuple[int, int]:
    """(main, tail) column blocks of head dim d for the forward and backward kernels: d = main + tail with both
    powers of two and tail >= 16 (80 = 64 + 16, 96 = 64 + 32), so that no MMA work goes to zero padding; (block_d(d),
    0) for a power of two (or a dim that splits no such way: one padded block). The double-backward kernels keep one
    padded block."""
    main = 1 << (d.bit_length() - 1)
    tail = d - main
    if tail == 0 or tail < 16 or tail & (tail - 1):
        return block_d(d), 0
    return main, tail


def dot_precision(dtype) -> str:
    # fp32 operands: full IEEE products (the fp32 path is the accuracy path, used by the tests); tf32 would give
    # ~3e-4 relative error. bf16/fp16 ignore it.
    return "ieee" if dtype == torch.float32 else "tf32"


@dataclass(frozen=True)
class TileConfig:
    block_m: int   # query rows per tile
    block_n: int   # key rows per tile
    num_warps: int
    num_stages: int


# Per-kernel tile configs on the GPU, indexed by kernel name. Chosen by benchmarks/kernels/attention.py --tune (Hopper)
# (see benchmarks/RESULTS.md); the interpreter uses 16x16 tiles so the CPU tests stay fast.
_GPU_CONFIGS = {
    # kernel: {padded head dim: TileConfig}; block_m = query rows, block_n = key rows in every kernel. 80: the
    # 64 + 16 column split of the forward and backward (head_split), from a sweep at the 3B shapes
    # (docs/results-history/data/swa_d80_tiles_h100.txt); the forward's 4 stages since its loads go through TMA
    # descriptors: deeper pipelining hides their latency (benchmarks/kernels/swa_fwd_versions.py; RESULTS.md).
    "fwd": {64: TileConfig(64, 64, 4, 3), 80: TileConfig(128, 64, 4, 4), 128: TileConfig(64, 64, 4, 3)},
    "bwd_dq": {64: TileConfig(64, 64, 4, 3), 80: TileConfig(64, 32, 4, 3), 128: TileConfig(64, 32, 4, 3)},
    "bwd_dkdv": {64: TileConfig(32, 64, 4, 3), 80: TileConfig(64, 64, 4, 3), 128: TileConfig(32, 64, 4, 3)},
    "dbwd_ru": {64: TileConfig(64, 64, 4, 3), 128: TileConfig(128, 64, 8, 2)},
    "dbwd_row": {64: TileConfig(64, 64, 4, 2), 128: TileConfig(64, 32, 4, 2)},
    "dbwd_col": {64: TileConfig(32, 64, 4, 2), 128: TileConfig(32, 128, 8, 2)},
}
# Overrides for tuning experiments: {kernel name: TileConfig}; applies to every head dim.
CONFIG_OVERRIDES: dict[str, TileConfig] = {}


def tile_config(kernel: str, d: int, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> TileConfig:
    if kernel in CONFIG_OVERRIDES:
        return CONFIG_OVERRIDES[kernel]
    if device.type != "cuda":
        return TileConfig(16, 16, 1, 1)
    if dtype == torch.float32:
        # The fp32 path is for accuracy, not speed; 4-byte tiles of the bf16 configs can exceed shared memory.
        return TileConfig(32, 32, 4, 2)
    table = _GPU_CONFIGS[kernel]
    if d in table and head_split(d)[1]:  # a split head dim's own tiles (the double backward pads: no entry)
        return table[d]
    bd = block_d(d)
    return table[bd] if bd in table else table[min(table, key=lambda x: abs(x - bd))]


# The forward with 128-row tiles and 8 warps: faster than the table's 64-row tiles where the grid of 128-row tiles
# still covers every SM once (32 heads x 1K suffix queries), slower where it would leave SMs idle (12 heads x 1K
# queries: 96 programs; benchmarks/RESULTS.md). Head dim 64 only (where it was measured).
FWD_WIDE = TileConfig(128, 64, 8, 3)


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def forward_tile(tq: int, bh: int, d: int, device: torch.device, dtype: torch.dtype) -> TileConfig:
    """The forward's tiles for tq queries in each of bh (batch x heads) rows of the grid, head dim d."""
    cfg = tile_config("fwd", d, device, dtype)
    if ("fwd" in CONFIG_OVERRIDES or device.type != "cuda" or dtype == torch.float32 or d != 64):
        return cfg
    wide = triton.cdiv(tq, FWD_WIDE.block_m) * bh >= _num_sms(device.index or 0)
    return FWD_WIDE if wide else cfg


def default_scale(d: int, scale):
    return 1.0 / math.sqrt(d) if scale is None else float(scale)


# Key parts: the forward or dQ kernel (one program per query tile and head) with fewer programs than the GPU has
# slots for them (12 heads x 16 query tiles of a 1K suffix block = 192 programs on 132 SMs) splits each query
# tile's key range over NPARTS programs, which write fp32 partial results that one small launch combines
# (parts.py). _PER_SM is in effect a tuning knob: 2 parts were faster than 1, 3 and 4 for the 125M suffix's forward
# and dQ (benchmarks/kernels/swa_key_parts.py, docs/results-history/data/swa_key_parts_h100.txt). The double
# backward's row-parallel passes gained nothing consistent from parts and take none. Programs that fill the slots
# nearly (FULL_ENOUGH) take no parts either: the 3B inner step's forward, 256 programs for 264 slots, is faster
# in one part (the partial outputs and their merge cost more than 8 idle slots; benchmarks/RESULTS.md).
_PER_SM = {"fwd": 2, "bwd_dq": 2}
MAX_KEY_PARTS = 4
FULL_ENOUGH = 0.9
# An override for experiments and tests: an int forces that many parts on every launch (1: never split).
KEY_PARTS_OVERRIDE: int | None = (int(os.environ["TTT_E2E_SWA_KEY_PARTS"])
                                  if os.environ.get("TTT_E2E_SWA_KEY_PARTS") else None)


def key_parts(kernel: str, programs: int, tk: int, block_n: int, device: torch.device, num_warps: int = 4) -> int:
    """How many parts to split each query tile's keys into: enough to fill the SMs' slots, at most MAX_KEY_PARTS,
    and each part at least 4 key tiles of the tk keys; none where the programs fill FULL_ENOUGH of the slots.
    Programs of more warps than 4 take proportionally more of an SM."""
    if KEY_PARTS_OVERRIDE is not None:
        return max(1, KEY_PARTS_OVERRIDE)
    if device.type != "cuda":
        return 1
    slots = _num_sms(device.index or 0) * max(1, _PER_SM[kernel] * 4 // num_warps)
    if programs >= FULL_ENOUGH * slots:
        return 1
    return max(1, min(MAX_KEY_PARTS, triton.cdiv(slots, programs), tk // (4 * block_n)))


# Group parts (grouped-query attention): the column-parallel kernels (dK/dV, the double backward's grad K/V) run one
# program per key tile of a kv head, summing over the group's query heads: `group` times fewer programs than
# multi-head attention, each `group` times longer. Where that leaves slots idle, or loads them unevenly (a window's
# last key tiles see fewer queries, and few long programs cannot even that out), each group's heads are split over
# several programs (a divisor of the group), which write fp32 partial sums that one more launch adds up in a fixed
# order (parts.sum_parts): deterministic, as without parts. GROUP_WAVES (programs wanted per slot) is a tuning knob
# (benchmarks/kernels/swa_gqa.py). Where each key tile is read by many query rows (LONG_ROWS or more: full causal
# attention over a long sequence), a program per query head runs faster than one summing the group although the
# grid is full either way (benchmarks/RESULTS.md, the causal-8K backward; with fewer rows, as a 1K mini-batch's,
# the summing programs are faster): the whole group is split there.
GROUP_WAVES = 2
LONG_ROWS = 4096
# An override for experiments and tests: the largest divisor of the group not above it (1: never split).
GROUP_PARTS_OVERRIDE: int | None = (int(os.environ["TTT_E2E_SWA_GROUP_PARTS"])
                                    if os.environ.get("TTT_E2E_SWA_GROUP_PARTS") else None)


def group_parts(programs: int, group: int, device: torch.device, num_warps: int = 4, rows: int = 0) -> int:
    """Into how many parts to split each group's query heads in a column-parallel launch of `programs` programs
    (one per key tile and kv head; `rows`: the most query rows one of them reads per query head, 0 where the
    long-rows split does not apply): the whole group (one query head a program, as multi-head attention runs) where
    rows >= LONG_ROWS, else the fewest parts (a divisor of group) that give GROUP_WAVES programs per slot (two
    4-warp programs per SM), else the whole group."""
    divisors = [p for p in range(1, group + 1) if group % p == 0]
    if GROUP_PARTS_OVERRIDE is not None:
        return max(p for p in divisors if p <= max(1, GROUP_PARTS_OVERRIDE))
    if group == 1 or device.type != "cuda":
        return 1
    if rows >= LONG_ROWS:
        return group
    slots = _num_sms(device.index or 0) * max(1, 8 // num_warps)
    return next((p for p in divisors if programs * p >= GROUP_WAVES * slots), group)


def key_tile_rows(tq: int, window: int, block_n: int) -> int:
    """The most query rows (of tq) that read one key tile of block_n keys under a window: group_parts's rows."""
    return min(tq, window + block_n)


# Column order: a column-parallel launch whose grid runs key tiles fastest (key tiles, kv heads) starts the last kv
# head's programs after every other head's; in a causal launch a head's first key tiles hold the longest programs
# (every later query reads them), and with grouped-query attention each program also sums GROUP query heads, so
# the last head's longest programs end well after the rest (the tail of the full-causal 8K backward,
# benchmarks/RESULTS.md). Key-tile-major order (kv heads and parts fastest) starts every head's longest programs
# first. The grid's y dimension holds at most 65535 key tiles; beyond that, the other order.
# "tile" (key-tile-major) or "head" (key tiles fastest); the environment variable for experiments.
COLUMN_ORDER = os.environ.get("TTT_E2E_SWA_COLUMN_ORDER") or "tile"
_GRID_Y_MAX = 65535


def column_grid(key_tiles: int, bhk: int, nparts: int) -> tuple[tuple[int, ...], bool]:
    """(grid, TILE_MAJOR) of a column-parallel launch of key_tiles x bhk (batch x kv heads) x nparts programs
    (tiles.kv_program reads it back)."""
    if COLUMN_ORDER not in ("tile", "head"):
        raise ValueError(f"swa column order must be 'tile' or 'head', got {COLUMN_ORDER!r}")
    if COLUMN_ORDER == "tile" and key_tiles <= _GRID_Y_MAX:
        return (bhk * nparts, key_tiles), True
    return (key_tiles, bhk, nparts), False
