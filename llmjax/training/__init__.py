"""Training: a config becomes a run, the run trains, evaluates, checkpoints and exports.

    setup.py        the one place a config becomes a run: mesh, rules, optimizer, state
                    layout, jitted steps, init_from, frozen (LoRA) weights, data
    loop.py         train_and_evaluate: the train loop, top to bottom
    state.py        TrainState and its layout (abstract shapes and shardings)
    tasks.py        what a run optimises: the lm and classify losses and eval outputs
    step.py         train_step (gradient accumulation) and eval_step, pure functions
    evaluation.py   aggregating an eval step; evaluating a workdir's checkpoint
    optimizer.py    optax schedules, optimizers, weight-decay mask
    lora.py         what trains: LoRA adapters, trained heads, merging
    peft_methods.py config.peft.method: LoRA, or prefix / prompt virtual tokens alone
    init_from.py    runs that start from another model; the model of a stored run
    restore.py      models from a run's checkpoints or an HF directory
    convert.py      run directories <-> Hugging Face directories (import, export)
    checkpoint.py   Orbax checkpoints; resuming from the newest one that restores
    metrics.py      writers (TensorBoard, metrics.jsonl, console), tokens/s, MFU
    early_stopping.py  early stopping on an eval metric, the best step
    nonfinite.py    what a NaN/inf step does: stop the run, or skip it and count it
    memory.py       the fit check (--compile_only): per-device memory and FLOPs, the
                    verdict for a chip, the memory levers' layouts that fit
    accelerators.py the chips: memory and peak FLOP/s per chip (fit check, MFU)
    flops.py        peak FLOP/s per device, for MFU (a fixed nominal peak on CPU)
    benchmark.py, benchmark_reference.py   timing the train step, beside other stacks
"""
