"""One training step of an objective (a Distiller, or a method's pre-training).

A step is a forward under autocast and a backward through the gradient scaler on each
micro-batch; every `accumulate` micro-batches the gradients are unscaled and clipped, the
optimizer and the schedule step, and the gradients are cleared. In a DDP run the objective's
trained parts are wrapped (`distributed.wrap_for_training`) and only the micro-batch that
closes a step synchronises gradients.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any, NamedTuple

import torch
from torch import nn

from featkd import distributed
from featkd.config import TrainConfig
from featkd.errors import ConfigError
from featkd.evaluation import unpack
from featkd.optim import OPTIMIZERS, SCHEDULERS
from featkd.runtime import autocast


def make_optimizer(train_cfg: TrainConfig, params: list[nn.Parameter], steps_per_epoch: int) -> tuple[Any, Any]:
    """The optimizer and schedule a stage's `train:` section names, over `params`."""
    optimizer = OPTIMIZERS.build(train_cfg.optimizer.name, params=params, **train_cfg.optimizer.args)
    scheduler = SCHEDULERS.build(train_cfg.scheduler.name, optimizer=optimizer, steps_per_epoch=steps_per_epoch,
                                 epochs=train_cfg.epochs, **train_cfg.scheduler.args)
    return optimizer, scheduler


class StepResult(NamedTuple):
    out: Any  # the objective's DistillOutput
    finite: bool  # the loss was finite on every process (else no backward ran)
    stop: bool  # a stop was requested on some process


class TrainStep:
    """Trains `objective.trainable_parameters()` with the optimization of `train_cfg`."""

    def __init__(self, objective: Any, train_cfg: TrainConfig, precision: str, device: torch.device,
                 steps_per_epoch: int, channels_last: bool = False) -> None:
        self.params = objective.trainable_parameters()
        self.model = distributed.wrap_for_training(objective, self.params)
        self.optimizer, self.scheduler = make_optimizer(train_cfg, self.params, steps_per_epoch)
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.accumulate, self.grad_clip = train_cfg.accumulate, train_cfg.grad_clip
        #: the optimizer takes the task and distillation gradients apart (DOT)
        self.separates = bool(getattr(self.optimizer, "separates_task_gradient", False))
        check_optimizer(train_cfg, precision)
        self.precision, self.device, self.channels_last = precision, device, channels_last
        self.steps = 0  # optimizer steps taken

    def forward_backward(self, batch: Any, closes_step: bool, stop_requested: bool) -> StepResult:
        """Forward one micro-batch and, if its loss is finite everywhere, backward it; in DDP
        the gradients are averaged only if it `closes_step`."""
        x, y, extras = unpack(batch, self.device, self.channels_last)
        with self._gradient_sync(closes_step):
            with autocast(self.device, self.precision):
                out = self._forward(x, y, extras)
            finite, stop = agreed_flags(out.loss, stop_requested)
            if finite and self.separates and hasattr(out, "split"):
                task, distill = out.split()
                if distill is not None:  # first, so that its gradient can be set aside
                    self.scaler.scale(distill / self.accumulate).backward(retain_graph=task is not None)
                    self.optimizer.set_aside_distillation_gradient()
                if task is not None:
                    self.scaler.scale(task / self.accumulate).backward()
            elif finite:
                self.scaler.scale(out.loss / self.accumulate).backward()
        return StepResult(out, finite, stop)

    def update(self) -> None:
        """Close the step: unscale and clip the gradients, step the optimizer and the schedule."""
        if self.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.steps += 1

    def _forward(self, x: torch.Tensor, y: torch.Tensor, extras: dict[str, Any]) -> Any:
        try:
            return self.model(x, y, **extras)
        except RuntimeError as exc:  # DDP's complaint about a parameter without gradient, explained
            raise distributed.explain_unused_parameters(exc) or exc

    def _gradient_sync(self, closes_step: bool) -> AbstractContextManager:
        """DDP averages gradients only on the micro-batch that closes a step."""
        if closes_step or not isinstance(self.model, nn.parallel.DistributedDataParallel):
            return nullcontext()
        return self.model.no_sync()

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "step": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.steps = state["step"]


def check_optimizer(train_cfg: TrainConfig, precision: str) -> None:
    """What an optimizer that takes the task and distillation gradients apart (DOT) cannot be
    combined with; nothing for the others."""
    name = train_cfg.optimizer.name
    if not getattr(OPTIMIZERS.get(name), "separates_task_gradient", False):
        return
    if precision == "fp16":
        raise ConfigError(f"optimizer {name!r} keeps the distillation gradient aside, outside fp16's gradient "
                          "scaling: use precision bf16 or fp32 with it.")
    if train_cfg.grad_clip:
        raise ConfigError(f"optimizer {name!r} updates with two gradients, which one norm cannot clip as the "
                          "method defines: remove train.grad_clip, or use sgd.")
    if distributed.is_distributed():
        raise ConfigError(f"optimizer {name!r} backpropagates twice per step, which multi-process (DDP) training "
                          "does not support yet: run it in one process.")


def agreed_flags(loss: torch.Tensor, stop_requested: bool) -> tuple[bool, bool]:
    """(loss is finite, a stop was requested), agreed on by every rank."""
    if not distributed.is_distributed():
        return bool(torch.isfinite(loss)), stop_requested
    flags = torch.stack([(~torch.isfinite(loss.detach())).float(),
                         torch.tensor(float(stop_requested), device=loss.device)])
    distributed.all_reduce_sum(flags)
    return not bool(flags[0] > 0), bool(flags[1] > 0)
