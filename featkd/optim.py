"""Optimizer and learning-rate schedule registries.

Schedules are stepped once per optimizer step (not per epoch), so warm-up and cosine decay
are smooth; milestones are still given in epochs, as papers state them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch.optim.lr_scheduler import LambdaLR

from featkd.errors import ConfigError
from featkd.registry import Registry

OPTIMIZERS: Registry = Registry("optimizer")
SCHEDULERS: Registry = Registry("scheduler")


@OPTIMIZERS.register("sgd")
def sgd(params: Iterable, lr: float = 0.05, momentum: float = 0.9, weight_decay: float = 5e-4,
        nesterov: bool = False) -> torch.optim.Optimizer:
    """SGD with momentum (the CIFAR distillation benchmark's optimizer)."""
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)


@OPTIMIZERS.register("adam")
def adam(params: Iterable, lr: float = 1e-3, weight_decay: float = 0.0,
         betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Optimizer:
    """Adam."""
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, betas=betas)


@OPTIMIZERS.register("adamw")
def adamw(params: Iterable, lr: float = 1e-3, weight_decay: float = 0.01,
          betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay)."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas)


class _Schedule:
    """Picklable lr factor: warm-up, then a decay rule, as a function of the step."""

    def __init__(self, steps_per_epoch: int, epochs: int, warmup_epochs: float, rule: str,
                 milestones: Sequence[int] = (), gamma: float = 0.1, min_factor: float = 0.0) -> None:
        self.steps_per_epoch = steps_per_epoch
        self.total = max(1, steps_per_epoch * epochs)
        self.warmup = int(round(warmup_epochs * steps_per_epoch))
        self.rule = rule
        self.milestones = sorted(int(m) * steps_per_epoch for m in milestones)
        self.gamma = gamma
        self.min_factor = min_factor

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.rule == "cosine":
            progress = (step - self.warmup) / max(1, self.total - self.warmup)
            return self.min_factor + (1 - self.min_factor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        if self.rule == "multistep":
            return self.gamma ** sum(step >= m for m in self.milestones)
        return 1.0


@SCHEDULERS.register("constant")
def constant(optimizer: torch.optim.Optimizer, steps_per_epoch: int, epochs: int,
             warmup_epochs: float = 0.0) -> LambdaLR:
    """Constant learning rate (after an optional linear warm-up)."""
    return LambdaLR(optimizer, _Schedule(steps_per_epoch, epochs, warmup_epochs, "constant"))


@SCHEDULERS.register("cosine")
def cosine(optimizer: torch.optim.Optimizer, steps_per_epoch: int, epochs: int,
           warmup_epochs: float = 0.0, min_factor: float = 0.0) -> LambdaLR:
    """Cosine decay to min_factor x lr over the run, after an optional linear warm-up."""
    return LambdaLR(optimizer, _Schedule(steps_per_epoch, epochs, warmup_epochs, "cosine", min_factor=min_factor))


@SCHEDULERS.register("multistep")
def multistep(optimizer: torch.optim.Optimizer, steps_per_epoch: int, epochs: int,
              milestones: tuple[int, ...] = (150, 180, 210), gamma: float = 0.1,
              warmup_epochs: float = 0.0) -> LambdaLR:
    """Multiply the lr by gamma at each milestone epoch (the benchmark: 150, 180, 210 of 240)."""
    if any(m <= 0 for m in milestones):
        raise ConfigError(f"multistep: milestones are epochs >= 1, got {list(milestones)}.")
    return LambdaLR(optimizer, _Schedule(steps_per_epoch, epochs, warmup_epochs, "multistep", milestones, gamma))
