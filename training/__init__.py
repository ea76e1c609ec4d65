"""Training: LongLLaVA's progressive stages and trajectory fine-tuning, on one process or Ray Train.

Modules, in the order data flows through them:

    data          LLaVA-format JSON/JSONL records, read lazily; bad samples skipped and counted
    collate       conversations to token ids and labels (answers + EOS only), right-padded batches
    loss          the differentiable forward: tower, projector, splice, HybridLM.forward_batch
    stages        what each stage trains and freezes
    config        TrainConfig: one typed config per run
    state         resumable checkpoints (LongLLaVA layout + optimizer), without pickle
    trainer       the loop: data order by step, grad accumulation, eval, JSONL metrics, resume
    distributed   the same loop on Ray Train workers (TorchTrainer, DDP)
    trajectories  envs.rollout recordings as agent-format training records
    synthetic     LLaVA-format data rendered from the envs' screens
    pipeline      the embedded demo model, end to end

Entry point: ``python -m training <stage> ...`` (see ``training/__main__.py``).
training imports model, and envs for its data; model imports nothing of it.
"""
