"""What a model costs to deploy: parameters, multiply-adds, the size of its weights on disk,
and its CPU inference latency at the batch sizes asked for (median and 90th percentile over
timed calls after a warm-up, with the thread count stated).

Models measured together take turns call by call (`featkd.bench.common.time_samples`), so
that a drift of the machine hits all of them alike and their ratios stay fair. A large
spread between the median and the 90th percentile means the machine was busy: a note says so
and is kept with the numbers.
"""

from __future__ import annotations

import contextlib
import copy
import io
import statistics
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from featkd.bench.common import time_samples
from featkd.capture import call_model, eval_mode
from featkd.deploy.prune import weight_sparsity

#: p90 / median above this says the machine was busy while timing
BUSY_SPREAD = 1.5

#: A forward to time: called with no arguments.
Call = Callable[[], Any]


@dataclass(frozen=True)
class Latency:
    """Milliseconds of one forward of `batch` inputs on the CPU."""

    batch: int
    median_ms: float
    p90_ms: float
    repeats: int
    threads: int

    @property
    def spread(self) -> float:
        return self.p90_ms / self.median_ms if self.median_ms > 0 else 1.0

    @classmethod
    def of(cls, seconds: list[float], batch: int, threads: int) -> Latency:
        ms = sorted(1e3 * s for s in seconds)
        p90 = ms[min(len(ms) - 1, int(round(0.9 * (len(ms) - 1))))]
        return cls(batch, statistics.median(ms), p90, len(ms), threads)


@dataclass
class Footprint:
    """Size and speed of one model (or exported file)."""

    parameters: int | None = None
    multiply_adds: int | None = None
    file_bytes: int | None = None
    latency: list[Latency] = field(default_factory=list)
    #: why a number is missing or doubtful (a busy machine, a counter that could not trace)
    notes: list[str] = field(default_factory=list)
    #: the fraction of conv and linear weights that are exactly zero (pruning)
    weight_sparsity: float | None = None

    def at(self, batch: int) -> Latency | None:
        return next((lat for lat in self.latency if lat.batch == batch), None)

    def values(self) -> dict[str, Any]:
        """Flat plain values: `parameters`, `multiply_adds`, `file_mb`, `latency_b<B>_median_ms`,
        `latency_b<B>_p90_ms`, `threads` (summary.json, W&B summaries, bench tables)."""
        out: dict[str, Any] = {"parameters": self.parameters, "multiply_adds": self.multiply_adds,
                               "file_mb": None if self.file_bytes is None else self.file_bytes / 2**20,
                               "weight_sparsity": self.weight_sparsity}
        for lat in self.latency:
            out[f"latency_b{lat.batch}_median_ms"] = lat.median_ms
            out[f"latency_b{lat.batch}_p90_ms"] = lat.p90_ms
        if self.latency:
            out["threads"] = self.latency[0].threads
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Footprint:
        return cls(data.get("parameters"), data.get("multiply_adds"), data.get("file_bytes"),
                   [Latency(**lat) for lat in data.get("latency", [])], list(data.get("notes", [])),
                   data.get("weight_sparsity"))


def ratios(student: Footprint, teacher: Footprint) -> dict[str, float]:
    """Student / teacher for every number both have (below 1: the student is smaller or faster)."""
    a, b = student.values(), teacher.values()
    return {key: a[key] / b[key] for key in a
            if key not in ("threads", "weight_sparsity") and isinstance(a[key], (int, float)) and isinstance(b.get(key), (int, float))
            and b[key]}


def weights_bytes(model: nn.Module) -> int:
    """Bytes of the model's state dict saved with `torch.save`: its weights file on disk."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


@contextmanager
def cpu_threads(threads: int | None) -> Iterator[int]:
    """Run with `threads` intra-op threads (default: torch's current count); yield the count."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def time_calls(calls: Mapping[str, Mapping[int, Call]], repeats: int = 30, warmup: int = 5,
               threads: int | None = None) -> dict[str, list[Latency]]:
    """CPU latency of each named model's forward at each batch size: `calls[name][batch]` runs
    one forward. The models take turns call by call at each batch size."""
    out: dict[str, list[Latency]] = {name: [] for name in calls}
    batches = sorted({b for per_model in calls.values() for b in per_model})
    with cpu_threads(threads) as count, torch.inference_mode():
        for batch in batches:
            steps = {name: per_model[batch] for name, per_model in calls.items() if batch in per_model}
            samples = time_samples(steps, repeats, torch.device("cpu"), warmup)
            for name, seconds in samples.items():
                out[name].append(Latency.of(seconds, batch, count))
    return out


def busy_note(latency: list[Latency]) -> str | None:
    """A note when timed calls spread widely (another process was using the cores)."""
    worst = max(latency, key=lambda lat: lat.spread, default=None)
    if worst is None or worst.spread <= BUSY_SPREAD:
        return None
    return (f"latency at batch {worst.batch} spread widely (90th percentile {worst.p90_ms:.2f} ms against a "
            f"median of {worst.median_ms:.2f} ms): the machine looks busy; measure again on idle cores")


def on_cpu(model: nn.Module) -> nn.Module:
    """The model itself if it lives on the CPU, else a CPU copy (latency is measured on the CPU)."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return model if device.type == "cpu" else copy.deepcopy(model).cpu()


def measure_models(models: Mapping[str, nn.Module], inputs: Mapping[int, Any], example: Any,
                   repeats: int = 30, warmup: int = 5, threads: int | None = None,
                   latency: bool = True) -> dict[str, Footprint]:
    """Footprints of PyTorch models measured together: `inputs[batch]` is a CPU batch of inputs
    (a tensor, or a dict of tensors passed as keywords), `example` one sample for counting
    multiply-adds. Models are timed in eval mode and left in the mode they were in."""
    from featkd.evaluation import multiply_adds
    from featkd.models import count_parameters

    cpu_models = {name: on_cpu(model) for name, model in models.items()}
    with contextlib.ExitStack() as modes:
        for model in cpu_models.values():
            modes.enter_context(eval_mode(model))
        timed = time_calls({name: {b: (lambda m=model, x=x: call_model(m, x)) for b, x in inputs.items()}
                            for name, model in cpu_models.items()}, repeats, warmup, threads) if latency else {}
        out = {}
        for name, model in cpu_models.items():
            macs = multiply_adds(model, example, torch.device("cpu"))
            notes = [] if macs is not None else ["multiply-adds: torch's flop counter could not trace the model"]
            if macs is not None and any(isinstance(m, nn.RNNBase) for m in model.modules()):
                macs = None  # the counter skips recurrent kernels: a count without them would mislead
                notes.append("multiply-adds: torch's flop counter does not count recurrent layers (LSTM, GRU)")
            lat = timed.get(name, [])
            if (note := busy_note(lat)) is not None:
                notes.append(note)
            out[name] = Footprint(count_parameters(model), macs, weights_bytes(model), lat, notes,
                                  weight_sparsity(model))
    return out


def first_inputs(dataset: Any, batch: int) -> Any:
    """The first `batch` inputs of a dataset, batched as its loader batches them (CPU)."""
    from featkd.data import collate_of

    items = [dataset[i] for i in range(min(batch, len(dataset)))]
    collate = collate_of(dataset) or torch.utils.data.default_collate
    x = collate(items)[0]
    if len(items) < batch:  # a tiny test set: repeat it up to the batch size
        reps = -(-batch // len(items))
        if isinstance(x, dict):
            x = {k: v.repeat(reps, *([1] * (v.dim() - 1)))[:batch] for k, v in x.items()}
        else:
            x = x.repeat(reps, *([1] * (x.dim() - 1)))[:batch]
    return x
