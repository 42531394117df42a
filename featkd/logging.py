"""Loggers: metrics.jsonl in the run folder (always) and Weights & Biases (offline by default).

Only rank 0 logs. A W&B run gets the flat resolved config, and project, group, job type and
tags from the config, so a dashboard can group the stages and seeds of one experiment. Every
stage's run plots its per-epoch metrics against `epoch` (W&B's own step is the optimizer
step) and summarises them by what they mean (`epoch_summary`), so the stages of a group line
up. Online mode is checked before a run starts (`checked_settings`): no login or no way to
the W&B server is an error, or, with `logger.fallback: offline`, a note and an offline run.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from featkd.distributed import rank
from featkd.errors import ConfigError

#: seconds to wait for the W&B server to answer a connection before calling it unreachable
REACH_TIMEOUT_S = 3.0


class Logger(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...
    def summary(self, values: dict[str, Any]) -> None: ...
    def finish(self) -> None: ...


class NullLogger:
    """Logs nothing (other ranks, or `logger=none` without a run folder)."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def summary(self, values: dict[str, Any]) -> None:
        pass

    def finish(self) -> None:
        pass


class JsonlLogger:
    """One JSON object per log call in `metrics.jsonl`; the summary in `summary.json`."""

    def __init__(self, run_dir: Path, stage: str) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.summary_path = run_dir / "summary.json"
        self.stage = stage

    def log(self, metrics: dict[str, float], step: int) -> None:
        record = {"stage": self.stage, "step": step, "time": round(time.time(), 3), **_plain(metrics)}
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")

    def summary(self, values: dict[str, Any]) -> None:
        existing = json.loads(self.summary_path.read_text()) if self.summary_path.exists() else {}
        existing[self.stage] = _plain(values)
        self.summary_path.write_text(json.dumps(existing, indent=2) + "\n")

    def finish(self) -> None:
        pass


class WandbLogger:
    """A W&B run; `mode="offline"` writes it under the run folder for `wandb sync` later.

    Resuming (`resume_id`) continues the same W&B run; the rows of `history` (metrics.jsonl's
    rows of this stage, up to the checkpoint resumed from) that W&B's files lack, because a
    killed process never wrote them, are logged again first, in step order. An online run that
    W&B refuses to start (a bad key, a server that does not answer) is a `ConfigError`, or an
    offline run with `fallback="offline"`.
    """

    def __init__(self, run_dir: Path, name: str, config: dict[str, Any], *, project: str, entity: str | None,
                 group: str | None, job_type: str | None, tags: list[str], mode: str,
                 resume_id: str | None = None, history: list[dict[str, Any]] = (),
                 fallback: str | None = None) -> None:
        import wandb

        resume: dict[str, Any] = {"id": resume_id, "resume": "allow"} if resume_id else {}
        start = dict(**resume, project=project, entity=entity, group=group, job_type=job_type, tags=tags or None,
                     name=name, config=config, dir=str(run_dir), reinit="finish_previous",
                     settings=wandb.Settings(console="off", silent=True, disable_git=True, save_code=False))
        try:
            self.run = wandb.init(**start, mode=mode)
        except wandb.errors.Error as exc:
            if mode != "online":
                raise
            if fallback != "offline":
                raise ConfigError(f"logger.mode online: W&B could not start the run ({_first_line(exc)}). "
                                  f"{ONLINE_ADVICE}") from None
            note(f"W&B could not start the run online ({_first_line(exc)}); logging offline instead "
                 "(logger.fallback: offline). Upload it later with `wandb sync`.")
            mode = "offline"
            self.run = wandb.init(**start, mode=mode)
        self.mode = mode
        self.last_step: int | None = None
        self._defined: set[str] = set()
        self.run.define_metric("epoch")
        if resume_id and history:
            self._log_missing(run_dir, history)

    def _define(self, metrics: dict[str, Any]) -> None:
        """Before a key's first value: a row with `epoch` is an epoch's row, and its keys are
        plotted against the epoch, with the summary `epoch_summary` gives them; other rows'
        keys keep W&B's step. Each key is defined by name: W&B's globs match by prefix and
        try overlapping ones in no fixed order."""
        if "epoch" not in metrics:
            return
        for key in metrics:
            if key != "epoch" and key not in self._defined:
                summary = epoch_summary(key)
                self.run.define_metric(key, step_metric="epoch", **({"summary": summary} if summary else {}))
                self._defined.add(key)

    def _log_missing(self, run_dir: Path, history: list[dict[str, Any]]) -> None:
        from featkd.wandb_files import logged_steps

        logged = logged_steps(run_dir, self.run_id)
        for row in sorted(history, key=lambda r: r["step"]):
            if row["step"] not in logged:
                self.log({k: v for k, v in row.items() if k not in ("stage", "step", "time")}, row["step"])

    @property
    def run_id(self) -> str | None:
        return getattr(self.run, "id", None)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._define(metrics)
        self.run.log(dict(metrics), step=step)
        self.last_step = step

    def log_rich(self, values: dict[str, Any], step: int | None = None) -> None:
        """Log W&B objects (tables, charts, images) in the row of `step`, by default the last
        logged one: they join an epoch's row instead of adding rows of their own, so the
        run's history keeps one row per epoch, as metrics.jsonl has."""
        step = self.last_step if step is None else step
        self.run.log(dict(values), **({"step": step} if step is not None else {}))

    def log_model(self, name: str, path: Path, aliases: list[str], metadata: dict[str, Any]) -> None:
        """Log a checkpoint file as a version of the model artifact `name`."""
        self.run.log_artifact(model_artifact(name, path, metadata), aliases=aliases)

    def use_model(self, name: str, path: Path, metadata: dict[str, Any] | None = None) -> None:
        """Declare a checkpoint file, as a version of model artifact `name`, an input of this
        run. The file's digest finds the version its producer logged (or, for a file no run
        produced, makes one), so the lineage graph links producer, model and this run."""
        artifact = model_artifact(name, path, metadata)
        if self.mode != "offline":
            self.run.use_artifact(artifact)
        elif hasattr(self.run, "_log_artifact"):
            # `use_artifact` refuses offline runs, but its record is this: the artifact logged
            # by the user (so the run is not its producer) and used once committed; `wandb
            # sync` then declares the use as an online run would
            self.run._log_artifact(artifact, is_user_created=True, use_after_commit=True)

    def summary(self, values: dict[str, Any]) -> None:
        for key, value in values.items():
            self.run.summary[key] = value

    def finish(self) -> None:
        self.run.finish()


def epoch_summary(key: str) -> str | None:
    """What the W&B summary of a per-epoch metric shows: the best and the last accuracy, the
    lowest loss (training losses and their parts, test and validation loss), else W&B's
    default, the last value."""
    if key in ("test/acc", "val/acc"):
        return "max,last"
    if key.startswith(("train/loss", "train/raw/")) or key in ("test/loss", "val/loss"):
        return "min"
    return None


def model_artifact(name: str, path: Path, metadata: dict[str, Any] | None = None) -> Any:
    """A W&B model artifact holding one checkpoint file as `model.pt`. The file is referenced
    where it is, not copied (a run folder's checkpoints stay put; W&B reads them at upload)."""
    import wandb

    artifact = wandb.Artifact(name, type="model", metadata=metadata or None)
    artifact.add_file(str(path), name="model.pt", policy="immutable", skip_cache=True)
    return artifact


class MultiLogger:
    """Send every call to several loggers."""

    def __init__(self, *loggers: Logger) -> None:
        self.loggers = loggers

    @property
    def run_id(self) -> str | None:
        """The W&B run's id, kept so that a resumed run continues the same W&B run."""
        return next((getattr(lg, "run_id") for lg in self.loggers if getattr(lg, "run_id", None)), None)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for logger in self.loggers:
            logger.log(metrics, step)

    def summary(self, values: dict[str, Any]) -> None:
        for logger in self.loggers:
            logger.summary(values)

    def finish(self) -> None:
        for logger in self.loggers:
            logger.finish()


def make_logger(settings: Any, run_dir: Path, stage: str, name: str, flat_config: dict[str, Any],
                resume_id: str | None = None, final: bool = True, history: list[dict[str, Any]] = ()) -> Logger:
    """The loggers for one stage of a run, from the config's `logger:` section; a resumed
    stage's W&B run gets the `history` it lacks (see `WandbLogger`).

    Under a W&B sweep agent (WANDB_SWEEP_ID set) only the final stage is a W&B run: the agent
    expects one run per trial.
    """
    if rank() != 0:
        return NullLogger()
    loggers: list[Logger] = [JsonlLogger(run_dir, stage)]
    in_sweep = bool(os.environ.get("WANDB_SWEEP_ID"))
    if settings.name == "wandb" and settings.mode != "disabled" and (final or not in_sweep):
        loggers.append(WandbLogger(
            run_dir, name, flat_config, project=settings.project, entity=settings.entity,
            group=settings.group, job_type=settings.job_type or stage, tags=list(settings.tags),
            mode=settings.mode, resume_id=resume_id, history=list(history), fallback=settings.fallback,
        ))
    return MultiLogger(*loggers)


def wandb_logger(logger: Logger) -> WandbLogger | None:
    """The W&B run among a stage's loggers, if it has one (rank 0, W&B on)."""
    if isinstance(logger, WandbLogger):
        return logger
    return next((lg for lg in getattr(logger, "loggers", ()) if isinstance(lg, WandbLogger)), None)


# -- online mode -------------------------------------------------------------------------

ONLINE_ADVICE = ("Run `wandb login` (or set WANDB_API_KEY) on a machine that reaches the W&B server, or set "
                 "logger.mode=offline and upload later with `wandb sync`; logger.fallback=offline switches to "
                 "offline by itself.")


def checked_settings(settings: Any) -> Any:
    """The `logger:` settings a run can start with. `mode: online` needs a W&B login and a way
    to the server, checked here in seconds rather than found out deep inside wandb: without
    them it is a `ConfigError`, or, with `fallback: offline`, the settings in offline mode and
    a note."""
    if settings.name != "wandb" or settings.mode != "online":
        return settings
    problem = online_problem()
    if problem is None:
        return settings
    if settings.fallback != "offline":
        raise ConfigError(f"logger.mode online: {problem}. {ONLINE_ADVICE}")
    note(f"W&B online is not available ({problem}); logging offline instead (logger.fallback: offline). "
         "Upload the runs later with `wandb sync`.")
    return settings.model_copy(update={"mode": "offline"})


def online_problem() -> str | None:
    """Why W&B cannot run online here (no login, or its server cannot be reached), or None."""
    if not has_wandb_credentials():
        return "W&B has no login on this machine"
    base_url = wandb_base_url()
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")):
        return None  # W&B goes through the proxy: only wandb itself can tell
    parts = urlsplit(base_url)
    host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    if not host:
        return f"the W&B server address {base_url!r} has no host"
    try:
        socket.create_connection((host, port), timeout=REACH_TIMEOUT_S).close()
    except OSError as exc:
        return f"the W&B server {host}:{port} cannot be reached ({exc.strerror or exc.__class__.__name__})"
    return None


def has_wandb_credentials() -> bool:
    """Whether W&B finds an API key (environment, .netrc or its settings) or an identity token
    file, read without a network or a prompt."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    import wandb

    api = getattr(wandb, "api", None)
    if api is None:
        return bool(wandb.login(prompt=False, verify=False))
    with contextlib.redirect_stderr(io.StringIO()):  # recent wandb notes that `wandb.api` is deprecated
        return bool(api.api_key)


def wandb_base_url() -> str:
    """The W&B server this machine's settings name (`wandb login --host`, WANDB_BASE_URL)."""
    try:
        from wandb.sdk.wandb_setup import singleton

        return str(singleton().settings.base_url)
    except (ImportError, AttributeError):  # a wandb without the settings singleton
        import wandb

        return os.environ.get("WANDB_BASE_URL") or str(wandb.Settings().base_url)


def note(message: str) -> None:
    """A one-line note on stderr, from rank 0."""
    if rank() == 0:
        print(f"featkd: {message}", file=sys.stderr, flush=True)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _plain(values: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in values.items():
        if hasattr(value, "item"):
            value = value.item()
        if isinstance(value, float) and not math.isfinite(value):
            value = str(value)
        out[key] = value
    return out
