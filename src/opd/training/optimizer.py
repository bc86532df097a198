"""The student's optimizer and learning-rate schedule: AdamW over the trainable parameters, linear warmup, then
constant or cosine to a floor; after a resume the config's settings are put back on the restored state."""

from __future__ import annotations

import math

import torch

from ..parallel.sharding import local_part
from .errors import TrainingError


def build_optimizer(cfg, model: torch.nn.Module):
    t = cfg.train
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainingError("the student has no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)

    def lr_factor(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / (t.warmup_steps + 1)
        if t.schedule == "constant":
            return 1.0
        progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * cosine

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)


def apply_optimizer_settings(cfg, optimizer, scheduler) -> None:
    """After restoring a checkpoint: the config's lr, betas and weight decay (unchanged ones are a no-op), so an
    allowed change takes effect instead of the checkpoint's values silently winning."""
    t = cfg.train
    scheduler.base_lrs = [t.lr for _ in optimizer.param_groups]
    for group, factor in zip(optimizer.param_groups, [fn(scheduler.last_epoch) for fn in scheduler.lr_lambdas]):
        group.update(lr=t.lr * factor, betas=t.betas, weight_decay=t.weight_decay)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def weights_finite(params: list[torch.Tensor]) -> bool:
    """Whether this rank's weights (its shards, when sharded) are all finite."""
    norms = torch._foreach_norm([local_part(p.detach()) for p in params])
    return bool(torch.isfinite(torch.stack(norms)).all())
