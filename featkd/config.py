"""Experiment configs: YAML files, composition, dotted overrides and strict validation.

    cfg = load_config("configs/quickstart.yaml", ["loss.kd.temperature=2", "logger=none"])

A file may name a `base:` file (or a list of them), resolved relative to itself; the file's
own keys are deep-merged over the base. Overrides `a.b.c=value` parse `value` as YAML and
create missing mappings. `null` removes a loss term (`loss.kd=null`).

Validation is strict: an unknown key, a wrong type, an unknown registry name or an argument a
loss/model/optimizer does not take raises `ConfigError` naming the key and what is allowed.
YAML is read with `yaml.safe_load`, so a config never executes code.
"""

from __future__ import annotations

import copy
import types
import typing
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, model_validator

from featkd.errors import ConfigError, FeatkdError, did_you_mean


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


def _shorthand(key: str):
    """Accept a bare string for a section: `logger: none` means `logger: {name: none}`."""

    @model_validator(mode="before")
    @classmethod
    def expand(cls, value: Any) -> Any:
        return {key: value} if isinstance(value, str) else value

    return expand


class OptimizerConfig(BaseModel):
    """`name` from `featkd list optimizers`; other keys are that optimizer's arguments."""

    model_config = ConfigDict(extra="allow")
    name: str = "sgd"
    _expand = _shorthand("name")

    @property
    def args(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class SchedulerConfig(BaseModel):
    """`name` from `featkd list schedulers`; other keys are that schedule's arguments."""

    model_config = ConfigDict(extra="allow")
    name: str = "cosine"
    _expand = _shorthand("name")

    @property
    def args(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class DataConfig(_Strict):
    """A dataset by registry name (`featkd list datasets`) with its arguments."""

    name: str = "digits"
    args: dict[str, Any] = Field(default_factory=dict)
    batch_size: PositiveInt = 64
    eval_batch_size: PositiveInt = 512
    num_workers: NonNegativeInt = 0
    _expand = _shorthand("name")


class PruneConfig(_Strict):
    """Pruning in a stage (`featkd.deploy.prune`), one of: `sparsity`, the fraction of conv and
    linear weights set to zero by global magnitude, reached over the first `epochs` epochs on
    a cubic schedule; or `channels`, the fraction of each layer's channels removed outright
    (by L2 magnitude, with torch-pruning) at the start of the stage. `keep` lists module-name
    globs left whole (the classifier always is)."""

    sparsity: float | None = Field(default=None, gt=0, lt=1)
    channels: float | None = Field(default=None, gt=0, lt=1)
    epochs: PositiveInt = 1
    keep: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _one_kind(self) -> PruneConfig:
        if (self.sparsity is None) == (self.channels is None):
            raise ValueError("prune: give `sparsity` (weights set to zero) or `channels` (channels removed), one of them")
        return self


class TrainConfig(_Strict):
    """How one model is trained: epochs, optimizer, schedule, clipping, accumulation; the
    checkpoints of the epochs in `checkpoint_epochs` are kept (`<stage>-epoch<N>.pt`, or `epoch<N>.pt`
    for the final stage), e.g. for an early-stopped teacher; `quantization_aware` fine-tunes
    it for int8 and `prune` prunes it by magnitude (the stage's teachers keep distilling).""" 

    epochs: PositiveInt = 30
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    grad_clip: float | None = Field(default=None, gt=0)
    accumulate: PositiveInt = 1
    checkpoint_epochs: list[PositiveInt] = Field(default_factory=list)
    #: train the model as int8 will run it (fake-quantized linear and conv layers, `featkd.deploy.qat`)
    quantization_aware: bool = False
    #: prune the model's weights by magnitude during the stage (`featkd.deploy.prune`)
    prune: PruneConfig | None = None


class ModelConfig(_Strict):
    """A model by registry name (`featkd list models`, `timm:<name>`, `torchvision:<name>`),
    with weights from a featkd `checkpoint` or a plain `pretrained` state-dict file if given."""

    model: str
    args: dict[str, Any] = Field(default_factory=dict)
    pretrained: str | None = None
    checkpoint: str | None = None
    #: start from the first teacher of its stage with only these of its layers (DistilBERT's
    #: initialisation): "every_other", a list of teacher layer indices, or a layer count
    from_teacher: str | int | list[NonNegativeInt] | None = None
    _expand = _shorthand("model")


class TeacherConfig(ModelConfig):
    """A teacher: loaded from `checkpoint`, or trained first with `train` and `seed` on the
    run's data (or on its own `data`)."""

    train: TrainConfig = Field(default_factory=TrainConfig)
    seed: int = 0
    cache: bool = True
    data: DataConfig | None = None


class PretrainConfig(_Strict):
    """A method's pre-training stage: `epochs` (default: the method's; 0 skips it), optimizer
    (default: the distillation stage's) and schedule."""

    epochs: NonNegativeInt | None = None
    optimizer: OptimizerConfig | None = None
    scheduler: SchedulerConfig = Field(default_factory=lambda: SchedulerConfig(name="constant"))


class TermConfig(BaseModel):
    """One loss term; the key in `loss:` names it, `type` picks the loss (default: the key).
    Keys other than the ones below are the loss's hyper-parameters."""

    model_config = ConfigDict(extra="allow")
    type: str | None = None
    weight: float | None = None
    student: str | list[str] | None = None
    teacher: str | list[str] | None = None
    adapter: str | None = "default"  # "default": the loss's own choice; null: none
    teacher_index: NonNegativeInt = 0
    gather: bool = False
    layer_map: str = "in_order"  # or "uniform": TinyBERT's g(m) = m * N / M
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class MeasureConfig(_Strict):
    """What a finished run measures of its student and teachers beside top-1 (summary.json, W&B):
    parameters, multiply-adds and weights size always; CPU inference latency at `batch_sizes`
    (median and 90th percentile of `repeats` timed calls after `warmup`, on `threads` threads,
    default torch's count) unless `latency: false`. `measure: false` is short for that."""

    latency: bool = True
    batch_sizes: list[PositiveInt] = Field(default_factory=lambda: [1, 32])
    repeats: PositiveInt = 30
    warmup: NonNegativeInt = 5
    threads: PositiveInt | None = None

    @model_validator(mode="before")
    @classmethod
    def _flag(cls, value: Any) -> Any:
        return {"latency": value} if isinstance(value, bool) else value


class TeacherCacheConfig(_Strict):
    """Keep the teachers' outputs per training view and reuse them (`teacher_cache: true`)."""

    enabled: bool = False
    dtype: Literal["fp16", "bf16", "fp32"] = "fp16"
    features: list[str] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _flag(cls, value: Any) -> Any:
        return {"enabled": value} if isinstance(value, bool) else value


class LoggerConfig(_Strict):
    """Weights & Biases settings (offline by default: no account or network needed).

    `fallback: offline` lets `mode: online` log offline, with a note, where W&B has no login
    or cannot be reached (without it, that is an error before anything trains). `media: true`
    adds pictures of what the feature terms compare (attention maps, sample similarities) at
    the first and the last epoch of each stage."""

    name: Literal["wandb", "none"] = "wandb"
    project: str = "featkd"
    entity: str | None = None
    group: str | None = None
    job_type: str | None = None
    tags: list[str] = Field(default_factory=list)
    mode: Literal["offline", "online", "disabled"] = "offline"
    fallback: Literal["offline"] | None = None
    media: bool = False
    _expand = _shorthand("name")

    @model_validator(mode="after")
    def _media_needs_wandb(self) -> LoggerConfig:
        if self.media and (self.name != "wandb" or self.mode == "disabled"):
            raise ValueError("`media: true` draws pictures for W&B, which this config turns off; set name: wandb "
                             "(mode offline or online), or media: false")
        return self


def _live_terms(loss: dict[str, TermConfig | None]) -> dict[str, TermConfig]:
    return {k: v for k, v in loss.items() if v is not None}


class SpecialistsConfig(_Strict):
    """Train specialists on the classes `generalist` confuses (Hinton et al. 2015, section 5)."""

    generalist: str
    clusters: PositiveInt = 3
    top_n: PositiveInt = 1
    specialty_fraction: float = Field(default=0.5, gt=0, le=1)
    iterations: PositiveInt = 50


class StageConfig(_Strict):
    """One stage of an explicit multi-stage run: train `model` (a key of `models:`) with
    `loss`, distilling from the models named in `teacher` (trained by earlier stages or
    loaded from checkpoints). `freeze` / `unfreeze` are parameter-name globs of the trained
    model, applied in that order for this stage only. A stage with `cache: true` is reused
    from the cache when an identical one (same models, data, settings, seed) ran before.
    `data` replaces the run's data for this stage (same classes and input shape)."""

    name: str
    model: str | None = None
    specialists: SpecialistsConfig | None = None
    teacher: list[str] = Field(default_factory=list)
    loss: dict[str, TermConfig | None] | None = None  # a model stage's default: cross-entropy only
    train: TrainConfig = Field(default_factory=TrainConfig)
    freeze: list[str] = Field(default_factory=list)
    unfreeze: list[str] = Field(default_factory=list)
    seed: int | None = None
    cache: bool = False
    data: DataConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _teacher_list(cls, value: Any) -> Any:
        if isinstance(value, dict) and isinstance(value.get("teacher"), str):
            value = {**value, "teacher": [value["teacher"]]}
        return value

    @model_validator(mode="after")
    def _one_kind(self) -> StageConfig:
        if (self.model is None) == (self.specialists is None):
            raise ValueError("a stage trains one `model`, or trains `specialists` of a generalist: give exactly one")
        if self.specialists is not None and (self.teacher or self.loss is not None):
            raise ValueError("a specialists stage takes no `teacher` or `loss`: its specialists learn from labels")
        if self.model is not None and self.loss is None:
            self.loss = {"ce": TermConfig()}
        return self

    @property
    def terms(self) -> dict[str, TermConfig]:
        return _live_terms(self.loss or {})


class Config(_Strict):
    """One experiment: either `teacher` + `student` + `loss` + `train` (teachers are trained or
    loaded, then the student is distilled), or `models` + `stages` for any chain of stages
    (a teacher-assistant chain, fine-tuning, ...)."""

    name: str = "run"
    seed: int = 0
    device: str = "auto"
    output_dir: str = "runs"
    plugins: list[str] = Field(default_factory=list)
    data: DataConfig = Field(default_factory=DataConfig)
    teacher: list[TeacherConfig] | None = None
    student: ModelConfig | None = None
    loss: dict[str, TermConfig | None] = Field(default_factory=lambda: {"ce": TermConfig()})
    train: TrainConfig = Field(default_factory=TrainConfig)
    models: dict[str, ModelConfig] | None = None
    stages: list[StageConfig] | None = None
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    nonfinite: Literal["error", "skip"] = "error"
    teacher_cache: TeacherCacheConfig = Field(default_factory=TeacherCacheConfig)
    measure: MeasureConfig = Field(default_factory=MeasureConfig)
    channels_last: bool = False
    compile: bool | str = False
    logger: LoggerConfig = Field(default_factory=LoggerConfig)
    progress: bool = True

    @model_validator(mode="before")
    @classmethod
    def _teacher_list(cls, value: Any) -> Any:
        if isinstance(value, dict) and isinstance(value.get("teacher"), (str, dict)):
            value = {**value, "teacher": [value["teacher"]]}
        return value

    @model_validator(mode="after")
    def _one_form(self) -> Config:
        sugar = {"teacher", "student", "loss", "train"} & self.model_fields_set
        if self.stages is not None:
            if sugar:
                raise ValueError(f"a config with `stages:` describes models in `models:`; remove {sorted(sugar)}")
            if not self.models:
                raise ValueError("`stages:` needs the models they train in `models:`")
            if not self.stages:
                raise ValueError("`stages:` is empty")
        elif self.student is None:
            raise ValueError("give `student:` (and `teacher:`, `loss:`), or `models:` and `stages:`")
        elif self.models is not None:
            raise ValueError("`models:` goes with `stages:`; without stages, use `teacher:` and `student:`")
        return self

    @property
    def terms(self) -> dict[str, TermConfig]:
        """Loss terms of the distillation (the last stage), without the ones removed with null."""
        return self.stages[-1].terms if self.stages else _live_terms(self.loss)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (what is saved as config.yaml and sent to W&B), in the config's own form."""
        unused = {"teacher", "student", "loss", "train"} if self.stages is not None else {"models", "stages"}
        return self.model_dump(mode="json", exclude=unused)


# -- loading -----------------------------------------------------------------------------


def deep_merge(base: dict, top: Mapping) -> dict:
    """`top` over `base`, recursively for mappings; lists and scalars are replaced, except that
    a mapping over a list of named mappings (`stages`) changes its entries by name (see
    `merge_named`)."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(dict(out[key]), value)
        elif isinstance(value, Mapping) and _named_list(out.get(key)):
            out[key] = merge_named(out[key], value, key)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _named_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, Mapping) and "name" in v for v in value)


def merge_named(entries: list[Mapping], changes: Mapping, where: str = "stages") -> list[dict]:
    """Change a list of named mappings by name, so that a variant or a derived config can touch
    one stage of a chain without restating the others: `{qat: {train: {epochs: 3}}}` merges
    into the entry named `qat`, `{qat: null}` removes it, and a new name is appended (its
    entry needs everything a new one needs)."""
    out = [dict(copy.deepcopy(e)) for e in entries]
    names = [e["name"] for e in out]
    for name, change in changes.items():
        if name in names:
            index = names.index(name)
            if change is None:
                del out[index], names[index]
            elif isinstance(change, Mapping):
                out[index] = deep_merge(out[index], {**change, "name": change.get("name", name)})
                names[index] = out[index]["name"]
            else:
                raise ConfigError(f"{where}.{name}: give a mapping of changes to that entry, or null to remove it.")
        elif change is None:
            raise ConfigError(f"{where}: there is no entry named {name!r} to remove; the names are "
                              f"{', '.join(map(repr, names))}.")
        elif isinstance(change, Mapping):
            out.append({"name": name, **copy.deepcopy(dict(change))})
            names.append(name)
        else:
            raise ConfigError(f"{where}.{name}: a new entry must be a mapping (its settings).")
    return out


def find_config(path: str | Path) -> Path:
    """A config path, or one shipped with featkd by name (`quickstart`, `zoo/crd`)."""
    path = Path(path)
    if path.is_file():
        return path
    parts = list(path.with_suffix(".yaml").parts if path.suffix != ".yaml" else path.parts)
    if parts and parts[0] == "configs":
        parts = parts[1:]
    shipped_root = resources.files("featkd.configs")
    if parts and not path.is_absolute():
        packaged = shipped_root.joinpath(*parts)
        if packaged.is_file():
            return Path(str(packaged))
    shipped = sorted(str(p.relative_to(Path(str(shipped_root)))) for p in Path(str(shipped_root)).rglob("*.yaml"))
    raise ConfigError(f"config file {str(path)!r} not found. Configs shipped with featkd: {', '.join(shipped)}.")


def read_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML config with its `base:` files merged in."""
    path = find_config(path).resolve()
    if path in _seen:
        raise ConfigError(f"config {str(path)!r} is its own base (a cycle of base: files).")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path.name}: not valid YAML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{str(path)!r} is not a text file; a config is YAML (e.g. configs/quickstart.yaml).") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path.name}: a config is a mapping of keys, got {type(data).__name__}.")
    bases = data.pop("base", None) or []
    merged: dict[str, Any] = {}
    for base in [bases] if isinstance(bases, str) else bases:
        merged = deep_merge(merged, read_yaml(path.parent / base, (*_seen, path)))
    return deep_merge(merged, data)


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides; `value` is parsed as YAML.

    `teacher` is always a list here: `teacher.1.seed=3` addresses the second teacher, and
    `teacher.seed=3` the only one.
    """
    data = copy.deepcopy(data)
    if isinstance(data.get("teacher"), (str, dict)):
        data["teacher"] = [data["teacher"]]
    if isinstance(data.get("teacher"), list):
        data["teacher"] = [{"model": t} if isinstance(t, str) else t for t in data["teacher"]]
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key.path=value (e.g. loss.kd.temperature=2).")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        parts = key.strip().split(".")
        node: Any = data
        for depth, part in enumerate(parts[:-1]):
            where = ".".join(parts[: depth + 1])
            if isinstance(node, list):
                if len(node) == 1 and not part.lstrip("-").isdigit():  # teacher.seed: the only teacher
                    node = node[0]
                else:
                    node = node[_list_index(part, node, where)]
                    continue
            if isinstance(node, str):
                raise ConfigError(f"override {item!r}: {where} is {node!r}, not a mapping.")
            if node.get(part) is None:
                node[part] = {}
            elif isinstance(node[part], str):  # shorthand such as `logger: none`
                node[part] = {_SHORTHAND_KEYS.get(parts[depth], "name"): node[part]}
            elif isinstance(node[part], bool):  # a flag standing for a section: `teacher_cache: true`
                node[part] = {"enabled": node[part]}
            elif not isinstance(node[part], (dict, list)):
                raise ConfigError(f"override {item!r}: {where} is {node[part]!r}, not a mapping.")
            node = node[part]
        last = parts[-1]
        if isinstance(node, list) and len(node) == 1 and not last.lstrip("-").isdigit():
            node = node[0]
        if isinstance(node, list):
            node[_list_index(last, node, key)] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise ConfigError(f"override {item!r}: {'.'.join(parts[:-1])} is {node!r}, not a mapping.")
    return data


_SHORTHAND_KEYS = {"student": "model", "teacher": "model"}


def _list_index(part: str, node: list, where: str) -> int:
    if not part.lstrip("-").isdigit() or not -len(node) <= int(part) < len(node):
        raise ConfigError(f"{where}: {part!r} is not an index of a list of {len(node)}.")
    return int(part)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (), data: dict | None = None) -> Config:
    """Load, merge, override and validate a config (a file path, or `data` directly)."""
    raw = read_yaml(path) if path is not None else copy.deepcopy(data or {})
    return validate(apply_overrides(raw, overrides))


def smoke_config(config: Config, output_dir: str | None = None) -> Config:
    """A tiny version of a config, to check it end to end in seconds on a CPU: every dataset
    becomes 16 synthetic samples of the same classes and input shape (ImageNet-sized inputs
    shrink to 64x64; a validation split stays, of 8 samples), text keeps its tokenizer with
    a few samples, every stage runs one epoch,
    checkpoints and pretrained files to load are dropped (the models train briefly instead),
    nothing is logged, latency is not measured, and steps whose loss is not finite are
    skipped (a smoke run checks the wiring, on noise, not the numbers)."""
    from featkd.data import SHAPES, build_data, text_smoke_args

    data = config.to_dict()

    def tiny(section: dict[str, Any]) -> dict[str, Any]:
        if section["name"] not in SHAPES and build_data(section["name"], section.get("args")).text is not None:
            return {**section, "batch_size": 8, "eval_batch_size": 8, "num_workers": 0,
                    "args": {**(section.get("args") or {}), **text_smoke_args(section["name"], section.get("args"))}}
        if section["name"] in SHAPES:
            classes, shape = SHAPES[section["name"]]
        else:
            bundle = build_data(section["name"], section.get("args"))
            classes, shape = bundle.num_classes, bundle.input_shape
        shape = [shape[0], *(min(s, 64) for s in shape[1:])]
        held_out = {"validation_size": 8} if (section.get("args") or {}).get("validation_fraction") else {}
        return {**section, "name": "synthetic", "batch_size": 8, "eval_batch_size": 8, "num_workers": 0,
                "args": {"num_classes": classes, "input_shape": shape, "train_size": 16, "test_size": 8, **held_out}}

    def short(train: dict[str, Any]) -> dict[str, Any]:
        return {**train, "epochs": 1}

    def loss(terms: dict[str, Any]) -> dict[str, Any]:
        from featkd.losses import LOSSES

        out = {}
        for name, term in terms.items():
            if term is not None:
                cls = LOSSES.get(term.get("type") or name)
                term = cls.smoke_params({**term})
                if cls.pretrain is not None and (term.get("pretrain") or {}).get("epochs") != 0:
                    term["pretrain"] = {**(term.get("pretrain") or {}), "epochs": 1}
            out[name] = term
        return out

    data.update(data=tiny(data["data"]), logger={"name": "none"}, progress=False, compile=False, nonfinite="skip",
                measure={**data.get("measure", {}), "latency": False})
    if "train" in data:
        data.update(train=short(data["train"]), loss=loss(data["loss"]))
    for teacher in data.get("teacher") or []:
        teacher.update(train=short(teacher["train"]), checkpoint=None, pretrained=None)
        if teacher.get("data"):
            teacher["data"] = tiny(teacher["data"])
    for model in (data.get("models") or {}).values():
        model.update(checkpoint=None, pretrained=None)
    if data.get("student"):
        data["student"].update(checkpoint=None, pretrained=None)
    for stage in data.get("stages") or []:
        stage.update(train=short(stage["train"]), loss=loss(stage["loss"]) if stage["loss"] is not None else None)
        if stage.get("data"):
            stage["data"] = tiny(stage["data"])
    if output_dir is not None:
        data["output_dir"] = output_dir
    return validate(data)


def validate(data: dict[str, Any]) -> Config:
    """Structure and types (pydantic), then registry names and arguments."""
    try:
        config = Config.model_validate(data)
    except pydantic.ValidationError as exc:
        raise ConfigError(_format_errors(exc)) from None
    check_semantics(config)
    return config


def check_semantics(config: Config) -> None:
    """Names that must exist in registries, and arguments their constructors must accept;
    every stage's loss terms, built as the trainer builds them (`featkd.terms`)."""
    from featkd.registry import import_plugins

    import_plugins(config.plugins)
    _check_data("data", config.data)
    for i, teacher in enumerate(config.teacher or []):
        if teacher.data is not None:
            _check_data(f"teacher.{i}.data", teacher.data)
    for i, stage in enumerate(config.stages or []):
        if stage.data is not None:
            _check_data(f"stages.{i}.data", stage.data)
    if config.stages is None:
        _check_model(config.student, "student")
        for i, teacher in enumerate(config.teacher or []):
            key = "teacher" if len(config.teacher or []) == 1 else f"teacher.{i}"
            _check_model(teacher, key)
            _check_training(f"{key}.train", teacher.train)
        _check_training("train", config.train)
        _check_terms("loss", config.terms, len(config.teacher or []), "set `teacher:`")
    else:
        _check_stages(config)
    if not (config.device in ("auto", "cpu", "cuda", "mps") or config.device.startswith("cuda:")):
        raise ConfigError(f"device: {config.device!r}; use auto, cpu, cuda, cuda:N or mps.")


def _check_data(key: str, data: DataConfig) -> None:
    from featkd.data import DATASETS

    named(f"{key}.name", lambda: DATASETS.check_arguments(data.name, data.args, f"{key}.args"))


def named(key: str, fn: Any) -> Any:
    """Run a check; a FeatkdError becomes a ConfigError that starts with the config key."""
    try:
        return fn()
    except FeatkdError as exc:
        message = str(exc)
        raise ConfigError(message if message.startswith(key) else f"{key}: {message}") from None


def _check_model(spec: ModelConfig, key: str) -> None:
    from featkd.models import check_model_name

    named(f"{key}.model", lambda: check_model_name(spec.model, spec.args, f"{key}.args"))


def _check_stages(config: Config) -> None:
    models = config.models or {}
    for key, spec in models.items():
        _check_model(spec, f"models.{key}")
    ready = {k for k, m in models.items() if m.checkpoint or m.pretrained}
    seen: set[str] = set()
    for i, stage in enumerate(config.stages or []):
        key = f"stages.{i}"
        if stage.name in seen:
            raise ConfigError(f"{key}.name: two stages are named {stage.name!r}; stage names must be unique.")
        seen.add(stage.name)
        if stage.specialists is not None:
            general = stage.specialists.generalist
            if general not in models:
                raise ConfigError(f"{key}.specialists.generalist: no model {general!r} in `models:`."
                                  f"{did_you_mean(general, models)}")
            if general not in ready:
                raise ConfigError(f"{key}.specialists.generalist: {general!r} is not trained by an earlier stage "
                                  "nor loaded from a checkpoint.")
            if stage.name in models:
                raise ConfigError(f"{key}.name: {stage.name!r} names the specialists' ensemble and is already a "
                                  "model in `models:`; rename the stage.")
            _check_training(f"{key}.train", stage.train)
            ready.add(stage.name)
            models = {**models, stage.name: models[general]}  # later stages may learn from the ensemble
            continue
        for field, names in (("model", [stage.model]), ("teacher", stage.teacher)):
            for name in names:
                if name not in models:
                    raise ConfigError(f"{key}.{field}: no model {name!r} in `models:`.{did_you_mean(name, models)}")
        for teacher in stage.teacher:
            if teacher == stage.model:
                raise ConfigError(f"{key}.teacher: stage {stage.name!r} cannot distil {teacher!r} into itself.")
            if teacher not in ready:
                raise ConfigError(
                    f"{key}.teacher: {teacher!r} is neither trained by an earlier stage nor loaded from a "
                    f"`checkpoint:`/`pretrained:` file, so it would teach untrained. Train it in a stage "
                    f"before {stage.name!r} or give models.{teacher}.checkpoint."
                )
        _check_training(f"{key}.train", stage.train)
        _check_terms(f"{key}.loss", stage.terms, len(stage.teacher), f"set {key}.teacher")
        ready.add(stage.model)


def _check_terms(key: str, loss: dict[str, TermConfig], teachers: int, add_teacher: str) -> None:
    """Build the terms of a `loss:` section as the trainer will: the loss, its arguments and
    the term's own rules are checked by the Term itself; the pre-training settings here."""
    from featkd.terms import terms_from

    if not loss:
        raise ConfigError(f"{key}: no terms left; keep at least one, e.g. {key}.ce.weight=1.")
    for term, spec in zip(terms_from(loss, key, add_teacher), loss.values()):
        term.check_teachers(teachers)
        where = f"{key}.{term.name}.pretrain"
        if spec.pretrain != PretrainConfig() and term.module.pretrain is None:
            raise ConfigError(f"{where}: {term.loss!r} has no pre-training stage.")
        if spec.pretrain.optimizer is not None:
            _check_optimizer(where, spec.pretrain.optimizer)
        _check_scheduler(where, spec.pretrain.scheduler)


def _check_training(key: str, train: TrainConfig) -> None:
    _check_optimizer(key, train.optimizer)
    _check_scheduler(key, train.scheduler)


def _check_optimizer(key: str, optimizer: OptimizerConfig) -> None:
    from featkd.optim import OPTIMIZERS

    named(f"{key}.optimizer", lambda: OPTIMIZERS.check_arguments(
        optimizer.name, optimizer.args, f"{key}.optimizer", injected=["params"]))


def _check_scheduler(key: str, scheduler: SchedulerConfig) -> None:
    from featkd.optim import SCHEDULERS

    named(f"{key}.scheduler", lambda: SCHEDULERS.check_arguments(
        scheduler.name, scheduler.args, f"{key}.scheduler", injected=["optimizer", "steps_per_epoch", "epochs"]))


# -- error messages ----------------------------------------------------------------------


def _format_errors(exc: pydantic.ValidationError) -> str:
    lines = []
    for error in exc.errors():
        loc = [str(p) for p in error["loc"]]
        key = ".".join(loc) or "(top level)"
        if error["type"] == "extra_forbidden":
            allowed = _allowed_keys(error["loc"][:-1])
            lines.append(
                f"{key}: unknown key.{did_you_mean(loc[-1], allowed)}"
                + (f" Allowed here: {', '.join(allowed)}." if allowed else "")
            )
        elif error["type"] == "missing":
            lines.append(f"{key}: required, but missing.")
        elif error["type"] == "value_error":
            lines.append(f"{key}: {error['msg'].removeprefix('Value error, ')}.")
        else:
            lines.append(f"{key}: {error['msg']} (got {error.get('input')!r}).")
    return "invalid config:\n  " + "\n  ".join(lines)


def _allowed_keys(loc: Sequence[Any]) -> list[str]:
    """Field names of the config section at `loc` (list indices and dict keys skipped)."""
    node: Any = Config
    skip = False
    for part in loc:
        if skip or isinstance(part, int):
            skip = False
            continue
        if not (isinstance(node, type) and issubclass(node, BaseModel)) or str(part) not in node.model_fields:
            return []
        node, skip = _element_type(node.model_fields[str(part)].annotation)
    return list(node.model_fields) if isinstance(node, type) and issubclass(node, BaseModel) else []


def _element_type(tp: Any) -> tuple[Any, bool]:
    """Strip Optional and list[...]; for dict[str, X] return X and say a key comes next."""
    keyed = False
    while True:
        origin = typing.get_origin(tp)
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if origin in (typing.Union, types.UnionType) and len(args) == 1:
            tp = args[0]
        elif origin in (list, tuple) and args:
            tp = args[0]
        elif origin is dict and len(args) == 2:
            tp, keyed = args[1], True
        else:
            return tp, keyed


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1} (the form W&B shows best)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def with_absolute_paths(config: Config) -> Config:
    """`config` with the files and folders it names (output_dir, checkpoints and pretrained
    weights to load, data roots) as absolute paths, so that it means the same from any folder."""
    data = config.to_dict()

    def absolute(section: dict[str, Any] | None, *keys: str) -> None:
        for key in keys:
            if section and isinstance(section.get(key), str):
                section[key] = str(Path(section[key]).expanduser().resolve())

    absolute(data, "output_dir")
    for model in [*(data.get("teacher") or []), data.get("student"), *(data.get("models") or {}).values()]:
        absolute(model, "checkpoint", "pretrained")
    for section in [data.get("data"), *(t.get("data") for t in data.get("teacher") or []),
                    *(s.get("data") for s in data.get("stages") or [])]:
        absolute((section or {}).get("args"), "root")
    return Config.model_validate(data)


def dump_yaml(config: Config) -> str:
    """The config as YAML, keys in their own order (what a run saves as config.yaml)."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
