"""The training loop of one stage: mixed precision, gradient accumulation and clipping,
non-finite losses, DDP, graceful interruption, and checkpoints that resume exactly.

A checkpoint written mid-epoch (on SIGINT/SIGTERM) holds the random state at the start of
the epoch and the number of batches done: resuming re-creates the epoch's data iterator from
that state and replays the finished batches without training on them, so the data order and
augmentations continue as if nothing had happened; then the random state of the moment of
interruption is restored. A resumed run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import math
import random
import re
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from featkd import distributed
from featkd.capture import _glob_to_regex
from featkd.checkpoint import save_checkpoint
from featkd.config import TrainConfig
from featkd.distiller import Distiller, DistillOutput, logits_of
from featkd.errors import FeatkdError
from featkd.logging import Logger
from featkd.optim import OPTIMIZERS, SCHEDULERS

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


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
    """How one trained model did; `best_acc` is the best epoch's, `last_acc` the final one's."""

    stage: str
    best_acc: float
    best_epoch: int
    last_acc: float
    epochs: int
    seconds: float
    checkpoint: str | None = None
    skipped_steps: int = 0


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


# -- random state ------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch random states as checkpoint-safe data."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, state, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": version, "state": list(state), "gauss": gauss},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


# -- pieces ------------------------------------------------------------------------------


def unpack(batch: Any, device: torch.device, channels_last: bool = False
           ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(inputs, labels, extra fields) of a batch, on `device`; extras come from dataset wrappers."""
    x, y, *rest = batch
    extras = rest[0] if rest and isinstance(rest[0], dict) else {}
    moved = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in extras.items()}
    x = x.to(device, non_blocking=True)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=True), moved


def make_optimizer(train_cfg: TrainConfig, params: list[nn.Parameter], steps_per_epoch: int):
    optimizer = OPTIMIZERS.build(train_cfg.optimizer.name, params=params, **train_cfg.optimizer.args)
    scheduler = SCHEDULERS.build(train_cfg.scheduler.name, optimizer=optimizer, steps_per_epoch=steps_per_epoch,
                                 epochs=train_cfg.epochs, **train_cfg.scheduler.args)
    return optimizer, scheduler


@contextmanager
def frozen(model: nn.Module, freeze: list[str], unfreeze: list[str]) -> Iterator[None]:
    """Parameters matching `freeze` globs (then not matching `unfreeze`) stop learning inside
    this block; their previous flags come back afterwards."""
    if not freeze:
        yield
        return
    freeze_re = [_glob_to_regex(p) for p in freeze]
    unfreeze_re = [_glob_to_regex(p) for p in unfreeze]
    changed = []
    for name, param in model.named_parameters():
        if any(r.match(name) for r in freeze_re) and not any(r.match(name) for r in unfreeze_re):
            if param.requires_grad:
                param.requires_grad_(False)
                changed.append(param)
    try:
        yield
    finally:
        for param in changed:
            param.requires_grad_(True)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, precision: str = "fp32",
             reference: nn.Module | None = None, channels_last: bool = False) -> dict[str, float]:
    """Top-1 accuracy (%) and mean cross-entropy on `loader`, summed over all ranks; with
    `reference`, also the % of samples where both models predict the same class."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(4, dtype=torch.float64, device=device)  # correct, total, loss sum, agree
    dtype = AUTOCAST_DTYPES.get(precision)
    try:
        for batch in loader:
            x, y, _ = unpack(batch, device, channels_last)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                logits = logits_of(model(x)).float()
                other = logits_of(reference(x)).argmax(1) if reference is not None else None
            pred = logits.argmax(1)
            counts[0] += (pred == y).sum()
            counts[1] += len(y)
            counts[2] += nn.functional.cross_entropy(logits, y, reduction="sum")
            if other is not None:
                counts[3] += (pred == other).sum()
    finally:
        model.train(was_training)
    distributed.all_reduce_sum(counts)
    total = max(1.0, counts[1].item())
    return {"acc": 100.0 * counts[0].item() / total, "loss": counts[2].item() / total,
            "agreement": 100.0 * counts[3].item() / total}


def _accumulate(sums: dict[str, torch.Tensor], out: DistillOutput) -> None:
    values = {"loss": out.loss.detach(), **{f"loss/{k}": v.detach() for k, v in out.losses.items()}}
    if len(out.losses) > 1 or any(k not in out.losses for k in out.parts):
        values.update({f"raw/{k}": v for k, v in out.parts.items()})
    for key, value in values.items():
        value = value.float()
        sums[key] = sums[key] + value if key in sums else value.clone()


# -- one stage ---------------------------------------------------------------------------


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


def fit(
    distiller: Distiller,
    train_loader: DataLoader,
    test_loader: DataLoader,
    settings: StageSettings,
    device: torch.device,
    logger: Logger,
    parameters: list[nn.Parameter] | None = None,
    resume: dict[str, Any] | None = None,
    stop: StopRequest = NO_STOP,
) -> StageResult:
    """Train `parameters` (default: the Distiller's trainable ones) for `settings.train.epochs`
    epochs, evaluating the trained model each epoch; `resume` is a checkpoint of this stage."""
    cfg = settings.train
    params = parameters if parameters is not None else [p for p in distiller.parameters() if p.requires_grad]
    ddp = distributed.is_distributed() and any(p.requires_grad for p in distiller.parameters())
    model: nn.Module = (nn.parallel.DistributedDataParallel(distiller, find_unused_parameters=True)
                        if ddp else distiller)
    micro_per_epoch = len(train_loader)
    steps_per_epoch = math.ceil(micro_per_epoch / cfg.accumulate)
    optimizer, scheduler = make_optimizer(cfg, params, steps_per_epoch)
    dtype = AUTOCAST_DTYPES.get(settings.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=settings.precision == "fp16")
    sampler = getattr(train_loader, "sampler", None)

    best_acc, best_epoch, last_acc, step, skipped = -1.0, 0, float("nan"), 0, 0
    start_epoch, start_batch = 1, 0
    sums: dict[str, torch.Tensor] = {}
    counted = 0  # batches of this epoch in `sums` (skipped ones are not)
    epoch_rng: dict[str, Any] | None = None
    if resume is not None:
        distiller.load_state_dict({**{f"student.{k}": v for k, v in resume["model"].items()}, **resume["distiller"]})
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        scaler.load_state_dict(resume["scaler"])
        best_acc, best_epoch, last_acc = resume["best_acc"], resume["best_epoch"], resume["last_acc"]
        step, skipped = resume["step"], resume["skipped"]
        start_epoch, start_batch = resume["epoch"] + 1, resume["batch"]
        if start_batch:
            sums = {k: v.to(device) for k, v in resume["sums"].items()}
            counted = resume["counted"]
            epoch_rng = resume["epoch_rng"]
        else:
            set_rng_state(resume["rng"])

    started = time.perf_counter()
    live = settings.progress and sys.stderr.isatty() and distributed.rank() == 0
    bar = tqdm(total=cfg.epochs * micro_per_epoch, initial=(start_epoch - 1) * micro_per_epoch + start_batch,
               desc=settings.name, unit="step", disable=not live, leave=False, dynamic_ncols=True)

    def checkpoint_state(epoch_done: int, batch: int, rng_now: dict[str, Any]) -> dict[str, Any]:
        return {
            **settings.record,
            "stage": settings.name, "epoch": epoch_done, "batch": batch, "step": step, "skipped": skipped,
            "model": distiller.student.state_dict(),
            "distiller": {k: v for k, v in distiller.state_dict().items() if not k.startswith("student.")},
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
            "best_acc": best_acc, "best_epoch": best_epoch, "last_acc": last_acc,
            "sums": {k: v.detach().cpu() for k, v in sums.items()} if batch else {}, "counted": counted,
            "epoch_rng": epoch_rng if batch else None, "rng": rng_now,
            "metrics": {"acc": last_acc, "best_acc": best_acc, "best_epoch": best_epoch},
        }

    def write(kind: str, state: dict[str, Any]) -> None:
        if kind in settings.checkpoints and distributed.rank() == 0:
            save_checkpoint(settings.checkpoints[kind], state)
        distributed.barrier()

    quiet = warnings.catch_warnings()
    quiet.__enter__()
    # a skipped fp16 step (inf gradients) makes torch warn that the schedule stepped alone
    warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
    try:
        for epoch in range(start_epoch, cfg.epochs + 1):
            distiller.train()
            distiller.set_epoch(epoch)
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
            resuming = epoch == start_epoch and start_batch > 0
            if resuming:
                set_rng_state(epoch_rng)
            else:
                epoch_rng = rng_state()
                sums, counted = {}, 0
            epoch_start = time.perf_counter()
            batches = iter(train_loader)
            first = start_batch if resuming else 0
            for _ in range(first):  # replay the data order and augmentations of the finished batches
                next(batches)
            if resuming:
                set_rng_state(resume["rng"])
            for batch_index in range(first, micro_per_epoch):
                x, y, extras = unpack(next(batches), device, settings.channels_last)
                closes_step = (batch_index + 1) % cfg.accumulate == 0 or batch_index == micro_per_epoch - 1
                sync = nullcontext() if (closes_step or not ddp) else model.no_sync()
                with sync:
                    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                        out = model(x, y, **extras)
                    flags = _flags(out.loss, stop)
                    if flags[0]:
                        if settings.nonfinite == "error":
                            raise NonFiniteLoss(_nonfinite_message(out, settings, epoch, step, batch_index))
                        skipped += 1
                    else:
                        scaler.scale(out.loss / cfg.accumulate).backward()
                        _accumulate(sums, out)
                        counted += 1
                if closes_step:
                    if cfg.grad_clip:
                        scaler.unscale_(optimizer)
                        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                    scaler.step(optimizer)
                    scaler.update()
                    optimizer.zero_grad(set_to_none=True)
                    scheduler.step()
                    step += 1
                bar.update(1)
                if live and (batch_index % 10 == 0 or batch_index == micro_per_epoch - 1) and counted:
                    bar.set_postfix_str(
                        f"epoch {epoch}/{cfg.epochs} " + " ".join(
                            f"{k.removeprefix('loss/')} {v.item() / counted:.3g}" for k, v in sums.items()
                            if k.startswith("loss"))
                        + (f" acc {last_acc:.1f}" if epoch > 1 and settings.evaluate_student else ""),
                        refresh=False)
                if flags[1] and closes_step:
                    done = batch_index + 1
                    finished_epoch = done == micro_per_epoch
                    write("last", checkpoint_state(epoch if finished_epoch else epoch - 1,
                                                   0 if finished_epoch else done, rng_state()))
                    raise Interrupted(stop.signum or signal.SIGTERM, settings.name, epoch, done,
                                      settings.checkpoints.get("last"))

            train_seconds = time.perf_counter() - epoch_start
            count = torch.tensor([float(max(counted, 1))], device=device)
            distributed.all_reduce_sum(count)
            for value in sums.values():
                distributed.all_reduce_sum(value)
            metrics = {f"train/{k}": v.item() / count.item() for k, v in sums.items()}
            metrics.update({"epoch": epoch, "lr": optimizer.param_groups[0]["lr"]})
            if skipped:
                metrics["train/skipped_steps"] = skipped
            improved = False
            if settings.evaluate_student:
                result = evaluate(distiller.student, test_loader, device, settings.precision,
                                  channels_last=settings.channels_last)
                last_acc = result["acc"]
                improved = last_acc > best_acc
                if improved:
                    best_acc, best_epoch = last_acc, epoch
                metrics.update({"test/acc": last_acc, "test/loss": result["loss"], "test/best_acc": best_acc})
            metrics["time/epoch_s"] = time.perf_counter() - epoch_start
            metrics["time/train_s"] = train_seconds
            state = checkpoint_state(epoch, 0, rng_state())
            write("last", state)  # the checkpoint first, then the log line that it covers
            if improved:
                write("best", state)
            logger.log(metrics, step)
            if settings.progress and settings.epoch_lines and not live and distributed.rank() == 0:
                terms = " ".join(f"{k.removeprefix('train/loss/')} {v:.3g}" for k, v in metrics.items()
                                 if k.startswith("train/loss/"))
                accuracy = f" top-1 {last_acc:.2f}% (best {best_acc:.2f}%)" if settings.evaluate_student else ""
                print(f"{settings.name} epoch {epoch}/{cfg.epochs}: loss {metrics.get('train/loss', float('nan')):.3g} "
                      f"({terms}){accuracy}", flush=True)
    finally:
        bar.close()
        quiet.__exit__(None, None, None)
    last = settings.checkpoints.get("last")
    return StageResult(settings.name, best_acc, best_epoch, last_acc, cfg.epochs, time.perf_counter() - started,
                       str(last) if last else None, skipped)


def _flags(loss: torch.Tensor, stop: StopRequest) -> tuple[bool, bool]:
    """(loss is not finite, a stop was requested), agreed on by every rank."""
    if not distributed.is_distributed():
        return not bool(torch.isfinite(loss)), stop.signum is not None
    flags = torch.stack([(~torch.isfinite(loss.detach())).float(),
                         torch.tensor(float(stop.signum is not None), device=loss.device)])
    distributed.all_reduce_sum(flags)
    return bool(flags[0] > 0), bool(flags[1] > 0)


def _nonfinite_message(out: DistillOutput, settings: StageSettings, epoch: int, step: int, batch: int) -> str:
    bad = [name for name, value in out.losses.items() if not bool(torch.isfinite(value))] or ["(total)"]
    last = settings.checkpoints.get("last")
    kept = f"the last good checkpoint is {last} (end of epoch {epoch - 1})" if last and epoch > 1 else \
        "no checkpoint of this stage was written yet"
    return (f"stage {settings.name!r}: loss term {', '.join(repr(b) for b in bad)} is not finite at optimizer step "
            f"{step + 1} (epoch {epoch}, batch {batch + 1}). Stopped; {kept}. Lower the learning rate, set "
            "train.grad_clip, check the term's weight, or set `nonfinite: skip` to skip such steps.")
