"""The trainer: outer loop, parallelism, checkpoints, logging (train.py and eval.py are thin Hydra/CLI shells).

    distributed.py  ranks, devices, process group (torchrun or Slurm/submitit), small collectives
    plan.py         the run's plan, resolved once (parallelism, CUDA graphs, compile, kernels) and its rules
    parallel.py     LossModule (what DDP/FSDP2 wrap), DDP / FSDP2 wrapping, torch.compile
    step.py         the micro-step (eager or graphed), chosen from the plan with its wrapper
    graphed.py      the graphed micro-step: capture, flat gradient buckets, their all-reduce
    sharded.py      the graphed micro-step under FSDP2: whole parameters from the shards, gradients back
    spikes.py       the spike guard's verdicts (apply, skip, roll back, stop) and its snapshots
    data.py         tokenizer -> cached stream -> train/val windows -> per-rank batches
    optim.py        AdamW parameter groups, warmup + cosine schedule
    checkpoint.py   atomic checkpoints with a `latest` pointer, exact resume, params-only init
    metrics.py      metrics.jsonl and wandb loggers
    flops.py        FLOPs per token (the convention, incl. the meta-mode suffix) and MFU
    evaluate.py     validation loss, mean and by token position
    trainer.py      the loop
"""
