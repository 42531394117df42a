"""The config-driven trainer: build everything by registry name and run the stages of a run.

    from featkd import load_config, train
    result = train(load_config("configs/quickstart.yaml", ["train.epochs=5"]))
    print(result.student.best_acc, result.student.last_acc, result.run_dir)

The plan (`featkd.stages`) is the map: a list of stages, each training one model from its
teachers. Each stage runs here: taken from the run's own state when already done, from the
stage cache (`featkd.stage_cache`) when an identical one trained before, or trained with
`featkd.engine.fit`, after the pre-training stages of its methods. What the run folder holds
is described in `featkd.run_folder`; the outcome in `featkd.summary`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from featkd import distributed, stage_cache
from featkd import specialists as sp
from featkd.checkpoint import load_checkpoint, save_checkpoint
from featkd.config import Config, DataConfig, ModelConfig, TrainConfig
from featkd.dashboard import Lineage, log_final_tables
from featkd.data import DataBundle, build_data, collate_of, eval_loader, make_loaders
from featkd.deploy.prune import magnitude_pruning, prune_channels, restore_structure, structure_of
from featkd.deploy.qat import quantization_aware
from featkd.distiller import Distiller, Term
from featkd.engine import StageResult, StageSettings, StopRequest, fit, restore_weights
from featkd.errors import CheckpointError, ConfigError, FeatkdError
from featkd.evaluation import evaluate, to_device
from featkd.heads import HeadedStudent, head_payload, with_head
from featkd.logging import checked_settings, wandb_logger
from featkd.media import epoch_pictures, fixed_batch
from featkd.models import build_model, count_parameters, frozen
from featkd.run_folder import RunFolder
from featkd.runtime import resolve_device, seed_everything
from featkd.stages import Plan, StagePlan, plan_stages
from featkd.step import check_optimizer
from featkd.summary import RunResult, measure
from featkd.teacher_cache import TeacherCacheSettings
from featkd.terms import terms_from

__all__ = ["RunResult", "build_models", "check", "load_model_checkpoint", "train"]


# -- models --------------------------------------------------------------------------------


def build_from(spec: ModelConfig, bundle: DataBundle) -> nn.Module:
    """A model from its config, with weights from `checkpoint` or `pretrained` if given."""
    model = build_model(spec.model, bundle.num_classes, bundle.input_shape, spec.args, spec.pretrained, bundle.text)
    if spec.checkpoint:
        load_model_checkpoint(model, spec.checkpoint, spec.model)
    return model


def load_model_checkpoint(model: nn.Module, path: str | Path, what: str) -> dict[str, Any]:
    """Load the model weights of a featkd checkpoint; a mismatch says what the file holds."""
    payload = load_checkpoint(path)
    state = payload.get("model")
    if not isinstance(state, dict):
        raise CheckpointError(f"{str(path)!r} holds no model weights.")
    if payload.get("structure"):  # channels were pruned: reshape the built model to the recorded one
        restore_structure(model, state, payload["structure"])
        return payload
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


def model_record(spec: ModelConfig, bundle: DataBundle, model: nn.Module | None = None) -> dict[str, Any]:
    """What a checkpoint says of its model, so that it can be rebuilt (`featkd eval`): with the
    module shapes of a model whose channels were pruned."""
    return {"model_name": spec.model, "model_args": spec.args, "num_classes": bundle.num_classes,
            "input_shape": list(bundle.input_shape), "text": asdict(bundle.text) if bundle.text else None,
            "structure": structure_of(model) if model is not None else None}


# -- the run -------------------------------------------------------------------------------


class Run:
    """One run of a config: its data, models and stages, then (`run`) its folder and training."""

    folder: RunFolder
    stop: StopRequest
    lineage: Lineage

    def __init__(self, config: Config, device: torch.device, verbose: bool = True) -> None:
        self.config, self.device, self.verbose = config, device, verbose
        self._bundles: dict[str, DataBundle] = {}
        self.bundle = self.data(config.data)
        self.plan: Plan = plan_stages(config)
        self.models = build_models(self.plan, self.bundle, config.seed, device)
        if config.channels_last and len(self.bundle.input_shape) == 3:
            for model in self.models.values():
                model.to(memory_format=torch.channels_last)
        self.results: dict[str, StageResult] = {}
        #: the trained models that answer through a head their method gave them (SimKD)
        self.heads: dict[str, HeadedStudent] = {}
        self.final_outcome: RunResult | None = None  # measured when the final stage is trained in this process

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

    def settings(self, name: str, train_cfg: TrainConfig, final: bool = False, spec: ModelConfig | None = None,
                 evaluate_student: bool = True, model: nn.Module | None = None) -> StageSettings:
        """How `fit` runs a stage: the run's precision and policies, the stage's checkpoints."""
        record = {"kind": "student", **model_record(spec, self.bundle, model), "config": self.config.to_dict()} \
            if spec else {}
        return StageSettings(
            name=name, train=train_cfg, precision=self.config.precision, nonfinite=self.config.nonfinite,
            evaluate_student=evaluate_student, checkpoints=self.folder.checkpoints(name, final) if spec else {},
            record=record, progress=self.config.progress, epoch_lines=self.verbose,
            channels_last=self.config.channels_last)

    def check(self) -> None:
        """Set up every stage on the untrained models, with a batch of its data, so that a
        wrong feature name, shape or data option stops the run before anything trains."""
        for stage in self.plan.stages:
            try:
                check_optimizer(stage.train, self.config.precision)
                prune = stage.train.prune
                if prune is not None and prune.channels is not None and stage.model in self.models:
                    # on a copy of the untrained model: a model it cannot prune stops the run now
                    prune_channels(copy.deepcopy(self.models[stage.model]), self.example(stage), prune.channels,
                                   prune.keep)
            except ConfigError as exc:
                raise ConfigError(f"stage {stage.name!r}: {exc}") from None
            if stage.specialists is not None or any(t not in self.models for t in stage.teachers):
                continue  # specialists, and what learns from their ensemble: built by their stage
            try:
                if self.plan.models[stage.model].from_teacher is not None:
                    self.initialise_from_teacher(stage)  # the models are untrained: nothing is lost
                with self.distiller(stage) as distiller:
                    distiller.prepare_data(self.data(stage.data).train)
                    if isinstance(distiller.deployed, HeadedStudent):
                        self.check_head_use(stage, distiller.deployed)
            except FeatkdError as exc:
                raise ConfigError(f"stage {stage.name!r}: {exc}") from None

    def check_head_use(self, stage: StagePlan, headed: HeadedStudent) -> None:
        """A model that answers through its method's head is a run's last word on that model:
        later stages would read the network without the head, and pruning or int8 training
        would change the network under it."""
        what = f"{stage.model!r} answers through {headed.loss}'s head after this stage"
        train = stage.train
        if train.quantization_aware or (train.prune is not None and train.prune.channels is not None):
            raise ConfigError(f"{what}, which quantization-aware training and channel pruning do not cover; train it "
                              "without them (int8 export quantizes the whole student, head included).")
        later = self.plan.stages[self.plan.stages.index(stage) + 1:]
        for other in later:
            if other.model == stage.model or stage.model in other.teachers:
                raise ConfigError(f"{what}, but stage {other.name!r} "
                                  f"{'trains it further' if other.model == stage.model else 'learns from it'}; "
                                  "make this the model's last stage.")

    def deployed(self, key: str) -> nn.Module:
        """Model `key` as it answers at inference: with the head its method gave it, if any."""
        return self.heads.get(key, self.models[key])

    def adopt_head(self, key: str, payload: dict[str, Any]) -> None:
        """Keep the head a loaded checkpoint records for model `key` (none: the model answers itself)."""
        headed = with_head(self.models[key], payload.get("head"))
        if isinstance(headed, HeadedStudent):
            self.heads[key] = headed
        else:
            self.heads.pop(key, None)

    def initialise_from_teacher(self, stage: StagePlan) -> None:
        """Copy into the stage's model the weights of its first teacher with the layers its
        `from_teacher` keeps (DistilBERT's initialisation); the architectures must agree."""
        from featkd.text_models import student_from_teacher

        spec = self.plan.models[stage.model]
        key = f"models.{stage.model}.from_teacher" if self.config.stages else f"{stage.model}.from_teacher"
        if not stage.teachers:
            raise ConfigError(f"{key}: stage {stage.name!r} has no teacher to start {stage.model!r} from.")
        try:
            state = student_from_teacher(self.models[stage.teachers[0]], spec.from_teacher).state_dict()
        except FeatkdError as exc:
            raise ConfigError(f"{key}: {exc}") from None
        own = self.models[stage.model].state_dict()
        wrong = sorted(k for k in own if k not in state or state[k].shape != own[k].shape)
        if wrong or set(state) - set(own):
            raise ConfigError(
                f"{key}: {stage.model!r} ({spec.model}) is not the teacher's architecture with those layers (e.g. "
                f"{(wrong or sorted(set(state) - set(own)))[:3]} differ); give it the teacher's model and arguments "
                "with the number of layers kept."
            )
        self.models[stage.model].load_state_dict(state)

    def example(self, stage: StagePlan) -> Any:
        """A batch of the stage's training inputs, on the run's device."""
        bundle = self.data(stage.data)
        return to_device(next(iter(DataLoader(bundle.train, batch_size=stage.data.batch_size,
                                              collate_fn=collate_of(bundle.train))))[0], self.device)

    def distiller(self, stage: StagePlan) -> Distiller:
        """The stage's model learning from its teachers by its terms, set up (shapes probed,
        adapters built) on a batch of the stage's training inputs."""
        cache = self.config.teacher_cache
        return Distiller([self.models[k] for k in stage.teachers] or None, self.models[stage.model],
                         terms_from(stage.terms, stage.loss_key, stage.teacher_hint), example_input=self.example(stage),
                         teacher_cache=TeacherCacheSettings(cache.dtype, list(cache.features))
                         if cache.enabled and stage.teachers else None)

    def run(self, folder: RunFolder, stop: StopRequest) -> RunResult:
        """Run every stage (those the folder's state says are done are loaded), in `folder`."""
        self.folder, self.stop = folder, stop
        self.lineage = Lineage(folder, self.plan)
        for index, stage in enumerate(self.plan.stages):
            self.results[stage.name] = self.run_stage(index, stage)
        outcome = self.final_outcome or self.outcome()
        self.folder.write_summary({**outcome.values(), "stages": {k: asdict(v) for k, v in self.results.items()}})
        return outcome

    def run_stage(self, index: int, stage: StagePlan) -> StageResult:
        """A stage's result: from the run folder if done, from the stage cache, or trained (and
        then cached, if the stage is cacheable: also when a resumed run finishes it)."""
        if stage.specialists is not None:
            return self.run_specialists(stage)
        model = self.models[stage.model]
        record = self.folder.state.get(stage.name)
        if record.get("status") in ("done", "cached"):
            self.adopt_head(stage.model, load_model_checkpoint(model, self.folder.resolve(record["checkpoint"]),
                                                               stage.model))
            return StageResult(**record["result"])
        if not stage.cache:
            return self.train_stage(stage)
        path = stage_cache.cache_path(self.config, self.plan, index)
        with stage_cache.claimed(path):
            if record.get("status") != "running" and distributed.broadcast_object(path.is_file()):
                payload = load_model_checkpoint(model, path, stage.model)
                self.adopt_head(stage.model, payload)
                result = StageResult(**payload["result"])
                # the run folder keeps its own copy, so that it resumes wherever it is moved, with
                # the run's config as a trained stage's checkpoints have it (export reads it)
                kept = self.folder.save(self.folder.checkpoints(stage.name, stage.final)["last"],
                                        {**payload, "config": self.config.to_dict()})
                self.folder.state.update(stage.name, status="cached", checkpoint=self.folder.relative(kept),
                                         result=asdict(result))
                if self.verbose:
                    self.say(f"{stage.name}: {self.plan.models[stage.model].model} from the cache {path} "
                             f"(top-1 {result.last_acc:.2f}%)")
                return result
            result = self.train_stage(stage)
            stage_cache.store(path, model, {**model_record(self.plan.models[stage.model], self.bundle, model),
                                            "head": head_payload(self.deployed(stage.model))}, result)
        return result

    def train_stage(self, stage: StagePlan) -> StageResult:
        """Train the stage's model from its teachers: its methods' pre-training, then its epochs."""
        config, device = self.config, self.device
        model, spec = self.models[stage.model], self.plan.models[stage.model]
        teachers = [self.models[k] for k in stage.teachers]
        bundle = self.data(stage.data)
        seed_everything(stage.seed)
        model.requires_grad_(True)  # it may have taught in an earlier stage, frozen
        if spec.from_teacher is not None and self.folder.resume_point(stage.name) is None:
            self.initialise_from_teacher(stage)
        int8 = quantization_aware(model) if stage.train.quantization_aware else contextlib.nullcontext()
        prune = stage.train.prune
        if prune is not None and prune.channels is not None:  # one shot, before shapes are probed
            removed = prune_channels(model, self.example(stage), prune.channels, prune.keep)
            self.say(f"{stage.name}: pruned {100 * prune.channels:.0f}% of the channels ({removed:,} parameters)")
        pruning = magnitude_pruning(model, prune.sparsity, prune.epochs, prune.keep) \
            if prune is not None and prune.sparsity is not None else contextlib.nullcontext()
        with frozen(model, stage.freeze, stage.unfreeze), int8 as quantized, pruning as pruner, \
                self.distiller(stage) as distiller:
            if config.compile:  # after the hooks are in place: compiled graphs keep them
                backend = "inductor" if config.compile is True else config.compile
                for module in [model, *teachers]:
                    module.compile(backend=backend)
            train_loader, test_loader = make_loaders(distiller.prepare_data(bundle.train), bundle.test, stage.data,
                                                     stage.seed)
            val_loader = eval_loader(bundle.val, stage.data) if bundle.val is not None else None
            resume = self.folder.resume_point(stage.name)
            if resume is None:
                for term_name, _ in distiller.pretrain_stages():
                    self.run_pretraining(stage, distiller, term_name, train_loader, test_loader, val_loader, spec)
            if pruner is not None:  # after the methods' pre-training: the stage's own epochs prune
                distiller.epoch_listeners.append(pruner.set_epoch)
            self.folder.state.update(stage.name, status="running",
                                     checkpoint=self.folder.relative(self.folder.checkpoints(stage.name, stage.final)["last"]))
            logger = self.folder.logger(stage.name, final=stage.final)
            try:
                self.lineage.use_teachers(logger, stage)
                settings = self.settings(stage.name, stage.train, stage.final, spec, model=model)
                if config.logger.media and (run := wandb_logger(logger)) is not None:
                    settings.epoch_end = epoch_pictures(distiller, fixed_batch(bundle.test, device), run,
                                                        stage.train.epochs)
                result = fit(distiller, train_loader, test_loader, settings, device, logger, resume=resume,
                             stop=self.stop, val_loader=val_loader)
                self.results[stage.name] = result
                self.heads.pop(stage.model, None)
                if isinstance(deployed := distiller.deployed, HeadedStudent):
                    self.heads[stage.model] = deployed
                summary = {"best_acc": result.best_acc, "best_epoch": result.best_epoch,
                           "last_acc": result.last_acc, "params": count_parameters(deployed)}
                if stage.final:  # what the export starts from: the float model (its top-1 is int8-simulated)
                    with quantized.suspended() if quantized is not None else contextlib.nullcontext():
                        self.final_outcome = self.outcome()
                    summary.update(self.final_outcome.values())
                logger.summary(summary)
                self.lineage.log_stage(logger, stage, result)
                if stage.final:
                    log_final_tables(logger, self.folder.path, bundle.class_names)
            finally:
                logger.finish()
        self.folder.state.update(stage.name, status="done", result=asdict(result))
        if not stage.final:
            best = "at the epoch best on validation" if result.val_acc is not None else "best"
            self.say(f"{stage.name}: {spec.model} trained, top-1 last {result.last_acc:.2f}% "
                     f"({best} {result.best_acc:.2f}%)")
        return result

    def run_pretraining(self, stage: StagePlan, distiller: Distiller, term_name: str, train_loader: DataLoader,
                        test_loader: DataLoader, val_loader: DataLoader | None, spec: ModelConfig) -> None:
        """The pre-training stage of one of the stage's methods, logged as its own stage."""
        objective = distiller.pretraining(term_name)
        name = stage.pretrain_name(term_name)
        settings = stage.terms[term_name].pretrain
        epochs = objective.stage.epochs if settings.epochs is None else settings.epochs
        record = self.folder.state.get(name)
        checkpoints = self.folder.checkpoints(name, final=False)
        if record.get("status") == "done":
            restore_weights(distiller, load_checkpoint(checkpoints["last"]))
            return
        if epochs == 0:
            return
        train_cfg = TrainConfig(epochs=epochs, optimizer=settings.optimizer or stage.train.optimizer,
                                scheduler=settings.scheduler, grad_clip=stage.train.grad_clip,
                                accumulate=stage.train.accumulate)
        resume = self.folder.resume_point(name)
        self.folder.state.update(name, status="running", checkpoint=self.folder.relative(checkpoints["last"]))
        logger = self.folder.logger(name)
        try:
            trains = objective.stage.trains
            result = fit(objective, train_loader, test_loader,
                         self.settings(name, train_cfg, spec=spec, evaluate_student="student" in trains),
                         self.device, logger, resume=resume, stop=self.stop, val_loader=val_loader)
            logger.summary({"epochs": epochs, "trains": list(trains)})
        finally:
            logger.finish()
        self.folder.state.update(name, status="done", result=asdict(result))
        self.results[name] = result
        self.say(f"{name}: {objective.stage.description} ({epochs} epochs, {result.seconds:.1f}s)")

    def run_specialists(self, stage: StagePlan) -> StageResult:
        """Train specialists of a generalist on the classes it confuses; register their ensemble
        as the model `stage.model` (the stage's name), for later stages to learn from."""
        cfg = stage.specialists
        generalist = self.models[cfg.generalist]
        bundle = self.data(stage.data)
        path = self.folder.checkpoints(stage.name, stage.final)["last"]
        record = self.folder.state.get(stage.name)
        if record.get("status") == "done":
            self.models[stage.model] = sp.load_specialists(load_checkpoint(path), generalist, cfg, self.device)
            return StageResult(**record["result"])
        if distributed.is_distributed():
            raise ConfigError(f"stage {stage.name!r}: specialists are trained in a single process; run it without torchrun.")
        self.folder.state.update(stage.name, status="running")

        def fit_specialist(name: str, expert: nn.Module, cluster: list[int], loader: DataLoader,
                           test_loader: DataLoader) -> None:
            logger = self.folder.logger(name)
            try:
                with Distiller(None, expert, [Term("ce")]) as distiller:
                    result = fit(distiller, loader, test_loader, self.settings(name, stage.train), self.device,
                                 logger, stop=self.stop)
                logger.summary({"classes": cluster, "last_acc": result.last_acc})
            finally:
                logger.finish()
            self.say(f"{name}: specialist for classes {cluster} (+ dustbin), top-1 on its label space "
                     f"{result.last_acc:.2f}%")

        started = time.perf_counter()
        ensemble = sp.train_specialists(generalist, bundle.train, bundle.test, bundle.num_classes, cfg,
                                        stage.data.batch_size, stage.data.eval_batch_size, stage.seed, self.device,
                                        fit_specialist, stage.name)
        self.models[stage.model] = ensemble
        _, test_loader = make_loaders(bundle.train, bundle.test, stage.data, stage.seed)
        general_acc = evaluate(generalist, test_loader, self.device)["acc"]
        ensemble_acc = evaluate(ensemble, test_loader, self.device)["acc"]
        result = StageResult(stage.name, ensemble_acc, stage.train.epochs, ensemble_acc, stage.train.epochs,
                             time.perf_counter() - started, str(path))
        if distributed.rank() == 0:
            save_checkpoint(path, {**ensemble.payload(), "generalist_acc": general_acc, "result": asdict(result)})
        logger = self.folder.logger(stage.name)  # the ensemble's own W&B run: its lineage and its numbers
        try:
            self.lineage.use_teachers(logger, stage)
            logger.summary({"generalist_acc": general_acc, "ensemble_acc": ensemble_acc, "clusters": ensemble.clusters})
            self.lineage.log_ensemble(logger, stage, path, result, ensemble.clusters)
        finally:
            logger.finish()
        self.folder.state.update(stage.name, status="done", checkpoint=self.folder.relative(path),
                                 result=asdict(result), clusters=ensemble.clusters, generalist_acc=general_acc)
        self.say(f"{stage.name}: generalist top-1 {general_acc:.2f}%, generalist + {len(ensemble.clusters)} "
                 f"specialists {ensemble_acc:.2f}% (clusters {ensemble.clusters})")
        return result

    def outcome(self) -> RunResult:
        """Accuracies, agreement, sizes and multiply-adds of the final stage's models."""
        final = self.plan.final
        data = self.data(final.data)
        _, test_loader = make_loaders(data.train, data.test, final.data, final.seed)
        teachers = [(self.plan.models[k].model if k in self.plan.models else "specialists", self.models[k])
                    for k in final.teachers]
        return measure(self.folder.path, self.results, final.name, self.deployed(final.model), teachers, test_loader,
                       self.bundle.example_input(1), self.device, self.config.precision, self.config.channels_last,
                       self.config.measure)


def train(config: Config, run_dir: Path | str | None = None, verbose: bool = True, resume: bool = False) -> RunResult:
    """Run every stage of a validated config; return accuracies and the run folder.

    Data and models are built and every stage is set up on the untrained models first, so a
    mistake stops the run before its folder exists and anything trains. With
    `config.progress`, a terminal shows live bars; `verbose` adds per-epoch lines where there
    is no terminal, and notes such as a stage taken from the cache. `resume=True` continues the
    run in `run_dir` from its last checkpoint. Under `torchrun`, each process joins the process
    group and trains its shard.
    """
    started_group = distributed.launched_by_torchrun() and not distributed.is_distributed()
    device = distributed.setup(config.device) if distributed.launched_by_torchrun() else resolve_device(config.device)
    try:
        # W&B online needs a login and a way to its server: checked before anything is built
        config = config.model_copy(update={"logger": checked_settings(config.logger)})
        run = Run(config, device, verbose)
        run.check()
        if resume:
            path = Path(run_dir)  # type: ignore[arg-type]
        else:
            path = Path(distributed.broadcast_object(str(RunFolder.create(config, run_dir))
                                                     if distributed.rank() == 0 else None))
        with StopRequest() as stop:
            return run.run(RunFolder(path, config), stop)
    finally:
        if started_group:
            distributed.teardown()


def check(config: Config) -> None:
    """Everything `train` checks before it starts: the config's data, models and every stage's
    terms, set up on the untrained models (on the CPU)."""
    Run(config, torch.device("cpu"), verbose=False).check()
