"""`featkd bench rkd-angle`: the RKD angle loss in its direct form against the Gram-matrix form."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from featkd.bench.common import Step, peaks, time_interleaved
from featkd.losses.relation import rkd_angle


def rkd_angle_naive(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """RKD angle in its direct form: the (B, B, D) difference tensor and (B, B, B) cosines."""

    def cosines(x: torch.Tensor) -> torch.Tensor:
        e = F.normalize(x.unsqueeze(0) - x.unsqueeze(1), p=2, dim=2)
        return torch.bmm(e, e.transpose(1, 2))

    with torch.no_grad():
        target = cosines(teacher)
    return F.smooth_l1_loss(cosines(student), target)


def build(form: str, batch: int, dim: int, device: str = "cpu") -> Step:
    """Forward + backward of one form of the loss on random embeddings."""
    torch.manual_seed(0)
    fn = {"naive": rkd_angle_naive, "gram": rkd_angle}[form]
    student = torch.randn(batch, dim, device=device, requires_grad=True)
    teacher = torch.randn(batch, dim, device=device)

    def step() -> None:
        fn(student, teacher).backward()
        student.grad = None

    return step


@dataclass
class Measurement:
    form: str
    batch: int
    dim: int
    seconds: float
    peak_mib: float


def run(batch: int = 256, dim: int = 2048, repeats: int = 3, device: str = "cpu") -> list[Measurement]:
    forms = ["naive", "gram"]
    times = time_interleaved({f: build(f, batch, dim, device) for f in forms}, repeats, torch.device(device), warmup=1)
    memory = peaks("featkd.bench.rkd_angle.build", [{"form": f, "batch": batch, "dim": dim, "device": device}
                                                    for f in forms], device)
    return [Measurement(f, batch, dim, times[f], m / 2**20) for f, m in zip(forms, memory)]


def report(results: list[Measurement]) -> None:
    naive, gram = results
    print(f"RKD angle, forward + backward, batch {naive.batch}, dim {naive.dim}")
    print(f"{'form':<8} {'time (s)':>10} {'peak memory (MiB)':>18}")
    for r in results:
        print(f"{r.form:<8} {r.seconds:>10.3f} {r.peak_mib:>18.1f}")
    print(f"gram / naive: time {gram.seconds / naive.seconds:.3f}x, peak memory "
          f"{gram.peak_mib / max(naive.peak_mib, 1e-9):.3f}x")
