"""`featkd bench cache`: training-epoch times with and without the teacher output cache.

Three runs on the same synthetic data (no augmentation, so every epoch shows the student the
same views): the student trained alone, KD computing the teacher every step, and KD reading
the teacher's logits from the cache, which fills during the first epoch. Times are of the
training part of each epoch (evaluation excluded); steady state is the median of the epochs
after the first.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

import torch

from featkd.config import TrainConfig
from featkd.data import build_data, make_loaders
from featkd.distiller import Distiller, Term
from featkd.engine import StageSettings, fit
from featkd.models import build_model
from featkd.teacher_cache import TeacherCacheSettings


class _EpochTimes:
    def __init__(self) -> None:
        self.train_seconds: list[float] = []

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.train_seconds.append(metrics["time/train_s"])

    def summary(self, values: dict[str, Any]) -> None:
        pass

    def finish(self) -> None:
        pass


@dataclass
class Row:
    name: str
    first_epoch: float
    steady_epoch: float
    ratio_first: float | None
    ratio_steady: float | None


def run(teacher: str = "torchvision:resnet34", student: str = "torchvision:resnet18", input_shape: tuple = (3, 32, 32),
        classes: int = 100, samples: int = 1024, batch: int = 64, epochs: int = 4, device: str = "cpu") -> list[Row]:
    from featkd.config import load_config

    dev = torch.device(device)
    data = build_data("synthetic", {"num_classes": classes, "input_shape": tuple(input_shape), "train_size": samples,
                                    "test_size": batch})
    config = load_config(data={"student": student, "data": {"batch_size": batch}})
    train_cfg = TrainConfig(epochs=epochs, optimizer={"name": "sgd", "lr": 0.01})
    times: dict[str, list[float]] = {}
    for name in ("student alone", "KD", "KD + teacher cache"):
        torch.manual_seed(0)
        t_model = build_model(teacher, classes, input_shape).to(dev)
        s_model = build_model(student, classes, input_shape).to(dev)
        terms = [Term("ce")] if name == "student alone" else [Term("ce", 0.1), Term("kd", 0.9)]
        cache = TeacherCacheSettings("fp16") if "cache" in name else None
        distiller = Distiller(None if name == "student alone" else t_model, s_model, terms,
                              example_input=data.train.inputs[:batch].to(dev), teacher_cache=cache)
        train_loader, test_loader = make_loaders(distiller.prepare_data(data.train), data.test, config.data, seed=0)
        recorder = _EpochTimes()
        fit(distiller, train_loader, test_loader, StageSettings(name, train_cfg, progress=False), dev, recorder)
        times[name] = recorder.train_seconds
    rows = []
    base_first, base_steady = times["student alone"][0], statistics.median(times["student alone"][1:])
    for name, values in times.items():
        first, steady = values[0], statistics.median(values[1:])
        alone = name == "student alone"
        rows.append(Row(name, first, steady, None if alone else first / base_first,
                        None if alone else steady / base_steady))
    return rows


def report(rows: list[Row], settings: dict[str, Any]) -> None:
    print(f"Training-epoch times: teacher {settings['teacher']}, student {settings['student']}, {settings['samples']} "
          f"samples of {'x'.join(map(str, settings['input_shape']))}, batch {settings['batch']}, {settings['device']}")
    print(f"{'run':<20} {'epoch 1 (s)':>12} {'later (s)':>10} {'vs alone, epoch 1':>18} {'vs alone, later':>16}")
    for r in rows:
        first = f"{r.ratio_first:.3f}" if r.ratio_first is not None else "-"
        later = f"{r.ratio_steady:.3f}" if r.ratio_steady is not None else "-"
        print(f"{r.name:<20} {r.first_epoch:>12.2f} {r.steady_epoch:>10.2f} {first:>18} {later:>16}")
