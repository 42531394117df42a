"""Optimizer and learning-rate schedule registries.

Schedules are stepped once per optimizer step (not per epoch), so warm-up and cosine decay
are smooth; milestones are still given in epochs, as papers state them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

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


@OPTIMIZERS.register("dot")
class DistillationOrientedSGD(torch.optim.Optimizer):
    """DOT, the distillation-oriented trainer (Zhao et al., ICCV 2023): SGD whose task and
    distillation gradients keep momentum buffers of their own, the distillation one with more
    momentum (mu + delta) and the task one with less (mu - delta), so that the distillation
    loss, whose gradients agree from step to step, is optimized more thoroughly.

    A training step gives it the two gradients apart: the distillation terms' backward first,
    then `set_aside_distillation_gradient()`, then the task terms' (the terms that need no
    teacher, cross-entropy); `step()` then updates each parameter by

        v_task <- (mu - delta) v_task + g_task + wd * theta
        v_kd   <- (mu + delta) v_kd + g_kd
        theta  <- theta - lr (v_task + v_kd)

    the first step of a buffer taking the gradient as it is (as torch's SGD does). A parameter
    that got only one of the two gradients (an adapter, a loss's head) keeps one buffer with
    momentum mu and its weight decay there, as the authors' code does; a step whose gradients
    were not set apart (a method's pre-training stage) is plain SGD with momentum mu.
    Defaults: mu 0.9 and delta 0.075 (the paper's CIFAR-100 setting).
    """

    #: the training step backpropagates the task and distillation terms apart (`featkd.step`)
    separates_task_gradient = True

    def __init__(self, params: Iterable, lr: float = 0.05, momentum: float = 0.9, delta: float = 0.075,
                 weight_decay: float = 5e-4) -> None:
        if not lr > 0:
            raise ConfigError(f"dot: lr must be > 0, got {lr}.")
        if not (0 <= momentum - delta and momentum + delta < 1):
            raise ConfigError(f"dot: the momenta momentum - delta and momentum + delta must lie in [0, 1); got "
                              f"momentum {momentum} and delta {delta}.")
        if weight_decay < 0:
            raise ConfigError(f"dot: weight_decay must be >= 0, got {weight_decay}.")
        super().__init__(params, {"lr": lr, "momentum": momentum, "delta": delta, "weight_decay": weight_decay})
        self._distillation_grads: dict[torch.Tensor, torch.Tensor] = {}

    @torch.no_grad()
    def set_aside_distillation_gradient(self) -> None:
        """Move the gradients now in `.grad` (the distillation terms') aside, adding them to any
        set aside before in this step (gradient accumulation), and clear `.grad`."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                kept = self._distillation_grads.get(p)
                self._distillation_grads[p] = p.grad.detach().clone() if kept is None else kept.add_(p.grad)
                p.grad = None

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, mu, delta, wd = group["lr"], group["momentum"], group["delta"], group["weight_decay"]
            for p in group["params"]:
                task, distill = p.grad, self._distillation_grads.get(p)
                if task is None and distill is None:
                    continue
                state = self.state[p]
                both = task is not None and distill is not None
                update = torch.zeros_like(p)
                for key, grad, momentum, decays in (("task_momentum", task, mu - delta if both else mu, True),
                                                    ("distillation_momentum", distill, mu + delta if both else mu,
                                                     not both)):
                    if grad is None:
                        continue
                    if decays and wd:
                        grad = grad.add(p, alpha=wd)
                    buffer = state.get(key)
                    if buffer is None:
                        buffer = state[key] = grad.detach().clone()
                    else:
                        buffer.mul_(momentum).add_(grad)
                    update.add_(buffer)
                p.add_(update, alpha=-lr)
        self._distillation_grads.clear()
        return loss


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
