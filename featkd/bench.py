"""Benchmarks that print numbers: `featkd bench SUITE`.

Each measurement of peak memory runs in a fresh subprocess and reports how far the process's
peak resident memory rose during the measured call (on CPU; on CUDA the allocator's peak),
so one measurement cannot hide inside memory an earlier one already touched. Times are
medians of repeated runs.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from featkd.losses.relation import rkd_angle


def rkd_angle_naive(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """RKD angle in its direct form: the (B, B, D) difference tensor and (B, B, B) cosines."""

    def cosines(x: torch.Tensor) -> torch.Tensor:
        e = F.normalize(x.unsqueeze(0) - x.unsqueeze(1), p=2, dim=2)
        return torch.bmm(e, e.transpose(1, 2))

    with torch.no_grad():
        target = cosines(teacher)
    return F.smooth_l1_loss(cosines(student), target)


_CHILD = """
import json, resource, statistics, time, torch
from featkd.bench import rkd_angle_naive
from featkd.losses.relation import rkd_angle

torch.manual_seed(0)
device = torch.device({device!r})
fn = {{"naive": rkd_angle_naive, "gram": rkd_angle}}[{form!r}]
student = torch.randn({batch}, {dim}, device=device, requires_grad=True)
teacher = torch.randn({batch}, {dim}, device=device)

def step(s=student, t=teacher):
    fn(s, t).backward()
    s.grad = None
    if device.type == "cuda":
        torch.cuda.synchronize()

# the first use of autograd and of checkpointing allocates once for good: do it on tiny inputs
small = torch.randn(16, 8, device=device, requires_grad=True)
rkd_angle(small, small.detach() + 1, 1).backward()
rkd_angle_naive(small, small.detach() + 1).backward()
if device.type == "cuda":
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    peak = torch.cuda.max_memory_allocated() - base
else:
    try:  # resident size now (Linux); elsewhere the peak so far, which can only under-report
        with open("/proc/self/statm") as f:
            resident_now = int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        resident_now = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - resident_now
times = []
for _ in range({repeats}):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
print(json.dumps({{"peak_bytes": peak, "seconds": statistics.median(times)}}))
"""


@dataclass
class Measurement:
    form: str
    batch: int
    dim: int
    seconds: float
    peak_mib: float


def _child(code: str, exact_memory: bool = False) -> dict[str, Any]:
    # A fixed mmap threshold makes glibc map every large block and unmap it on free, so the
    # peak resident size follows the peak of live tensors instead of the allocator's caching
    # (it slows allocation down, so times are taken in another run without it).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"} if exact_memory else None
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark subprocess failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def rkd_angle_suite(batch: int = 256, dim: int = 2048, repeats: int = 3, device: str = "cpu") -> list[Measurement]:
    """Forward + backward of the RKD angle loss, direct form vs chunked Gram-matrix form."""
    out = []
    for form in ("naive", "gram"):
        code = textwrap.dedent(_CHILD.format(device=device, form=form, batch=batch, dim=dim, repeats=repeats))
        memory = _child(code, exact_memory=True)["peak_bytes"]
        seconds = _child(code)["seconds"]  # timed with the normal allocator
        out.append(Measurement(form, batch, dim, seconds, memory / 2**20))
    return out


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def print_rkd_angle(results: list[Measurement]) -> None:
    naive, gram = results
    print(f"RKD angle, forward + backward, batch {naive.batch}, dim {naive.dim}")
    print(f"{'form':<8} {'time (s)':>10} {'peak memory (MiB)':>18}")
    for r in results:
        print(f"{r.form:<8} {r.seconds:>10.3f} {r.peak_mib:>18.1f}")
    print(f"gram / naive: time {gram.seconds / naive.seconds:.3f}x, peak memory "
          f"{gram.peak_mib / max(naive.peak_mib, 1e-9):.3f}x")


def write_json(path: str | Path, suite: str, results: list[Any]) -> None:
    Path(path).write_text(json.dumps({"suite": suite, "machine": machine(), "results": [asdict(r) for r in results]},
                                     indent=2) + "\n")

