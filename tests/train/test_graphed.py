"""training.cuda_graph (and model.fused_kernels, resolved with it): refused where it cannot work; on a GPU, the
same training as the eager path."""
import pytest
import torch

from ttt_e2e.config import ConfigError
from ttt_e2e.train.distributed import DistInfo
from ttt_e2e.model.attention import Attention
from ttt_e2e.model.layers import RMSNorm, SwiGLU
from ttt_e2e.model.transformer import Transformer
from ttt_e2e.train.graphed import use_cuda_graph, use_fused_kernels
from ttt_e2e.train.trainer import train


def test_cuda_graph_needs_cuda(compose, tmp_path):
    with pytest.raises(ConfigError, match="training.cuda_graph=true needs a CUDA device"):
        train(compose(**{"training.cuda_graph": "true", "training.device": "cpu"}), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("device, ranks, compile_, setting, expected", [
    ("cuda", 1, "false", "null", True), ("cuda", 2, "false", "null", False), ("cuda", 1, "true", "null", False),
    ("cpu", 1, "false", "null", False), ("cuda", 1, "false", "false", False), ("cuda", 1, "false", "true", True),
])
def test_default_is_on_for_one_gpu(compose, device, ranks, compile_, setting, expected):
    cfg = compose(**{"training.cuda_graph": setting, "training.compile": compile_})
    info = DistInfo(rank=0, world_size=ranks, local_rank=0, device=torch.device(device))
    assert use_cuda_graph(cfg, info) is expected


@pytest.mark.parametrize("mode, graph, setting, expected, ce", [
    ("meta", False, "null", False, True), ("meta", True, "null", True, True), ("pretrain", False, "null", True, True),
    ("meta", False, "true", True, True), ("pretrain", True, "false", False, False),
])
def test_fused_kernels_off_only_for_eager_meta_by_default(compose, mode, graph, setting, expected, ce):
    cfg = compose(**{"ttt.train_mode": mode, "model.fused_kernels": setting})
    assert use_fused_kernels(cfg, graph) == (expected, ce)
    model = Transformer(cfg.model)
    model.use_fused_kernels(expected, ce)
    for kind in (RMSNorm, Attention, SwiGLU):  # every module with a kernel switch follows it
        mods = [m for m in model.modules() if isinstance(m, kind)]
        assert mods and all(m.kernel is expected for m in mods), kind.__name__
    assert model.ce_kernel is ce


def test_explicit_cuda_graph_with_two_ranks_is_refused(compose):
    info = DistInfo(rank=0, world_size=2, local_rank=0, device=torch.device("cuda"))
    with pytest.raises(ConfigError, match="single-GPU only"):
        use_cuda_graph(compose(**{"training.cuda_graph": "true"}), info)


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
