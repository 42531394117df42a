"""The config-driven trainer: build everything by registry name, run the stages of a run,
evaluate top-1 every epoch, log every term, checkpoint atomically, resume exactly.

    from featkd import load_config, train
    result = train(load_config("configs/quickstart.yaml", ["train.epochs=5"]))
    print(result.student.best_acc, result.student.last_acc, result.run_dir)

A run folder holds `config.yaml` (fully resolved), `state.json` (which stages are done),
`metrics.jsonl`, `summary.json`, `checkpoints/` (`<stage>-last.pt` and `<stage>-best.pt` for
every stage; the final stage's are `last.pt` and `best.pt`), and the offline W&B runs under
`wandb/`, one per stage. Stages marked for caching (teachers in the simple config form) are
kept under `<output_dir>/cache/`, keyed by everything that determines their weights.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from featkd import distributed
from featkd.checkpoint import load_checkpoint, save_checkpoint
from featkd.config import Config, DataConfig, ModelConfig, TermConfig, TrainConfig, dump_yaml, flatten
from featkd.data import DataBundle, build_data
from featkd.distiller import Distiller, Term, logits_of
from featkd.engine import StageResult, StageSettings, StopRequest, evaluate, fit, frozen
from featkd.errors import CheckpointError, ConfigError
from featkd.logging import Logger, make_logger
from featkd.models import build_model, count_parameters
from featkd.runtime import resolve_device, seed_everything
from featkd.stages import Plan, StagePlan, cache_path, plan_stages
from featkd.teacher_cache import TeacherCacheSettings

__all__ = ["RunResult", "StageResult", "evaluate", "load_model_checkpoint", "train", "summary_lines"]


@dataclass
class RunResult:
    """What `train()` returns (also written to `summary.json`)."""

    run_dir: Path
    student: StageResult  # the final stage
    stages: dict[str, StageResult] = field(default_factory=dict)
    teacher_acc: list[float] = field(default_factory=list)
    agreement: float | None = None
    student_params: int = 0
    teacher_params: list[int] = field(default_factory=list)
    student_macs: int | None = None
    teacher_macs: list[int | None] = field(default_factory=list)
    teacher_models: list[str] = field(default_factory=list)


# -- run folder and its state -------------------------------------------------------------


def new_run_dir(config: Config) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(config.output_dir) / f"{config.name}-{stamp}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    path.mkdir(parents=True)
    return path


class RunState:
    """`state.json`: each stage's status ("running", "done", "cached"), result and W&B run id."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / "state.json"
        self.stages: dict[str, dict[str, Any]] = json.loads(self.path.read_text())["stages"] if self.path.exists() else {}

    def get(self, stage: str) -> dict[str, Any]:
        return self.stages.get(stage, {})

    def update(self, stage: str, **values: Any) -> None:
        self.stages.setdefault(stage, {}).update(values)
        if distributed.rank() == 0:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"stages": self.stages}, indent=2) + "\n")
            os.replace(tmp, self.path)


def _trim_metrics(run_dir: Path, stage: str, step: int) -> None:
    """On resume, drop log lines of `stage` past the checkpoint the run continues from."""
    path = run_dir / "metrics.jsonl"
    if distributed.rank() != 0 or not path.exists():
        return
    kept = [line for line in path.read_text().splitlines()
            if not (json.loads(line).get("stage") == stage and json.loads(line).get("step", 0) > step)]
    path.write_text("".join(line + "\n" for line in kept))


# -- models --------------------------------------------------------------------------------


def build_from(spec: ModelConfig, bundle: DataBundle) -> nn.Module:
    """A model from its config, with weights from `checkpoint` or `pretrained` if given."""
    model = build_model(spec.model, bundle.num_classes, bundle.input_shape, spec.args, spec.pretrained)
    if spec.checkpoint:
        load_model_checkpoint(model, spec.checkpoint, spec.model)
    return model


def load_model_checkpoint(model: nn.Module, path: str | Path, what: str) -> dict[str, Any]:
    """Load the model weights of a featkd checkpoint; a mismatch says what the file holds."""
    payload = load_checkpoint(path)
    state = payload.get("model")
    if not isinstance(state, dict):
        raise CheckpointError(f"{str(path)!r} holds no model weights.")
    own = model.state_dict()
    if set(state) != set(own) or any(state[k].shape != own[k].shape for k in own):
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not fit the model {what!r} (it was saved from "
            f"{payload.get('model_name', '?')!r} with args {payload.get('model_args', {})} and "
            f"{payload.get('num_classes', '?')} classes). Point the config at a checkpoint of this model, "
            "or change the model to the one it was trained as."
        )
    model.load_state_dict(state)
    return payload


def build_models(plan: Plan, bundle: DataBundle, seed: int, device: torch.device | str = "cpu") -> dict[str, nn.Module]:
    """Every model of a plan, initialised from `seed` in the plan's order (so runs repeat)."""
    seed_everything(seed)
    return {key: build_from(spec, bundle).to(device) for key, spec in plan.models.items()}


def _record(spec: ModelConfig, bundle: DataBundle) -> dict[str, Any]:
    return {"model_name": spec.model, "model_args": spec.args, "num_classes": bundle.num_classes,
            "input_shape": list(bundle.input_shape)}


@torch.no_grad()
def _probabilities(model: nn.Module, dataset: Any, batch_size: int, device: torch.device) -> torch.Tensor:
    """A model's predicted distributions over a dataset (eval mode), N x C."""
    was_training = model.training
    model.eval()
    try:
        out = [torch.softmax(logits_of(model(batch[0].to(device))).float(), 1).cpu()
               for batch in DataLoader(dataset, batch_size=batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(out)


def multiply_adds(model: nn.Module, input_shape: tuple[int, ...], device: torch.device) -> int | None:
    """Multiply-adds of one forward of one sample (FLOPs / 2, counted by torch)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros((1, *input_shape), device=device))
        return counter.get_total_flops() // 2
    except Exception:  # a model the counter cannot trace: report none rather than fail the run
        return None
    finally:
        model.train(was_training)


# -- data ------------------------------------------------------------------------------------


def make_loaders(train_set: Any, test_set: Any, data: DataConfig, seed: int) -> tuple[DataLoader, DataLoader]:
    """Training loader (shuffled by a seeded permutation per epoch, full batches only, this
    rank's shard) and an ordered test loader (this rank's shard, nothing repeated)."""
    from featkd.distributed import ShardedSampler

    world = distributed.world_size()
    drop_last = len(train_set) >= data.batch_size * world
    views = getattr(train_set, "views", None) or 1
    train = DataLoader(train_set, batch_size=data.batch_size, num_workers=data.num_workers,
                       sampler=ShardedSampler(len(train_set), shuffle=True, seed=seed, drop_last=drop_last, views=views),
                       drop_last=drop_last, persistent_workers=data.num_workers > 0)
    test = DataLoader(test_set, batch_size=data.eval_batch_size, num_workers=data.num_workers,
                      sampler=ShardedSampler(len(test_set), shuffle=False, drop_last=False))
    return train, test


def terms_from(loss: dict[str, TermConfig]) -> list[Term]:
    """Distiller terms from a config's `loss:` section."""
    terms = []
    for name, spec in loss.items():
        extra: dict[str, Any] = {} if spec.adapter == "default" else {"adapter": spec.adapter}
        terms.append(Term(spec.type or name, spec.weight, student=spec.student, teacher=spec.teacher, name=name,
                          teacher_index=spec.teacher_index, gather=spec.gather, **extra, **spec.params))
    return terms


# -- cache lock ------------------------------------------------------------------------------


@contextmanager
def _cache_lock(path: Path):
    """Only one process trains a given cached stage; the others wait, then load it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, at worst the stage is trained twice
        yield
        return
    with open(path.with_suffix(".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# -- the run -------------------------------------------------------------------------------


class Run:
    """One run of a config: its folder, data, models and stages."""

    def __init__(self, config: Config, run_dir: Path, device: torch.device, verbose: bool, stop: StopRequest) -> None:
        self.config = config
        self.run_dir = run_dir
        self.device = device
        self.verbose = verbose
        self.stop = stop
        self.state = RunState(run_dir)
        self._bundles: dict[str, DataBundle] = {}
        self.bundle = self.data(config.data)
        self.plan: Plan = plan_stages(config)
        self.models = build_models(self.plan, self.bundle, config.seed, device)
        if config.channels_last and len(self.bundle.input_shape) == 3:
            for model in self.models.values():
                model.to(memory_format=torch.channels_last)
        self.results: dict[str, StageResult] = {}

    def data(self, spec: DataConfig) -> DataBundle:
        """The dataset of a data config, built once; a stage's own data must fit the models."""
        key = json.dumps(spec.model_dump(mode="json", exclude={"batch_size", "eval_batch_size", "num_workers"}),
                         sort_keys=True)
        if key not in self._bundles:
            bundle = build_data(spec.name, spec.args)
            if self._bundles and (bundle.num_classes, tuple(bundle.input_shape)) != (
                    self.bundle.num_classes, tuple(self.bundle.input_shape)):
                raise ConfigError(
                    f"a stage's data ({spec.name}) has {bundle.num_classes} classes of shape {bundle.input_shape}, "
                    f"but the models were built for the run's data: {self.bundle.num_classes} classes of shape "
                    f"{self.bundle.input_shape}. A stage's data may differ in samples, not in classes or shape."
                )
            self._bundles[key] = bundle
        return self._bundles[key]

    def say(self, message: str) -> None:
        if self.config.progress and distributed.rank() == 0:
            tqdm.write(message)

    def checkpoints(self, name: str, final: bool) -> dict[str, Path]:
        folder = self.run_dir / "checkpoints"
        return {"last": folder / "last.pt", "best": folder / "best.pt"} if final else \
            {"last": folder / f"{name}-last.pt", "best": folder / f"{name}-best.pt"}

    def logger(self, stage: str, final: bool = False) -> Logger:
        settings = self.config.logger.model_copy(update={"group": self.config.logger.group or self.run_dir.name})
        logger = make_logger(settings, self.run_dir, stage, f"{self.run_dir.name}/{stage}", flatten(self.config.to_dict()),
                             resume_id=self.state.get(stage).get("wandb_id"), final=final)
        run_id = getattr(logger, "run_id", None)
        if run_id:
            self.state.update(stage, wandb_id=run_id)
        return logger

    def settings(self, name: str, train_cfg: Any, evaluate_student: bool, final: bool,
                 spec: ModelConfig) -> StageSettings:
        return StageSettings(
            name=name, train=train_cfg, precision=self.config.precision, nonfinite=self.config.nonfinite,
            evaluate_student=evaluate_student, checkpoints=self.checkpoints(name, final),
            record={"kind": "student", **_record(spec, self.bundle), "config": self.config.to_dict()},
            progress=self.config.progress, epoch_lines=self.verbose, channels_last=self.config.channels_last)

    # -- stages --------------------------------------------------------------------------
    def run(self) -> RunResult:
        for index, stage in enumerate(self.plan.stages):
            self.results[stage.name] = self.run_stage(index, stage)
        return self.finish()

    def run_stage(self, index: int, stage: StagePlan) -> StageResult:
        if stage.specialists is not None:
            return self.run_specialists(stage)
        model = self.models[stage.model]
        record = self.state.get(stage.name)
        if record.get("status") in ("done", "cached"):
            load_model_checkpoint(model, record["checkpoint"], stage.model)
            return StageResult(**record["result"])
        if not stage.cache or record.get("status") == "running":
            return self.train_stage(stage)
        path = cache_path(self.config, self.plan, index)
        with _cache_lock(path) if distributed.rank() == 0 else nullcontext():
            if distributed.broadcast_object(path.is_file()):
                payload = load_model_checkpoint(model, path, stage.model)
                result = StageResult(**payload["result"])
                self.state.update(stage.name, status="cached", checkpoint=str(path), result=asdict(result))
                if self.verbose:
                    self.say(f"{stage.name}: {self.plan.models[stage.model].model} from the cache {path} "
                             f"(top-1 {result.last_acc:.2f}%)")
                return result
            result = self.train_stage(stage)
            if distributed.rank() == 0:
                save_checkpoint(path, {"kind": "model", "model": model.state_dict(),
                                       **_record(self.plan.models[stage.model], self.bundle), "result": asdict(result)})
        return result

    def train_stage(self, stage: StagePlan) -> StageResult:
        config, device = self.config, self.device
        model = self.models[stage.model]
        spec = self.plan.models[stage.model]
        teachers = [self.models[k] for k in stage.teachers]
        bundle = self.data(stage.data)
        seed_everything(stage.seed)
        model.requires_grad_(True)  # it may have taught in an earlier stage, frozen
        example = next(iter(DataLoader(bundle.train, batch_size=stage.data.batch_size)))[0].to(device)
        cache = config.teacher_cache
        cache_settings = TeacherCacheSettings(cache.dtype, list(cache.features)) if cache.enabled and teachers else None
        with frozen(model, stage.freeze, stage.unfreeze), \
                Distiller(teachers or None, model, terms_from(stage.terms), example_input=example,
                          teacher_cache=cache_settings) as distiller:
            if config.compile:  # after the hooks are in place: compiled graphs keep them
                backend = "inductor" if config.compile is True else config.compile
                for module in [model, *teachers]:
                    module.compile(backend=backend)
            train_set = distiller.prepare_data(bundle.train)
            train_loader, test_loader = make_loaders(train_set, bundle.test, stage.data, stage.seed)
            main = self.state.get(stage.name)
            resume = None
            if main.get("status") == "running" and Path(main.get("checkpoint", "")).is_file():
                resume = load_checkpoint(main["checkpoint"])
                _trim_metrics(self.run_dir, stage.name, resume["step"])
            else:
                for term_name, pretrain in distiller.pretrain_stages():
                    self.run_pretrain(stage, distiller, term_name, pretrain, train_loader, test_loader, spec)
            self.state.update(stage.name, status="running", checkpoint=str(self.checkpoints(stage.name, stage.final)["last"]))
            logger = self.logger(stage.name, final=stage.final)
            try:
                result = fit(distiller, train_loader, test_loader,
                             self.settings(stage.name, stage.train, True, stage.final, spec),
                             device, logger, resume=resume, stop=self.stop)
                self.results[stage.name] = result
                summary = {"best_acc": result.best_acc, "best_epoch": result.best_epoch,
                           "last_acc": result.last_acc, "params": count_parameters(model)}
                if stage.final:
                    summary.update(self.summary(self.outcome()))
                logger.summary(summary)
            finally:
                logger.finish()
        self.state.update(stage.name, status="done", result=asdict(result))
        if not stage.final:
            self.say(f"{stage.name}: {spec.model} trained, top-1 last {result.last_acc:.2f}% "
                     f"(best {result.best_acc:.2f}%)")
        return result

    def run_specialists(self, stage: StagePlan) -> StageResult:
        """Train specialists of a generalist on the classes it confuses; register their ensemble
        as the model `stage.model` (the stage's name), for later stages to learn from."""
        from featkd import specialists as sp

        cfg = stage.specialists
        generalist = self.models[cfg.generalist]
        bundle = self.data(stage.data)
        path = self.checkpoints(stage.name, stage.final)["last"]
        record = self.state.get(stage.name)
        if record.get("status") == "done":
            payload = load_checkpoint(path)
            experts = [sp.specialist_from(generalist, c) for c in payload["clusters"]]
            for expert, state in zip(experts, payload["specialists"]):
                expert.load_state_dict(state)
            self.models[stage.model] = sp.SpecialistEnsemble(generalist, experts, payload["clusters"], cfg.top_n,
                                                             cfg.iterations).to(self.device)
            return StageResult(**record["result"])
        if distributed.is_distributed():
            raise ConfigError(f"stage {stage.name!r}: specialists are trained in a single process; run it without torchrun.")
        started = time.perf_counter()
        seed_everything(stage.seed)
        probs = _probabilities(generalist, bundle.train, stage.data.eval_batch_size, self.device)
        clusters = sp.confusion_clusters(probs, cfg.clusters, stage.seed)
        self.state.update(stage.name, status="running", clusters=clusters)
        experts = []
        for m, cluster in enumerate(clusters):
            name = f"{stage.name}-{m}"
            expert = sp.specialist_from(generalist, cluster)
            train_set = sp.SpecialistLabels(bundle.train, cluster, bundle.num_classes)
            sampler = sp.SpecialtySampler(train_set.targets < len(cluster), cfg.specialty_fraction, stage.seed + m)
            loader = DataLoader(train_set, batch_size=stage.data.batch_size, sampler=sampler, drop_last=True)
            test_loader = DataLoader(sp.SpecialistLabels(bundle.test, cluster, bundle.num_classes),
                                     batch_size=stage.data.eval_batch_size)
            logger = self.logger(name)
            try:
                with Distiller(None, expert, [Term("ce")]) as distiller:
                    result = fit(distiller, loader, test_loader,
                                 StageSettings(name, stage.train, self.config.precision, self.config.nonfinite,
                                               progress=self.config.progress, epoch_lines=self.verbose),
                                 self.device, logger, stop=self.stop)
                logger.summary({"classes": cluster, "last_acc": result.last_acc})
            finally:
                logger.finish()
            self.say(f"{name}: specialist for classes {cluster} (+ dustbin), top-1 on its label space "
                     f"{result.last_acc:.2f}%")
            experts.append(expert)
        ensemble = sp.SpecialistEnsemble(generalist, experts, clusters, cfg.top_n, cfg.iterations).to(self.device)
        self.models[stage.model] = ensemble
        _, test_loader = make_loaders(bundle.train, bundle.test, stage.data, stage.seed)
        general_acc = evaluate(generalist, test_loader, self.device)["acc"]
        ensemble_acc = evaluate(ensemble, test_loader, self.device)["acc"]
        result = StageResult(stage.name, ensemble_acc, stage.train.epochs, ensemble_acc, stage.train.epochs,
                             time.perf_counter() - started, str(path))
        if distributed.rank() == 0:
            save_checkpoint(path, {"kind": "specialists", "clusters": clusters, "generalist_acc": general_acc,
                                   "specialists": [e.state_dict() for e in experts], "result": asdict(result)})
        self.state.update(stage.name, status="done", checkpoint=str(path), result=asdict(result),
                          generalist_acc=general_acc)
        self.say(f"{stage.name}: generalist top-1 {general_acc:.2f}%, generalist + {len(experts)} specialists "
                 f"{ensemble_acc:.2f}% (clusters {clusters})")
        return result

    def run_pretrain(self, stage: StagePlan, distiller: Distiller, term_name: str, pretrain: Any,
                     train_loader: DataLoader, test_loader: DataLoader, spec: ModelConfig) -> None:
        name = stage.pretrain_name(term_name)
        settings = stage.terms[term_name].pretrain
        epochs = pretrain.epochs if settings.epochs is None else settings.epochs
        record = self.state.get(name)
        checkpoints = self.checkpoints(name, final=False)
        if record.get("status") == "done":
            payload = load_checkpoint(checkpoints["last"])
            distiller.load_state_dict({**{f"student.{k}": v for k, v in payload["model"].items()},
                                       **payload["distiller"]})
            return
        if epochs == 0:
            return
        train_cfg = TrainConfig(epochs=epochs, optimizer=settings.optimizer or stage.train.optimizer,
                                scheduler=settings.scheduler, grad_clip=stage.train.grad_clip,
                                accumulate=stage.train.accumulate)
        resume = load_checkpoint(checkpoints["last"]) if record.get("status") == "running" and \
            checkpoints["last"].is_file() else None
        if resume is not None:
            _trim_metrics(self.run_dir, name, resume["step"])
        self.state.update(name, status="running")
        logger = self.logger(name)
        try:
            with distiller.pretraining(term_name):
                result = fit(distiller, train_loader, test_loader,
                             self.settings(name, train_cfg, "student" in pretrain.trains, False, spec),
                             self.device, logger, parameters=distiller.pretrain_parameters(term_name),
                             resume=resume, stop=self.stop)
            logger.summary({"epochs": epochs, "trains": list(pretrain.trains)})
        finally:
            logger.finish()
        self.state.update(name, status="done", result=asdict(result))
        self.results[name] = result
        self.say(f"{name}: {pretrain.description} ({epochs} epochs, {result.seconds:.1f}s)")

    # -- summary -------------------------------------------------------------------------
    def finish(self) -> RunResult:
        outcome = self.outcome()
        if distributed.rank() == 0:
            path = self.run_dir / "summary.json"
            existing = json.loads(path.read_text()) if path.exists() else {}
            existing["run"] = {**self.summary(outcome), "stages": {k: asdict(v) for k, v in self.results.items()}}
            path.write_text(json.dumps(existing, indent=2) + "\n")
        return outcome

    @staticmethod
    def summary(outcome: RunResult) -> dict[str, Any]:
        """Plain values of a run's outcome (summary.json and the final stage's W&B summary)."""
        values = {k: v for k, v in asdict(outcome).items() if k not in ("run_dir", "student", "stages")}
        values.update({"best_acc": outcome.student.best_acc, "best_epoch": outcome.student.best_epoch,
                       "last_acc": outcome.student.last_acc})
        return values

    def outcome(self) -> RunResult:
        """Accuracies, agreement, sizes and multiply-adds of the final stage's models."""
        final = self.plan.final
        student = self.models[final.model]
        teachers = [self.models[k] for k in final.teachers]
        final_data = self.data(final.data)
        _, test_loader = make_loaders(final_data.train, final_data.test, final.data, final.seed)
        teacher_acc, agreement = [], None
        cl = self.config.channels_last
        for i, teacher in enumerate(teachers):
            result = evaluate(student, test_loader, self.device, self.config.precision, reference=teacher, channels_last=cl)
            teacher_acc.append(evaluate(teacher, test_loader, self.device, self.config.precision, channels_last=cl)["acc"])
            if i == 0:
                agreement = result["agreement"]
        shape = tuple(self.bundle.input_shape)
        outcome = RunResult(
            self.run_dir, self.results[final.name], dict(self.results), teacher_acc, agreement,
            count_parameters(student), [count_parameters(t) for t in teachers],
            multiply_adds(student, shape, self.device), [multiply_adds(t, shape, self.device) for t in teachers],
            [self.plan.models[k].model if k in self.plan.models else "specialists" for k in final.teachers])
        return outcome


def train(config: Config, run_dir: Path | str | None = None, verbose: bool = True, resume: bool = False) -> RunResult:
    """Run every stage of a validated config; return accuracies and the run folder.

    With `config.progress`, a terminal shows live bars; `verbose` adds per-epoch lines where
    there is no terminal, and notes such as a stage taken from the cache. `resume=True`
    continues the run in `run_dir` from its last checkpoint. Under `torchrun`, each process
    joins the process group and trains its shard.
    """
    started_group = distributed.launched_by_torchrun() and not distributed.is_distributed()
    device = distributed.setup(config.device) if distributed.launched_by_torchrun() else resolve_device(config.device)
    try:
        if resume:
            run_dir = Path(run_dir)  # type: ignore[arg-type]
        elif distributed.rank() == 0:
            run_dir = Path(run_dir) if run_dir else new_run_dir(config)
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(dump_yaml(config))
        run_dir = Path(distributed.broadcast_object(str(run_dir)))
        with StopRequest() as stop:
            return Run(config, run_dir, device, verbose, stop).run()
    finally:
        if started_group:
            distributed.teardown()


def resume_config(run_dir: str | Path, config: Config | None = None) -> Config:
    """The config of a run folder; a different `config` given alongside is an error."""
    from featkd.config import load_config

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "state.json").is_file():
        raise ConfigError(f"--resume {str(run_dir)!r}: not a featkd run folder (no config.yaml and state.json).")
    saved = load_config(run_dir / "config.yaml")
    if config is not None:
        ours, theirs = flatten(saved.to_dict()), flatten(config.to_dict())
        differ = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k) and k != "progress")
        if differ:
            raise ConfigError(
                f"--resume {str(run_dir)!r}: the given config differs from the run's in {', '.join(differ[:8])}"
                + (" ..." if len(differ) > 8 else "") + ". Resume with the run's own config (omit CONFIG).")
    return saved


def summary_lines(result: RunResult) -> list[str]:
    """A short human summary of a finished run."""
    s = result.student

    def macs(n: int | None) -> str:
        return f"  {n / 1e6:,.2f}M multiply-adds" if n is not None else ""

    lines = [
        f"run folder   {result.run_dir}",
        f"student      top-1 last {s.last_acc:.2f}%  best {s.best_acc:.2f}% (epoch {s.best_epoch}/{s.epochs})"
        f"  {result.student_params:,} parameters{macs(result.student_macs)}  {s.seconds:.1f}s",
    ]
    for i, (acc, params, m) in enumerate(zip(result.teacher_acc, result.teacher_params, result.teacher_macs)):
        lines.append(f"teacher{i if len(result.teacher_acc) > 1 else ''}      top-1 {acc:.2f}%  {params:,} parameters{macs(m)}")
    if result.agreement is not None:
        lines.append(f"agreement    student and teacher predict the same class on {result.agreement:.2f}% of test images")
    if s.skipped_steps:
        lines.append(f"skipped      {s.skipped_steps} steps with a non-finite loss")
    return lines


def evaluate_checkpoint(path: str | Path, device_name: str = "auto") -> dict[str, Any]:
    """Top-1 of the model in a featkd checkpoint on the test set of the config it was trained with."""
    from featkd.config import validate

    payload = load_checkpoint(path)
    if "config" not in payload or "model_name" not in payload:
        raise CheckpointError(f"{str(path)!r} has no training config; `featkd eval` needs a checkpoint of a featkd run.")
    config = validate(payload["config"])
    device = resolve_device(device_name)
    bundle = build_data(config.data.name, config.data.args)
    model = build_model(payload["model_name"], payload["num_classes"], payload["input_shape"], payload["model_args"])
    model.load_state_dict(payload["model"])
    model.to(device)
    _, test_loader = make_loaders(bundle.train, bundle.test, config.data, config.seed)
    result = evaluate(model, test_loader, device)
    return {"checkpoint": str(path), "model": payload["model_name"], "stage": payload.get("stage"),
            "epoch": payload.get("epoch"), "acc": result["acc"], "loss": result["loss"],
            "params": count_parameters(model), "samples": len(bundle.test)}

