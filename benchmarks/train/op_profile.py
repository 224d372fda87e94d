"""Which kernels and which ATen ops (with their input shapes) take the GPU time of one training step.

    python -m benchmarks.train.op_profile 125m:e2e:0:0 125m:fa:0:0 1b:e2e:0:1     # size:mode:remat_inner:remat_prefix
    python -m benchmarks.train.op_profile --by-node 1b:e2e:0:0   # also: memory-bound ops by the autograd node

One eager step (T = 8192, b = 1024, W = 8192, bf16 autocast, AdamW) after two warm-up steps, under the PyTorch
profiler with shapes recorded; prints the top kernels by GPU time and the top ops by the GPU time of the kernels
they launched. The eager step's kernels are the ones a CUDA-graph replay runs, so this says where the graphed
step's time goes too (the host time it also shows is what the graph removes).
"""
import argparse

import torch

from ttt_e2e.model.transformer import Transformer
from ttt_e2e.ttt.meta import sequence_loss

from benchmarks.core.env import describe, environment
from benchmarks.core.models import train_configs
from benchmarks.core.timing import default_device, profiler_activities, sync

DEVICE = default_device()


def _gpu_us(e) -> float:
    return getattr(e, "self_device_time_total", 0)


def profile(size: str, mode: str, remat_inner: bool, remat_prefix: bool, rows: int = 45, by_node: bool = False):
    T, b, W = (64, 16, 32) if size == "tiny" else (8192, 1024, 8192)
    mcfg, tcfg = train_configs(size, T, b, W, remat_inner=remat_inner, remat_prefix=remat_prefix)[mode]
    torch.manual_seed(0)
    model = Transformer(mcfg, tcfg).to(DEVICE)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=DEVICE == "cuda")
    ids = torch.randint(0, mcfg.vocab_size, (1, T + 1), device=DEVICE)
    x, y = ids[:, :-1], ids[:, 1:]

    def step():
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=DEVICE == "cuda"):
            loss = sequence_loss(model, x, y, None, tcfg).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2 if DEVICE == "cuda" else 1):
        step()
    sync()
    with torch.profiler.profile(activities=profiler_activities(cpu=True), record_shapes=True) as prof:
        step()
        sync()
    print(f"\n===== {size} {mode} remat_inner={remat_inner} remat_prefix={remat_prefix}")
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    print(f"GPU total {sum(map(_gpu_us, kernels)) / 1e3:.1f} ms in {sum(e.count for e in kernels)} kernels")
    for e in sorted(kernels, key=_gpu_us, reverse=True)[:rows]:
        print(f"K {_gpu_us(e) / 1e3:8.2f} ms {e.count:6d}  {e.key[:160]}")
    ops = [e for e in prof.key_averages(group_by_input_shape=True)
           if e.device_type == torch.autograd.DeviceType.CPU and _gpu_us(e) > 0]
    print("--- ops by the GPU time of their own kernels")
    for e in sorted(ops, key=_gpu_us, reverse=True)[:rows + 20]:
        print(f"O {_gpu_us(e) / 1e3:8.2f} ms {e.count:6d}  {e.key[:40]:40s} {str(e.input_shapes)[:150]}")
    if by_node:
        _by_node(prof, rows)


MEMORY_BOUND = ("aten::copy_", "aten::add", "aten::add_", "aten::mul", "aten::sum", "aten::cat", "aten::addcmul",
                "aten::fill_", "aten::zero_", "aten::div", "aten::sub", "aten::mul_", "aten::neg")


def _by_node(prof, rows: int) -> None:
    """The memory-bound ops, grouped by the autograd node whose backward ran them (or 'forward') and the outermost
    op inside it: which derivative makes each pass over memory, which a fused node would save."""
    groups: dict = {}
    for e in prof.profiler.function_events:
        if e.name not in MEMORY_BOUND or _gpu_us(e) <= 0:
            continue
        node, chain, p = "forward", [e.name], e.cpu_parent
        while p is not None:
            if p.name.startswith("autograd::engine::evaluate_function: "):
                node = p.name.split(": ", 1)[1]
                break
            chain.append(p.name)
            p = p.cpu_parent
        if len(chain) > 1 and chain[-1] == node:  # the node's own record
            chain.pop()
        key = (node, chain[-1], e.name.split("::")[-1], str(e.input_shapes[:2])[:70])
        t, n = groups.get(key, (0.0, 0))
        groups[key] = (t + _gpu_us(e), n + 1)
    total = sum(t for t, _ in groups.values())
    print(f"--- memory-bound ops by autograd node ({total / 1e3:.1f} ms in all)")
    for (node, top, name, shapes), (t, n) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:rows]:
        print(f"N {t / 1e3:8.2f} ms {n:6d}  {node[:34]:34s} {top[:26]:26s} {name:8s} {shapes}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("specs", nargs="+", help="size:mode:remat_inner:remat_prefix, e.g. 125m:e2e:0:0 (size tiny: a "
                   "smoke run, the CPU's too)")
    p.add_argument("--by-node", action="store_true", help="also memory-bound ops by the autograd node running them")
    args = p.parse_args(argv)
    print(describe(environment(DEVICE)))
    for spec in args.specs:
        try:
            size, mode, ri, rp = spec.split(":")
        except ValueError:
            p.error(f"{spec!r}: expected size:mode:remat_inner:remat_prefix")
        profile(size, mode, ri == "1", rp == "1", by_node=args.by_node)
        if DEVICE == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
