"""The training loop of one stage: epochs of steps, evaluation, checkpoints that resume
exactly, non-finite losses and graceful interruption.

    fit(objective, train_loader, test_loader, settings, device, logger)

`objective` is a Distiller, or a method's pre-training (`distiller.pretraining(name)`): what
it trains, `objective.trainable_parameters()`, is optimized by a `TrainStep`; its student, as it answers
at inference (`objective.deployed`: with the head SimKD gives it), is evaluated after each epoch.

A checkpoint written mid-epoch (on SIGINT/SIGTERM) holds the random state at the start of
the epoch and the number of batches done: resuming re-creates the epoch's data iterator from
that state and replays the finished batches without training on them, so the data order and
augmentations continue as if nothing had happened; then the random state of the moment of
interruption is restored. A resumed run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import math
import re
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from featkd import distributed
from featkd.checkpoint import save_checkpoint
from featkd.config import TrainConfig
from featkd.errors import FeatkdError
from featkd.evaluation import evaluate
from featkd.heads import head_payload
from featkd.logging import Logger
from featkd.runtime import rng_state, set_rng_state
from featkd.step import TrainStep


class Interrupted(Exception):
    """A stop was requested (SIGINT/SIGTERM); the stage's checkpoint has been written."""

    def __init__(self, signum: int, stage: str, epoch: int, batch: int, checkpoint: Path | None) -> None:
        self.signum, self.stage, self.epoch, self.batch, self.checkpoint = signum, stage, epoch, batch, checkpoint
        super().__init__(f"{signal.Signals(signum).name} received during stage {stage!r} (epoch {epoch}, after "
                         f"batch {batch}); checkpoint written to {checkpoint}")


class NonFiniteLoss(FeatkdError):
    """A loss term became NaN or infinite; the run stops and keeps its last good checkpoint."""


@dataclass
class StageResult:
    """How one trained model did on the test set: `last_acc` after the final epoch, `best_acc`
    at the best epoch, chosen by validation top-1 when the data has a validation split (else by
    test top-1, which is optimistic); `val_acc` and `best_val_acc` are validation top-1."""

    stage: str
    best_acc: float
    best_epoch: int
    last_acc: float
    epochs: int
    seconds: float
    checkpoint: str | None = None
    skipped_steps: int = 0
    val_acc: float | None = None
    best_val_acc: float | None = None


@dataclass
class StageSettings:
    """What one call of `fit` does."""

    name: str
    train: TrainConfig
    precision: str = "fp32"
    nonfinite: str = "error"
    evaluate_student: bool = True
    checkpoints: dict[str, Path] = field(default_factory=dict)  # "last", "best"
    record: dict[str, Any] = field(default_factory=dict)  # extra data saved in every checkpoint
    progress: bool = True
    epoch_lines: bool = False
    channels_last: bool = False
    #: called with the epoch and the optimizer step after each epoch is logged (W&B pictures)
    epoch_end: Callable[[int, int], None] | None = None


# -- signals -----------------------------------------------------------------------------


class StopRequest:
    """SIGINT/SIGTERM set a flag that the loop checks after each step; a second SIGINT
    interrupts at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        if distributed.rank() == 0:
            print(f"\nfeatkd: {signal.Signals(signum).name} received; finishing the step and writing a "
                  "checkpoint (press Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


NO_STOP = StopRequest()


# -- where the loop is -------------------------------------------------------------------


@dataclass
class LoopState:
    """Where a stage's loop is: what its checkpoints save, besides weights and optimizer."""

    epoch: int = 0  # epochs finished
    batch: int = 0  # micro-batches of the next epoch done (a checkpoint written mid-epoch)
    skipped: int = 0  # steps skipped for a non-finite loss
    best_acc: float = -1.0
    best_epoch: int = 0
    last_acc: float = float("nan")
    val_acc: float | None = None  # validation top-1 of the last epoch, with a validation split
    best_val_acc: float | None = None
    sums: dict[str, torch.Tensor] = field(default_factory=dict)  # this epoch's running sums of the logged values
    counted: int = 0  # micro-batches in `sums` (skipped ones are not)
    epoch_rng: dict[str, Any] | None = None  # random state at the start of this epoch

    def start_epoch(self) -> None:
        self.sums, self.counted, self.epoch_rng = {}, 0, rng_state()

    def add(self, out: Any) -> None:
        """Add a step's losses (and, when they say more, its parts) to this epoch's sums."""
        values = {"loss": out.loss.detach(), **{f"loss/{k}": v.detach() for k, v in out.losses.items()}}
        if len(out.losses) > 1 or any(k not in out.losses for k in out.parts):
            values.update({f"raw/{k}": v for k, v in out.parts.items()})
        for key, value in values.items():
            value = value.float()
            self.sums[key] = self.sums[key] + value if key in self.sums else value.clone()
        self.counted += 1

    def epoch_means(self, device: torch.device) -> dict[str, float]:
        """This epoch's mean of every logged value over all processes' counted batches."""
        count = distributed.all_reduce_sum(torch.tensor([float(max(self.counted, 1))], device=device))
        return {f"train/{k}": distributed.all_reduce_sum(v).item() / count.item() for k, v in self.sums.items()}

    def checkpoint(self, objective: Any, step: TrainStep, batch: int, record: dict[str, Any]) -> dict[str, Any]:
        """Everything a resume needs, after `batch` micro-batches of epoch `self.epoch + 1`."""
        state = objective.state_dict()
        return {
            **record, "epoch": self.epoch, "batch": batch, "skipped": self.skipped, **step.state_dict(),
            "model": {k.removeprefix("student."): v for k, v in state.items() if k.startswith("student.")},
            "distiller": {k: v for k, v in state.items() if not k.startswith("student.")},
            "head": head_payload(objective.deployed),
            "best_acc": self.best_acc, "best_epoch": self.best_epoch, "last_acc": self.last_acc,
            "val_acc": self.val_acc, "best_val_acc": self.best_val_acc,
            "sums": {k: v.detach().cpu() for k, v in self.sums.items()} if batch else {}, "counted": self.counted,
            "epoch_rng": self.epoch_rng if batch else None, "rng": rng_state(),
            "metrics": {"acc": self.last_acc, "best_acc": self.best_acc, "best_epoch": self.best_epoch},
        }

    @classmethod
    def resume(cls, payload: dict[str, Any], objective: Any, step: TrainStep, device: torch.device) -> LoopState:
        """The loop state of a checkpoint, with the objective and the step restored from it."""
        restore_weights(objective, payload)
        step.load_state_dict(payload)
        mid_epoch = payload["batch"] > 0
        state = cls(payload["epoch"], payload["batch"], payload["skipped"], payload["best_acc"],
                    payload["best_epoch"], payload["last_acc"], payload.get("val_acc"), payload.get("best_val_acc"))
        if mid_epoch:
            state.sums = {k: v.to(device) for k, v in payload["sums"].items()}
            state.counted, state.epoch_rng = payload["counted"], payload["epoch_rng"]
        else:
            set_rng_state(payload["rng"])
        return state


def restore_weights(objective: Any, payload: dict[str, Any]) -> None:
    """Load a checkpoint's student and other trained state into `objective`."""
    objective.load_state_dict({**{f"student.{k}": v for k, v in payload["model"].items()}, **payload["distiller"]})


# -- the loop ----------------------------------------------------------------------------


def fit(
    objective: Any,
    train_loader: DataLoader,
    test_loader: DataLoader,
    settings: StageSettings,
    device: torch.device,
    logger: Logger,
    resume: dict[str, Any] | None = None,
    stop: StopRequest = NO_STOP,
    val_loader: DataLoader | None = None,
) -> StageResult:
    """Train `objective` for `settings.train.epochs` epochs, evaluating its student after
    each (on the validation set too, if given: it then chooses the best epoch); `resume` is a
    checkpoint of this stage to continue from."""
    cfg = settings.train
    batches = len(train_loader)
    step = TrainStep(objective, cfg, settings.precision, device, math.ceil(batches / cfg.accumulate),
                     settings.channels_last)
    loop = LoopState.resume(resume, objective, step, device) if resume is not None else LoopState()
    progress = Progress(settings, batches, loop)
    started = time.perf_counter()
    with warnings.catch_warnings(), progress:
        # a skipped fp16 step (inf gradients) makes torch warn that the schedule stepped alone
        warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
        for epoch in range(loop.epoch + 1, cfg.epochs + 1):
            epoch_start = time.perf_counter()
            train_epoch(objective, train_loader, step, loop, settings, progress, stop, resume)
            resume = None
            metrics = {**loop.epoch_means(device), "epoch": epoch, "lr": step.optimizer.param_groups[0]["lr"],
                       "time/train_s": time.perf_counter() - epoch_start}
            if loop.skipped:
                metrics["train/skipped_steps"] = loop.skipped
            improved = settings.evaluate_student and evaluate_epoch(objective.deployed, test_loader, val_loader,
                                                                    device, settings, loop, metrics)
            metrics["time/epoch_s"] = time.perf_counter() - epoch_start
            loop.epoch = epoch
            # the checkpoint first, with the log line it covers (a resume writes it if a kill came between)
            state = loop.checkpoint(objective, step, 0, settings.record | {"stage": settings.name, "logged": metrics})
            write_checkpoint(settings, "last", state)
            if improved:
                write_checkpoint(settings, "best", state)
            if epoch in cfg.checkpoint_epochs:
                write_checkpoint(settings, f"epoch{epoch}", state)
            logger.log(metrics, step.steps)
            if settings.epoch_end is not None:
                settings.epoch_end(epoch, step.steps)
            progress.epoch_line(epoch, metrics)
    last = settings.checkpoints.get("last")
    return StageResult(settings.name, loop.best_acc, loop.best_epoch, loop.last_acc, cfg.epochs,
                       time.perf_counter() - started, str(last) if last else None, loop.skipped, loop.val_acc,
                       loop.best_val_acc)


def train_epoch(objective: Any, loader: DataLoader, step: TrainStep, loop: LoopState, settings: StageSettings,
                progress: Progress, stop: StopRequest, resume: dict[str, Any] | None = None) -> None:
    """The training part of epoch `loop.epoch + 1` (continued from `resume` mid-epoch)."""
    epoch = loop.epoch + 1
    objective.train()
    objective.set_epoch(epoch)
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    first = loop.batch if resume is not None else 0
    if first:
        set_rng_state(loop.epoch_rng)
    else:
        loop.start_epoch()
    batches = iter(loader)
    for _ in range(first):  # replay the data order and augmentations of the finished batches
        next(batches)
    if first:
        set_rng_state(resume["rng"])
    loop.batch = 0
    total = len(loader)
    for index in range(first, total):
        closes_step = (index + 1) % settings.train.accumulate == 0 or index == total - 1
        result = step.forward_backward(next(batches), closes_step, stop.signum is not None)
        if result.finite:
            loop.add(result.out)
        elif settings.nonfinite == "error":
            raise NonFiniteLoss(nonfinite_message(result.out, settings, epoch, step.steps, index))
        else:
            loop.skipped += 1
        if closes_step:
            step.update()
        progress.step(index, epoch, loop)
        if result.stop and closes_step:
            # even after the epoch's last batch: the resumed run replays it, then evaluates and logs the epoch
            write_checkpoint(settings, "last", loop.checkpoint(objective, step, index + 1,
                                                               settings.record | {"stage": settings.name}))
            raise Interrupted(stop.signum or signal.SIGTERM, settings.name, epoch, index + 1,
                              settings.checkpoints.get("last"))


def evaluate_epoch(student: Any, test_loader: DataLoader, val_loader: DataLoader | None, device: torch.device,
                   settings: StageSettings, loop: LoopState, metrics: dict[str, Any]) -> bool:
    """Evaluate the student into `metrics` and the loop's best; True if the epoch is the best
    so far, by validation top-1 when there is a validation set, else by test top-1."""
    test = evaluate(student, test_loader, device, settings.precision, channels_last=settings.channels_last)
    loop.last_acc = test["acc"]
    metrics.update({"test/acc": test["acc"], "test/loss": test["loss"]})
    if val_loader is not None:
        val = evaluate(student, val_loader, device, settings.precision, channels_last=settings.channels_last)
        loop.val_acc = val["acc"]
        metrics.update({"val/acc": val["acc"], "val/loss": val["loss"]})
        improved = loop.best_val_acc is None or val["acc"] > loop.best_val_acc
        if improved:
            loop.best_val_acc = val["acc"]
        metrics["val/best_acc"] = loop.best_val_acc
    else:
        improved = test["acc"] > loop.best_acc
    if improved:
        loop.best_acc, loop.best_epoch = test["acc"], metrics["epoch"]
    metrics["test/best_acc"] = loop.best_acc
    return improved


def write_checkpoint(settings: StageSettings, kind: str, state: dict[str, Any]) -> None:
    """Rank 0 writes the stage's `kind` checkpoint ("last", "best", or "epoch<N>" beside
    "last": `<stage>-epoch<N>.pt`); every rank waits for it."""
    last = settings.checkpoints.get("last")
    path = settings.checkpoints.get(kind) or (last.with_name(last.name.replace("last", kind)) if last else None)
    if path is not None and distributed.rank() == 0:
        save_checkpoint(path, state)
    distributed.barrier()


def nonfinite_message(out: Any, settings: StageSettings, epoch: int, step: int, batch: int) -> str:
    bad = [name for name, value in out.losses.items() if not bool(torch.isfinite(value))] or ["(total)"]
    last = settings.checkpoints.get("last")
    kept = f"the last good checkpoint is {last} (end of epoch {epoch - 1})" if last and epoch > 1 else \
        "no checkpoint of this stage was written yet"
    return (f"stage {settings.name!r}: loss term {', '.join(repr(b) for b in bad)} is not finite at optimizer step "
            f"{step + 1} (epoch {epoch}, batch {batch + 1}). Stopped; {kept}. Lower the learning rate, set "
            "train.grad_clip, check the term's weight, or set `nonfinite: skip` to skip such steps.")


class Progress:
    """A live bar on a terminal (rank 0), or one line per epoch where there is none."""

    def __init__(self, settings: StageSettings, batches: int, loop: LoopState) -> None:
        self.settings, self.batches = settings, batches
        self.live = settings.progress and sys.stderr.isatty() and distributed.rank() == 0
        self.bar = tqdm(total=settings.train.epochs * batches, initial=loop.epoch * batches + loop.batch,
                        desc=settings.name, unit="step", disable=not self.live, leave=False, dynamic_ncols=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()

    def step(self, index: int, epoch: int, loop: LoopState) -> None:
        self.bar.update(1)
        if self.live and (index % 10 == 0 or index == self.batches - 1) and loop.counted:
            losses = " ".join(f"{k.removeprefix('loss/')} {v.item() / loop.counted:.3g}" for k, v in loop.sums.items()
                              if k.startswith("loss"))
            accuracy = f" acc {loop.last_acc:.1f}" if epoch > 1 and self.settings.evaluate_student else ""
            self.bar.set_postfix_str(f"epoch {epoch}/{self.settings.train.epochs} {losses}{accuracy}", refresh=False)

    def epoch_line(self, epoch: int, metrics: dict[str, Any]) -> None:
        if not (self.settings.progress and self.settings.epoch_lines and not self.live and distributed.rank() == 0):
            return
        terms = " ".join(f"{k.removeprefix('train/loss/')} {v:.3g}" for k, v in metrics.items()
                         if k.startswith("train/loss/"))
        accuracy = f" top-1 {metrics['test/acc']:.2f}% (best {metrics['test/best_acc']:.2f}%)" \
            if "test/acc" in metrics else ""
        print(f"{self.settings.name} epoch {epoch}/{self.settings.train.epochs}: loss "
              f"{metrics.get('train/loss', float('nan')):.3g} ({terms}){accuracy}", flush=True)
