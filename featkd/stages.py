"""A run as a list of stages.

Both config forms become the same plan: a dict of models and an ordered list of stages, each
training one model (optionally distilling from others that earlier stages trained). The
simple form (`teacher:` + `student:` + `loss:`) plans a stage per teacher to train (cached,
so runs that differ only on the student side share them) and a final `distill` stage (or
`student` when there is no teacher). A method's pre-training stage (FitNets, FT, AB, FSP) is
run inside the stage that uses the method, before its own epochs, under the name
`pretrain-<term>` (or `<stage>-pretrain-<term>` for a stage other than the last).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from featkd.config import Config, DataConfig, ModelConfig, SpecialistsConfig, StageConfig, TermConfig, TrainConfig


@dataclass
class StagePlan:
    """One stage: which model it trains, from which teachers, with what loss and settings."""

    name: str
    model: str
    teachers: list[str]
    terms: dict[str, TermConfig]
    train: TrainConfig
    seed: int
    data: DataConfig
    cache: bool = False
    freeze: list[str] = field(default_factory=list)
    unfreeze: list[str] = field(default_factory=list)
    final: bool = False
    #: a specialists stage: trains specialists of a generalist; `model` names the ensemble
    specialists: SpecialistsConfig | None = None

    def pretrain_name(self, term: str) -> str:
        return f"pretrain-{term}" if self.final else f"{self.name}-pretrain-{term}"


@dataclass
class Plan:
    models: dict[str, ModelConfig]
    stages: list[StagePlan]

    @property
    def final(self) -> StagePlan:
        return self.stages[-1]


def plan_stages(config: Config) -> Plan:
    """The stages a config runs, in order."""
    if config.stages is not None:
        models = dict(config.models or {})
        stages = [_explicit(config, stage) for stage in config.stages]
    else:
        teachers = config.teacher or []
        keys = ["teacher"] if len(teachers) == 1 else [f"teacher{i}" for i in range(len(teachers))]
        models: dict[str, ModelConfig] = {k: t for k, t in zip(keys, teachers)}
        models["student"] = config.student
        stages = [
            StagePlan(key, key, [], {"ce": TermConfig()}, t.train, t.seed, t.data or config.data, cache=t.cache)
            for key, t in zip(keys, teachers) if not t.checkpoint
        ]
        stages.append(StagePlan("distill" if teachers else "student", "student", keys, config.terms, config.train,
                                config.seed, config.data))
    stages[-1].final = True
    return Plan(models, stages)


def _explicit(config: Config, stage: StageConfig) -> StagePlan:
    return StagePlan(stage.name, stage.model or stage.name, list(stage.teacher), stage.terms, stage.train,
                     config.seed if stage.seed is None else stage.seed, stage.data or config.data, stage.cache,
                     list(stage.freeze), list(stage.unfreeze), specialists=stage.specialists)


def cache_key(config: Config, plan: Plan, index: int) -> str:
    """A digest of everything that determines the weights stage `index` produces: its model,
    settings, seed and loss, the data, and (recursively) how its teachers were made."""

    def model_record(key: str, upto: int) -> Any:
        producer = next((i for i in range(upto - 1, -1, -1) if plan.stages[i].model == key), None)
        spec = plan.models[key].model_dump(mode="json", exclude={"cache", "data"}) if key in plan.models else None
        return {"spec": spec, "made_by": stage_record(producer) if producer is not None else None}

    def stage_record(i: int) -> Any:
        stage = plan.stages[i]
        return {
            "model": model_record(stage.model, i),
            "teachers": [model_record(t, i) for t in stage.teachers],
            "terms": {k: v.model_dump(mode="json") for k, v in stage.terms.items()},
            "train": stage.train.model_dump(mode="json"),
            "seed": stage.seed,
            "freeze": stage.freeze,
            "unfreeze": stage.unfreeze,
            "data": stage.data.model_dump(mode="json", exclude={"num_workers", "eval_batch_size"}),
            "specialists": stage.specialists.model_dump(mode="json") if stage.specialists else None,
            "generalist": model_record(stage.specialists.generalist, i) if stage.specialists else None,
        }

    record = {"stage": stage_record(index), "precision": config.precision}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def cache_path(config: Config, plan: Plan, index: int) -> Path:
    stage = plan.stages[index]
    model = plan.models[stage.model].model.replace(":", "_") if stage.model in plan.models else "specialists"
    return Path(config.output_dir) / "cache" / f"{model}-{cache_key(config, plan, index)}.pt"
