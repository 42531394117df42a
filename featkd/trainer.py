"""The config-driven trainer: build everything by registry name, train or load the teacher(s),
distill the student, evaluate top-1 every epoch, log every term, checkpoint atomically.

    from featkd import load_config, train
    result = train(load_config("configs/quickstart.yaml", ["train.epochs=5"]))
    print(result.student.best_acc, result.student.last_acc, result.run_dir)

A run folder holds `config.yaml` (fully resolved), `metrics.jsonl`, `summary.json`,
`checkpoints/last.pt` and `checkpoints/best.pt`, and the offline W&B runs under `wandb/`.
Teachers trained by a run are cached under `<output_dir>/teachers/`, keyed by everything
that determines their weights, so runs that differ only on the student side share them.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from featkd.checkpoint import load_checkpoint, save_checkpoint
from featkd.config import Config, ModelConfig, TeacherConfig, TermConfig, TrainConfig, dump_yaml, flatten
from featkd.data import DataBundle, build_data
from featkd.distiller import Distiller, Term, logits_of
from featkd.losses.base import PretrainStage
from featkd.errors import CheckpointError
from featkd.logging import Logger, make_logger
from featkd.models import build_model, count_parameters
from featkd.optim import OPTIMIZERS, SCHEDULERS
from featkd.runtime import resolve_device, seed_everything


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


@dataclass
class RunResult:
    """What `train()` returns (also written to `summary.json`)."""

    run_dir: Path
    student: StageResult
    teacher_acc: list[float] = field(default_factory=list)
    agreement: float | None = None
    student_params: int = 0
    teacher_params: list[int] = field(default_factory=list)


# -- pieces ------------------------------------------------------------------------------


def make_loaders(bundle: DataBundle, config: Config, seed: int, train_set: Any = None) -> tuple[DataLoader, DataLoader]:
    """Shuffled training loader (seeded, full batches only) and an ordered test loader.

    `train_set` replaces `bundle.train` (e.g. as wrapped by `Distiller.prepare_data`).
    """
    train_set = bundle.train if train_set is None else train_set
    generator = torch.Generator().manual_seed(seed)
    data = config.data
    train = DataLoader(
        train_set, batch_size=data.batch_size, shuffle=True, generator=generator,
        num_workers=data.num_workers, drop_last=len(train_set) > data.batch_size,
        persistent_workers=data.num_workers > 0,
    )
    test = DataLoader(bundle.test, batch_size=data.eval_batch_size, shuffle=False, num_workers=data.num_workers)
    return train, test


def unpack(batch: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(inputs, labels, extra fields) of a batch, on `device`; extras come from dataset wrappers."""
    x, y, *rest = batch
    extras = rest[0] if rest and isinstance(rest[0], dict) else {}
    moved = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in extras.items()}
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True), moved


def build_from(spec: ModelConfig, bundle: DataBundle) -> nn.Module:
    return build_model(spec.model, bundle.num_classes, bundle.input_shape, spec.args, spec.pretrained)


def terms_from(loss: dict[str, TermConfig]) -> list[Term]:
    """Distiller terms from the config's `loss:` section."""
    terms = []
    for name, spec in loss.items():
        extra: dict[str, Any] = {"adapter": spec.adapter} if spec.adapter_given else {}
        terms.append(Term(
            spec.type or name, spec.weight, student=spec.student, teacher=spec.teacher, name=name,
            teacher_index=spec.teacher_index, **extra, **spec.params,
        ))
    return terms


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device) -> dict[str, Any]:
    """Top-1 accuracy (%) and mean cross-entropy on `loader`; predictions for agreement."""
    was_training = model.training
    model.eval()
    correct, total, loss_sum = 0, 0, 0.0
    predictions = []
    try:
        for x, y, *_ in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits = logits_of(model(x))
            loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").item()
            pred = logits.argmax(1)
            predictions.append(pred.cpu())
            correct += (pred == y).sum().item()
            total += len(y)
    finally:
        model.train(was_training)
    return {"acc": 100.0 * correct / max(1, total), "loss": loss_sum / max(1, total),
            "predictions": torch.cat(predictions) if predictions else torch.empty(0, dtype=torch.long)}


def make_optimizer(train_cfg: TrainConfig, params: Iterator[nn.Parameter], steps_per_epoch: int):
    optimizer = OPTIMIZERS.build(train_cfg.optimizer.name, params=list(params), **train_cfg.optimizer.args)
    scheduler = SCHEDULERS.build(train_cfg.scheduler.name, optimizer=optimizer, steps_per_epoch=steps_per_epoch,
                                 epochs=train_cfg.epochs, **train_cfg.scheduler.args)
    return optimizer, scheduler


# -- one stage: a model trained for some epochs ------------------------------------------


def fit(
    distiller: Distiller,
    train_loader: DataLoader,
    test_loader: DataLoader,
    train_cfg: TrainConfig,
    device: torch.device,
    logger: Logger,
    stage: str,
    checkpoints: dict[str, Path] | None = None,
    extra_state: dict[str, Any] | None = None,
    progress: bool = True,
    epoch_lines: bool = False,
    parameters: list[nn.Parameter] | None = None,
    evaluate_student: bool = True,
) -> StageResult:
    """Train `parameters` (default: `distiller.parameters()`) for `train_cfg.epochs`,
    evaluating the student each epoch.

    `checkpoints` maps "last"/"best" to paths written atomically after each epoch. Progress is
    a live bar on a terminal; `epoch_lines` prints one line per epoch where there is none (logs).
    """
    steps_per_epoch = len(train_loader)
    trainable = parameters if parameters is not None else [p for p in distiller.parameters() if p.requires_grad]
    optimizer, scheduler = make_optimizer(train_cfg, trainable, steps_per_epoch)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    best_acc, best_epoch, last_acc = -1.0, 0, 0.0
    step = 0
    start = time.perf_counter()
    live = progress and sys.stderr.isatty()
    bar = tqdm(total=train_cfg.epochs * steps_per_epoch, desc=stage, unit="step", disable=not live,
               leave=False, dynamic_ncols=True)
    try:
        for epoch in range(1, train_cfg.epochs + 1):
            distiller.train()
            distiller.set_epoch(epoch)
            sums: dict[str, torch.Tensor] = {}
            epoch_start = time.perf_counter()
            for batch_index, batch in enumerate(train_loader):
                x, y, extras = unpack(batch, device)
                out = distiller(x, y, **extras)
                optimizer.zero_grad(set_to_none=True)
                out.loss.backward()
                if train_cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, train_cfg.grad_clip)
                optimizer.step()
                scheduler.step()
                step += 1
                _accumulate(sums, out)
                bar.update(1)
                if live and (batch_index % 10 == 0 or batch_index == steps_per_epoch - 1):
                    bar.set_postfix_str(
                        f"epoch {epoch}/{train_cfg.epochs} "
                        + " ".join(f"{k.removeprefix('loss/')} {v.item() / (batch_index + 1):.3g}"
                                   for k, v in sums.items() if k.startswith("loss"))
                        + (f" acc {last_acc:.1f}" if epoch > 1 else ""),
                        refresh=False,
                    )
            n = max(1, steps_per_epoch)
            metrics = {f"train/{k}": v.item() / n for k, v in sums.items()}
            metrics.update({"epoch": epoch, "lr": optimizer.param_groups[0]["lr"]})
            improved = False
            if evaluate_student:
                result = evaluate(distiller.student, test_loader, device)
                last_acc = result["acc"]
                improved = last_acc > best_acc
                if improved:
                    best_acc, best_epoch = last_acc, epoch
                metrics.update({"test/acc": last_acc, "test/loss": result["loss"], "test/best_acc": best_acc})
            metrics["time/epoch_s"] = time.perf_counter() - epoch_start
            logger.log(metrics, step)
            if progress and epoch_lines and not live:
                terms = " ".join(f"{k.removeprefix('train/loss/')} {v:.3g}" for k, v in metrics.items()
                                 if k.startswith("train/loss/"))
                accuracy = f" top-1 {last_acc:.2f}% (best {best_acc:.2f}%)" if evaluate_student else ""
                print(f"{stage} epoch {epoch}/{train_cfg.epochs}: loss {metrics['train/loss']:.3g} ({terms}){accuracy}",
                      flush=True)
            if checkpoints:
                state = {
                    **(extra_state or {}),
                    "stage": stage,
                    "epoch": epoch,
                    "step": step,
                    "model": distiller.student.state_dict(),
                    "distiller": {k: v for k, v in distiller.state_dict().items() if not k.startswith("student.")},
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "metrics": {"acc": last_acc, "best_acc": best_acc, "best_epoch": best_epoch},
                }
                if "last" in checkpoints:
                    save_checkpoint(checkpoints["last"], state)
                if improved and "best" in checkpoints:
                    save_checkpoint(checkpoints["best"], state)
    finally:
        bar.close()
    return StageResult(stage, best_acc, best_epoch, last_acc, train_cfg.epochs, time.perf_counter() - start,
                       str(checkpoints.get("last")) if checkpoints else None)


def _accumulate(sums: dict[str, torch.Tensor], out: Any) -> None:
    values = {"loss": out.loss.detach(), **{f"loss/{k}": v.detach() for k, v in out.losses.items()}}
    if len(out.losses) > 1 or any(k not in out.losses for k in out.parts):
        values.update({f"raw/{k}": v for k, v in out.parts.items()})
    for key, value in values.items():
        sums[key] = sums[key] + value if key in sums else value.clone()


# -- a whole run -------------------------------------------------------------------------


def new_run_dir(config: Config) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(config.output_dir) / f"{config.name}-{stamp}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    path.mkdir(parents=True)
    return path


def teacher_cache_path(config: Config, teacher: TeacherConfig) -> Path:
    """Where a teacher trained from `teacher` on `config.data` is cached."""
    key = json.dumps({
        "teacher": teacher.model_dump(mode="json", exclude={"checkpoint", "cache"}),
        "data": config.data.model_dump(mode="json", exclude={"num_workers", "eval_batch_size"}),
    }, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return Path(config.output_dir) / "teachers" / f"{teacher.model.replace(':', '_')}-{digest}.pt"


def _model_record(spec: ModelConfig, bundle: DataBundle) -> dict[str, Any]:
    return {"model_name": spec.model, "model_args": spec.args, "num_classes": bundle.num_classes,
            "input_shape": list(bundle.input_shape)}


def load_teacher(spec: TeacherConfig, bundle: DataBundle, path: str | Path) -> nn.Module:
    """Build the teacher from its config and load a featkd checkpoint into it."""
    model = build_from(spec, bundle)
    payload = load_checkpoint(path)
    state = payload.get("model")
    if not isinstance(state, dict):
        raise CheckpointError(f"{str(path)!r} holds no model weights.")
    own = model.state_dict()
    if set(state) != set(own) or any(state[k].shape != own[k].shape for k in own):
        trained = payload.get("model_name", "?")
        raise CheckpointError(
            f"teacher checkpoint {str(path)!r} does not fit the teacher model {spec.model!r} "
            f"(it was saved from {trained!r} with args {payload.get('model_args', {})} and "
            f"{payload.get('num_classes', '?')} classes). Point teacher.checkpoint at a checkpoint "
            "of this model, or change teacher.model to the one it was trained as."
        )
    model.load_state_dict(state)
    return model


def prepare_teacher(
    config: Config, index: int, bundle: DataBundle, device: torch.device, run_dir: Path, verbose: bool = True
) -> tuple[nn.Module, float]:
    """Load teacher `index` from its checkpoint, the cache, or train it now; return it and its accuracy."""
    spec = (config.teacher or [])[index]
    _, test_loader = make_loaders(bundle, config, spec.seed)
    if spec.checkpoint:
        model = load_teacher(spec, bundle, spec.checkpoint).to(device)
        return model, evaluate(model, test_loader, device)["acc"]
    cache = teacher_cache_path(config, spec)
    if spec.cache and cache.is_file():
        model = load_teacher(spec, bundle, cache).to(device)
        acc = evaluate(model, test_loader, device)["acc"]
        _say(config.progress and verbose, f"teacher {index}: {spec.model} from cache {cache} (top-1 {acc:.2f}%)")
        return model, acc
    seed_everything(spec.seed)
    train_loader, test_loader = make_loaders(bundle, config, spec.seed)
    model = build_from(spec, bundle).to(device)
    stage = "teacher" if len(config.teacher or []) == 1 else f"teacher{index}"
    logger = _stage_logger(config, run_dir, stage)
    with Distiller(None, model, [Term("ce")]) as trainer:
        try:
            result = fit(trainer, train_loader, test_loader, spec.train, device, logger, stage,
                         progress=config.progress, epoch_lines=verbose)
            logger.summary({"best_acc": result.best_acc, "last_acc": result.last_acc, "params": count_parameters(model)})
        finally:
            logger.finish()
    payload = {"kind": "model", "model": model.state_dict(), **_model_record(spec, bundle),
               "metrics": {"acc": result.last_acc, "best_acc": result.best_acc}, "config": spec.model_dump(mode="json")}
    save_checkpoint(run_dir / "checkpoints" / f"{stage}.pt", payload)
    if spec.cache:
        save_checkpoint(cache, payload)
    _say(config.progress, f"{stage}: {spec.model} trained, top-1 last {result.last_acc:.2f}% (best {result.best_acc:.2f}%)")
    return model, result.last_acc


def _stage_logger(config: Config, run_dir: Path, stage: str) -> Logger:
    settings = config.logger.model_copy(update={"group": config.logger.group or run_dir.name})
    return make_logger(settings, run_dir, stage, f"{run_dir.name}/{stage}", flatten(config.to_dict()))


def _say(progress: bool, message: str) -> None:
    if progress:
        tqdm.write(message)


def train(config: Config, run_dir: Path | None = None, verbose: bool = True) -> RunResult:
    """Run one experiment from a validated config; return accuracies and the run folder.

    With `config.progress`, a terminal shows live bars; `verbose` adds per-epoch lines where
    there is no terminal, and notes such as a teacher taken from the cache.
    """
    device = resolve_device(config.device)
    run_dir = Path(run_dir) if run_dir else new_run_dir(config)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_yaml(config))
    bundle = build_data(config.data.name, config.data.args)

    teachers, teacher_acc = [], []
    for index in range(len(config.teacher or [])):
        model, acc = prepare_teacher(config, index, bundle, device, run_dir, verbose)
        teachers.append(model)
        teacher_acc.append(acc)

    seed_everything(config.seed)
    student = build_from(config.student, bundle).to(device)
    example = next(iter(DataLoader(bundle.train, batch_size=config.data.batch_size)))[0].to(device)
    distiller = Distiller(teachers or None, student, terms_from(config.terms), example_input=example)
    train_loader, test_loader = make_loaders(bundle, config, config.seed, distiller.prepare_data(bundle.train))
    for term_name, stage in distiller.pretrain_stages():
        run_pretrain_stage(config, distiller, term_name, stage, train_loader, test_loader, device, run_dir, verbose)
    logger = _stage_logger(config, run_dir, "distill" if teachers else "student")
    checkpoints = {"last": run_dir / "checkpoints" / "last.pt", "best": run_dir / "checkpoints" / "best.pt"}
    record = {"kind": "student", **_model_record(config.student, bundle), "config": config.to_dict()}
    try:
        with distiller:
            result = fit(distiller, train_loader, test_loader, config.train, device, logger,
                         "distill" if teachers else "student", checkpoints, record, config.progress, verbose)
        agreement = None
        if teachers:
            student_pred = evaluate(student, test_loader, device)["predictions"]
            teacher_pred = evaluate(teachers[0], test_loader, device)["predictions"]
            agreement = 100.0 * (student_pred == teacher_pred).float().mean().item()
        outcome = RunResult(run_dir, result, teacher_acc, agreement, count_parameters(student),
                            [count_parameters(t) for t in teachers])
        logger.summary({
            "best_acc": result.best_acc, "best_epoch": result.best_epoch, "last_acc": result.last_acc,
            "teacher_acc": teacher_acc, "agreement": agreement, "student_params": outcome.student_params,
            "teacher_params": outcome.teacher_params,
        })
    finally:
        logger.finish()
    return outcome


def run_pretrain_stage(config: Config, distiller: Distiller, term_name: str, stage: PretrainStage,
                       train_loader: DataLoader, test_loader: DataLoader, device: torch.device, run_dir: Path,
                       verbose: bool = True) -> StageResult | None:
    """Run a method's pre-training stage (FitNets hints, FT paraphraser, AB, FSP) before distillation."""
    settings = config.terms[term_name].pretrain
    epochs = stage.epochs if settings.epochs is None else settings.epochs
    if epochs == 0:
        return None
    stage_cfg = TrainConfig(epochs=epochs, optimizer=settings.optimizer or config.train.optimizer,
                            scheduler=settings.scheduler, grad_clip=config.train.grad_clip)
    name = f"pretrain-{term_name}"
    logger = _stage_logger(config, run_dir, name)
    try:
        with distiller.pretraining(term_name):
            result = fit(distiller, train_loader, test_loader, stage_cfg, device, logger, name,
                         progress=config.progress, epoch_lines=verbose,
                         parameters=distiller.pretrain_parameters(term_name),
                         evaluate_student="student" in stage.trains)
        logger.summary({"epochs": epochs, "trains": list(stage.trains)})
    finally:
        logger.finish()
    _say(config.progress, f"{name}: {stage.description} ({epochs} epochs, {result.seconds:.1f}s)")
    return result


def summary_lines(result: RunResult) -> list[str]:
    """A short human summary of a finished run."""
    s = result.student
    lines = [
        f"run folder   {result.run_dir}",
        f"student      top-1 last {s.last_acc:.2f}%  best {s.best_acc:.2f}% (epoch {s.best_epoch}/{s.epochs})"
        f"  {result.student_params:,} parameters  {s.seconds:.1f}s",
    ]
    for i, (acc, params) in enumerate(zip(result.teacher_acc, result.teacher_params)):
        lines.append(f"teacher{i if len(result.teacher_acc) > 1 else ''}      top-1 {acc:.2f}%  {params:,} parameters")
    if result.agreement is not None:
        lines.append(f"agreement    student and teacher predict the same class on {result.agreement:.2f}% of test images")
    return lines

