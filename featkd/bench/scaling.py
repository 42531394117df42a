"""`featkd bench scaling`: time and memory of the relational losses as the batch grows.

Each loss runs forward and backward on random embeddings of a ResNet-18's size (512); CRD
with its benchmark settings (16384 negatives, 128-d heads, a bank sized for 50,000 samples).
The growth exponent between two batch sizes b and 2b is log2(value(2b) / value(b)): 1 is
linear, 2 quadratic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from featkd.bench.common import Step, peaks, time_interleaved
from featkd.losses import CRDLoss, RKDLoss, SimilarityPreserving

LOSSES = ["rkd", "sp", "crd"]
BATCHES = [32, 64, 128, 256, 512, 1024]
DATASET_SIZE = 50_000


class _Labels(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.targets = torch.arange(n) % 100

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return torch.zeros(1), self.targets[i]


def build(loss: str, batch: int, dim: int = 512, device: str = "cpu") -> Step:
    """Forward + backward of one relational loss on a batch of random embeddings."""
    dev = torch.device(device)
    torch.manual_seed(0)
    student = torch.randn(batch, dim, device=dev, requires_grad=True)
    teacher = torch.randn(batch, dim, device=dev)
    if loss == "crd":
        module = CRDLoss()
        module.bind([(dim,)], [(dim,)])
        module.to(dev)
        module.prepare_data(_Labels(DATASET_SIZE))
        index = torch.randperm(DATASET_SIZE, device=dev)[:batch]

        def crd_step() -> None:
            sum(module(student, teacher, index).values()).backward()
            student.grad = None

        return crd_step
    module = {"rkd": RKDLoss, "sp": SimilarityPreserving}[loss]().to(dev)

    def step() -> None:
        value = module(student, teacher)
        (sum(value.values()) if isinstance(value, dict) else value).backward()
        student.grad = None

    return step


@dataclass
class Point:
    loss: str
    batch: int
    seconds: float
    peak_mib: float
    time_exponent: float | None
    memory_exponent: float | None


def run(losses: list[str] = LOSSES, batches: list[int] = BATCHES, repeats: int = 3, device: str = "cpu",
        dim: int = 512) -> list[Point]:
    out = []
    for loss in losses:
        times = {b: time_interleaved({str(b): build(loss, b, dim, device)}, repeats, torch.device(device),
                                     warmup=1)[str(b)] for b in batches}
        memory = dict(zip(batches, peaks("featkd.bench.scaling.build",
                                         [{"loss": loss, "batch": b, "dim": dim, "device": device} for b in batches],
                                         device)))
        previous = None
        for b in batches:
            exps = (None, None)
            if previous is not None:
                ratio = math.log(b / previous)
                exps = (math.log(times[b] / times[previous]) / ratio,
                        math.log(max(memory[b], 1) / max(memory[previous], 1)) / ratio)
            out.append(Point(loss, b, times[b], memory[b] / 2**20, *exps))
            previous = b
    return out


def report(points: list[Point]) -> None:
    print("Relational losses, forward + backward on 512-d embeddings; exponent = growth per doubling of the batch")
    print(f"{'loss':<5} {'batch':>6} {'time (ms)':>10} {'exp':>5} {'peak (MiB)':>11} {'exp':>5}")
    for p in points:
        te = f"{p.time_exponent:.2f}" if p.time_exponent is not None else "-"
        me = f"{p.memory_exponent:.2f}" if p.memory_exponent is not None else "-"
        print(f"{p.loss:<5} {p.batch:>6} {p.seconds * 1e3:>10.2f} {te:>5} {p.peak_mib:>11.2f} {me:>5}")
