"""training.cuda_graph (and model.fused_kernels, resolved with it, once per run): refused where it cannot work;
on a GPU, the same training as the eager path."""
import inspect

import pytest
import torch

from ttt_e2e.config import ConfigError, Kernels
from ttt_e2e.eval import stream_loss
from ttt_e2e.model.attention import Attention
from ttt_e2e.model.layers import RMSNorm, SwiGLU
from ttt_e2e.model.transformer import Transformer
from ttt_e2e.train import plan
from ttt_e2e.train.plan import use_cuda_graph, use_fused_kernels
from ttt_e2e.train.parallel import LossModule
from ttt_e2e.train.trainer import train
from ttt_e2e.ttt import meta
from ttt_e2e.ttt.loss import token_losses
from ttt_e2e.ttt.settings import InnerSettings

SWITCHED = (RMSNorm, Attention, SwiGLU)  # the model's modules with a kernel switch


def test_cuda_graph_needs_cuda(compose, tmp_path):
    with pytest.raises(ConfigError, match="training.cuda_graph=true needs a CUDA device"):
        train(compose(**{"training.cuda_graph": "true", "training.device": "cpu"}), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("device, compile_, dist_, offload, setting, expected, why", [
    ("cuda", "false", "ddp", "false", "null", True, None), ("cuda", "false", "fsdp", "false", "null", True, None),
    ("cuda", "true", "ddp", "false", "null", False, "training.compile=true"),
    ("cuda", "false", "fsdp", "true", "null", False, "training.fsdp_cpu_offload=true"),
    ("cpu", "false", "ddp", "false", "null", False, None), ("cpu", "false", "fsdp", "false", "null", False, None),
    ("cuda", "false", "ddp", "false", "false", False, "training.cuda_graph=false"),
    ("cuda", "false", "fsdp", "false", "true", True, None),
])
def test_default_is_on_for_cuda_with_ddp_and_fsdp(compose, device, compile_, dist_, offload, setting, expected, why):
    """Where the default turns the graphs off on CUDA, the reason goes with it (the run's plan line logs it)."""
    cfg = compose(**{"training.cuda_graph": setting, "training.compile": compile_, "training.distributed": dist_,
                     "training.fsdp_cpu_offload": offload})
    assert use_cuda_graph(cfg, torch.device(device)) == (expected, why)


@pytest.mark.parametrize("mode, graph, setting, expected, ce", [
    ("meta", False, "null", False, True), ("meta", True, "null", True, True), ("pretrain", False, "null", True, True),
    ("meta", False, "true", True, True), ("pretrain", True, "false", False, False),
])
def test_fused_kernels_off_only_for_eager_meta_by_default(compose, mode, graph, setting, expected, ce):
    cfg = compose(**{"ttt.train_mode": mode, "model.fused_kernels": setting})
    kernels = use_fused_kernels(cfg, graph)
    assert kernels == Kernels(elementwise=expected, cross_entropy=ce)
    loss_module = LossModule(Transformer(cfg.model), cfg.ttt, kernels)
    assert loss_module.kernels is kernels and not hasattr(loss_module.model, "kernels")  # no flag on the model
    for kind in SWITCHED:  # every module with a kernel switch follows the loss module's value
        mods = [m for m in loss_module.model.modules() if isinstance(m, kind)]
        assert mods and all(m.kernel is expected for m in mods), kind.__name__


@pytest.mark.parametrize("mode", ["meta", "pretrain"])
def test_one_kernel_choice_per_run(compose, tmp_path, monkeypatch, mode):
    """Whatever the trainer resolves (here a value unlike the default of every other entry point, Kernels.of the
    config, in both fields), the model's modules, the training loss (its cross-entropy, the inner steps' settings,
    the deferred weight gradients) and the evaluation's engine path all run with it, and nothing else."""
    chosen = Kernels(elementwise=False, cross_entropy=False)
    assert Kernels.of(compose().model) == Kernels(True, True)
    monkeypatch.setattr(plan, "use_fused_kernels", lambda cfg, graph: chosen)
    seen = {"modules": [], "ce": [], "settings": [], "shared_weight": 0}

    def modules(model):
        seen["modules"].append({m.kernel for m in model.modules() if isinstance(m, SWITCHED)})

    def spy_ce(where):
        def f(*args, **kw):
            seen["ce"].append((where, inspect.signature(token_losses).bind(*args, **kw).arguments.get("kernel", True)))
            return token_losses(*args, **kw)
        return f

    run_prefix, build, shared_weight = Transformer.run_prefix, InnerSettings.build.__func__, meta.shared_weight

    def spy_prefix(model, *args, **kw):
        modules(model)
        return run_prefix(model, *args, **kw)

    def spy_build(cls, model, *args, **kw):
        modules(model)
        settings = build(cls, model, *args, **kw)
        seen["settings"].append((settings.ce_kernel, settings.sgd_kernel))
        return settings

    def spy_shared(*args, **kw):
        seen["shared_weight"] += 1
        return shared_weight(*args, **kw)

    monkeypatch.setattr(Transformer, "run_prefix", spy_prefix)
    monkeypatch.setattr(InnerSettings, "build", classmethod(spy_build))
    monkeypatch.setattr(meta, "shared_weight", spy_shared)
    monkeypatch.setattr(meta, "token_losses", spy_ce("training"))
    monkeypatch.setattr(stream_loss, "token_losses", spy_ce("evaluation"))
    # one step, and the validation loss before it (the engine path: on a CPU, the eager inner steps)
    train(compose(**{"ttt.train_mode": mode, "training.steps": 1, "training.checkpoint_every": 0}), tmp_path / "run")
    assert seen["modules"] and all(s == {chosen.elementwise} for s in seen["modules"]), seen
    assert seen["shared_weight"] == 0  # the weight gradients per use, as with the elementwise kernels off
    if mode == "meta":  # the training loss's inner steps and the engine's
        assert len(seen["settings"]) >= 2 and not seen["ce"], seen
        assert set(seen["settings"]) == {(chosen.cross_entropy, chosen.elementwise)}, seen
    else:
        assert {w for w, _ in seen["ce"]} == {"training", "evaluation"} and not seen["settings"], seen
        assert {k for _, k in seen["ce"]} == {chosen.cross_entropy}, seen


@pytest.mark.parametrize("setting, message", [
    ({"training.distributed": "fsdp", "training.fsdp_cpu_offload": "true"},
     "cuda_graph=true does not compose with training.fsdp_cpu_offload=true"),
    ({"training.compile": "true"}, "cuda_graph=true does not compose with training.compile=true"),
])
def test_explicit_cuda_graph_that_cannot_work_is_refused(compose, tmp_path, setting, message):
    with pytest.raises(ConfigError, match=message):
        train(compose(**{"training.cuda_graph": "true", **setting}), tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.gpu
@pytest.mark.parametrize("mode, micro", [("meta", 4), ("meta", 2), ("pretrain", 2)])
def test_graphed_training_equals_eager(compose, tmp_path, metrics, mode, micro):
    """Eight steps, eager vs replayed (with gradient accumulation when micro < 4): the same losses, gradient
    norms and inner-lr schedule (fp32 on the GPU, Triton kernels: the same kernels in the same order)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    runs = {}
    for graph in ("false", "true"):
        cfg = compose(**{"training.cuda_graph": graph, "training.device": "cuda", "ttt.train_mode": mode,
                         "training.micro_batch_size": micro, "model.compute_dtype": "float32",
                         "model.attention_backend": "triton",
                         "model.fused_kernels": "true"})  # the same kernels in both (the default differs)
        train(cfg, tmp_path / graph)
        runs[graph] = [r for r in metrics(tmp_path / graph) if "loss" in r]
    assert len(runs["true"]) == len(runs["false"]) == 8
    for eager, graphed in zip(runs["false"], runs["true"]):
        for key in ("loss", "grad_norm", "ilr"):
            assert graphed[key] == pytest.approx(eager[key], rel=1e-5, abs=1e-6), (key, eager["step"])
    assert runs["true"][-1]["loss"] < runs["true"][0]["loss"]  # it trained


@pytest.mark.gpu
@pytest.mark.parametrize("dist_, mode", [("ddp", "meta"), ("fsdp", "meta"), ("fsdp", "pretrain")])
def test_graphed_step_equals_eager_under_a_process_group(tmp_path, tiny_args, run_cli, metrics, dist_, mode):
    """torchrun with one rank (a real NCCL process group): the graphed micro-steps with their own all-reduce
    give the eager DDP run's losses and gradient norms (fp32, the same kernels), with accumulation; under FSDP2
    (whole parameters from the shards, the gradient handed back to them: train/sharded.py) the eager FSDP2 run's."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    runs = {}
    for graph in ("false", "true"):
        run_cli(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "train.py",
                 *tiny_args(tmp_path / graph, **{"training.cuda_graph": graph, "training.device": "cuda",
                                                 "training.distributed": dist_, "ttt.train_mode": mode,
                                                 "training.micro_batch_size": 2, "model.compute_dtype": "float32",
                                                 "model.attention_backend": "triton", "model.fused_kernels": "true",
                                                 "training.eval_every": 0})])
        runs[graph] = [r for r in metrics(tmp_path / graph) if "loss" in r]
    assert len(runs["true"]) == len(runs["false"]) == 8
    for eager, graphed in zip(runs["false"], runs["true"]):
        for key in ("loss", "grad_norm"):
            assert graphed[key] == pytest.approx(eager[key], rel=1e-5, abs=1e-6), (key, eager["step"])


# The graphed micro-step's data parallelism (flat gradient buckets, one all-reduce per step, rank 0's parameters
# broadcast) on the CPU, where the capture itself cannot run: capture=False runs the same step eagerly through the
# same buckets and reduction. Two gloo ranks, each with its own batch, against DDP.

def _tiny_loss_module(seed: int):
    from ttt_e2e.config import ModelConfig, TTTConfig
    from ttt_e2e.train.parallel import LossModule

    torch.manual_seed(seed)
    mcfg = ModelConfig(d_model=32, n_heads=2, mlp_width=64, n_layers=2, seq_length=64, window=32)
    ttt = TTTConfig(mini_batch_size=16, remat_inner=False)
    return LossModule(Transformer(mcfg), ttt)


def _batches(rank: int):
    g = torch.Generator().manual_seed(100 + rank)
    ids = torch.randint(0, 258, (2, 65), generator=g)
    return [(ids[i:i + 1, :-1], ids[i:i + 1, 1:], torch.ones(1, 64, dtype=torch.bool)) for i in range(2)]


def _ddp_vs_flat_grads(rank: int, world: int, init_file: str, out: str):
    import contextlib

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from ttt_e2e.train.graphed import GraphedMicroStep, broadcast_parameters

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        batches = _batches(rank)
        # Each rank starts from other weights: both paths must take rank 0's (DDP's constructor broadcasts).
        ddp_module = _tiny_loss_module(seed=rank)
        ddp = DDP(ddp_module)
        for i, (x, y, m) in enumerate(batches):
            with ddp.no_sync() if i == 0 else contextlib.nullcontext():
                (ddp(x, y, m, 1.0)["loss"] / len(batches)).backward()
        flat_module = _tiny_loss_module(seed=rank)
        broadcast_parameters(flat_module)
        step = GraphedMicroStep(flat_module, contextlib.nullcontext, len(batches), capture=False)
        step.begin()
        for x, y, m in batches:
            step(x, y, m, 1.0)
        step.end()
        torch.save({"ddp": {n: p.grad for n, p in ddp_module.named_parameters()},
                    "flat": {n: p.grad for n, p in flat_module.named_parameters()},
                    "weights": {n: p.detach() for n, p in flat_module.named_parameters()}}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_flat_gradient_all_reduce_equals_ddp_on_two_ranks(tmp_path):
    """Tolerance: fp32, atol 1e-7 / rtol 1e-6 on gradients ~1e-2 (in practice bitwise: the same per-rank
    backward, and the same divide-by-2-then-sum as DDP's reduction; 2 is a power of two, so dividing first is
    exact). A dropped micro-batch, a missing division or a missed rank changes gradients by ~1e-3 and more."""
    import torch.multiprocessing as mp

    mp.spawn(_ddp_vs_flat_grads, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    for name, g in r0["ddp"].items():
        torch.testing.assert_close(r0["flat"][name], g, rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(r1["flat"][name], r1["ddp"][name], rtol=1e-6, atol=1e-7)
        assert torch.equal(r0["flat"][name], r1["flat"][name])  # every rank steps with the same mean
    for name, w in r0["weights"].items():  # rank 1's weights are rank 0's
        assert torch.equal(r1["weights"][name], w), name
    # the reduction really mixed the ranks: a single rank's gradient is not the mean
    solo = _tiny_loss_module(seed=0)
    for x, y, m in _batches(0):
        (solo(x, y, m, 1.0)["loss"] / 2).backward()
    assert not torch.allclose(solo.model.wte.weight.grad, r0["flat"]["model.wte.weight"], atol=1e-6)


def test_failed_capture_falls_back_to_eager_with_a_warning(monkeypatch):
    """A capture that raises (forced here) warns with the reason and runs the same step eagerly, with the
    gradients of a plain eager step (nothing the failed attempt added is kept)."""
    import contextlib

    import ttt_e2e.train.graphed as graphed

    def broken(*args, **kwargs):
        kwargs["zero_grad"]()
        args[0](*args[1:])  # the warm-up runs and adds gradients, then the capture fails
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(graphed, "GraphedStep", broken)
    module = _tiny_loss_module(seed=0)
    step = graphed.GraphedMicroStep(module, contextlib.nullcontext, 2)
    batches = _batches(0)
    step.begin()
    with pytest.warns(RuntimeWarning, match=r"capture failed \(RuntimeError: operation not permitted.*EAGERLY"):
        step(*batches[0], 1.0)
    step(*batches[1], 1.0)
    assert step.graph is None and "operation not permitted" in step.fallback_reason
    ref = _tiny_loss_module(seed=0)
    for x, y, m in batches:
        (ref(x, y, m, 1.0)["loss"] / 2).backward()
    for (name, p), q in zip(module.named_parameters(), ref.parameters()):
        assert torch.equal(p.grad, q.grad), name

