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

from dataclasses import dataclass, field

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
    #: where the stage is written in the config ("stages.2"; "" for the simple form)
    key: str = ""

    def pretrain_name(self, term: str) -> str:
        return f"pretrain-{term}" if self.final else f"{self.name}-pretrain-{term}"

    @property
    def loss_key(self) -> str:
        """The config key of the stage's `loss:` section."""
        return f"{self.key}.loss" if self.key else "loss"

    @property
    def teacher_hint(self) -> str:
        """How the config gives this stage a teacher."""
        return f"set {self.key}.teacher" if self.key else "set `teacher:`"


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
        stages = [_explicit(config, stage, f"stages.{i}") for i, stage in enumerate(config.stages)]
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


def _explicit(config: Config, stage: StageConfig, key: str) -> StagePlan:
    return StagePlan(stage.name, stage.model or stage.name, list(stage.teacher), stage.terms, stage.train,
                     config.seed if stage.seed is None else stage.seed, stage.data or config.data, stage.cache,
                     list(stage.freeze), list(stage.unfreeze), specialists=stage.specialists, key=key)
