"""The trainer: outer loop, parallelism, checkpoints, logging (train.py and eval.py are thin Hydra/CLI shells).

    distributed.py  ranks, devices, process group (torchrun or Slurm/submitit), small collectives
    parallel.py     LossModule (what DDP/FSDP2 wrap), DDP / FSDP2 wrapping, torch.compile
    data.py         tokenizer -> cached stream -> train/val windows -> per-rank batches
    optim.py        AdamW parameter groups, warmup + cosine schedule
    checkpoint.py   atomic checkpoints with a `latest` pointer, exact resume, params-only init
    metrics.py      metrics.jsonl and wandb loggers
    flops.py        FLOPs per token (the convention, incl. the meta-mode suffix) and MFU
    evaluate.py     validation loss, mean and by token position
    trainer.py      the loop
"""
