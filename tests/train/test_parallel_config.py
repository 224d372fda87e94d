"""FSDP2 in one process (a 1-rank process group), and the parallel settings refused with one-line errors."""
import pytest
import torch

from ttt_e2e.config import ConfigError
from ttt_e2e.train import trainer
from ttt_e2e.train.distributed import DistInfo
from ttt_e2e.train.trainer import train


@pytest.mark.parametrize("remat", ["false", "true"])
def test_fsdp_in_one_process_meta_equals_plain(compose, tmp_path, metrics, remat):
    """`python train.py training.distributed=fsdp` (no launcher) makes a 1-rank group and trains exactly as the
    plain run: the same losses and weights, bitwise (one rank: the shards are the whole tensors); also with the
    inner steps and the (sharded) prefix blocks recomputed in the backward, as the 3B configuration runs."""
    base = {"training.steps": 3, "training.eval_every": 0, "ttt.remat_inner": remat, "ttt.remat_prefix": remat}
    train(compose(**base), tmp_path / "plain")
    train(compose(**base, **{"training.distributed": "fsdp"}), tmp_path / "fsdp")
    assert not torch.distributed.is_initialized()  # torn down after the run
    losses = [[r["loss"] for r in metrics(tmp_path / d) if "loss" in r] for d in ("plain", "fsdp")]
    assert len(losses[0]) == 3 and losses[0] == losses[1]
    a, b = (torch.load(tmp_path / d / "checkpoints" / "step_00000003" / "model.pt") for d in ("plain", "fsdp"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("setting, message", [
    ({"training.fsdp_cpu_offload": "true"}, "training.fsdp_cpu_offload=true needs training.distributed=fsdp"),
    ({"training.distributed": "fsdp", "training.compile": "true"},
     "training.compile=true with training.distributed=fsdp is offered in pretrain mode only"),
    ({"training.distributed": "fsdp", "training.fsdp_cpu_offload": "true", "training.device": "cpu"},
     "training.fsdp_cpu_offload=true offloads from a GPU to the CPU: it needs a CUDA device"),
    ({"training.distributed": "fsdp", "training.fsdp_cpu_offload": "true", "training.cuda_graph": "true"},
     "cuda_graph=true does not compose with training.fsdp_cpu_offload=true"),
])
def test_unsupported_parallel_options_are_refused(compose, tmp_path, setting, message):
    with pytest.raises(ConfigError, match=message) as e:
        train(compose(**setting), tmp_path / "run")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_world_size_that_does_not_divide_the_global_batch(compose, tmp_path, monkeypatch):
    """3 ranks for a global batch of 4 (the launcher's world size, here stood in for): refused before training."""
    monkeypatch.setattr(trainer, "init_distributed", lambda *a, **k: DistInfo(0, 3, 0, torch.device("cpu")))
    with pytest.raises(ConfigError, match=r"training.global_batch_size=4 is not divisible by the 3 ranks"):
        train(compose(), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_slurm_variables_become_torchrun_ones(monkeypatch):
    """A task of a 2-node x 4-task Slurm job (hydra-submitit-launcher, no torchrun): RANK / WORLD_SIZE / LOCAL_RANK
    / MASTER_ADDR / MASTER_PORT derived from SLURM_*, and CUDA_VISIBLE_DEVICES left as Slurm set it."""
    from ttt_e2e.train.distributed import _export_slurm_env

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(k, "x")
        monkeypatch.delenv(k)  # absent now, and absent again after the test
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "x")
    monkeypatch.delenv("SUBMITIT_EXECUTOR")  # a plain srun job: submitit did not launch it
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "8", "SLURM_PROCID": "6", "SLURM_LOCALID": "2",
             "SLURM_NODEID": "1", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "gpu[07-08]",
             "SLURM_STEP_NODELIST": "gpu[07-08]"}
    for k, v in slurm.items():
        monkeypatch.setenv(k, v)
    _export_slurm_env()
    import os

    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("6", "8", "2")
    assert os.environ["MASTER_ADDR"] == "gpu07" and 20000 <= int(os.environ["MASTER_PORT"]) <= 60000
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"
