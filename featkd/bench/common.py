"""What every benchmark suite shares: interleaved timing with medians, peak memory measured in
a fresh subprocess, and a description of the machine.

Peak memory on CPU is how far the process's resident size rises during one measured step
(the kernel's high-water mark, reset just before the step), in a subprocess that built only
what it measures: glibc is told to map every large block and unmap it on free (a fixed mmap
threshold), so resident size follows live tensors rather than the allocator's caching. On
CUDA it is the allocator's own peak.
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

Step = Callable[[], None]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_samples(steps: dict[str, Step], repeats: int, device: torch.device, warmup: int = 2
                 ) -> dict[str, list[float]]:
    """Seconds of each call of each step, the steps taking turns so drifts of the machine hit all alike."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def time_interleaved(steps: dict[str, Step], repeats: int, device: torch.device, warmup: int = 2) -> dict[str, float]:
    """Median seconds of each step, the steps taking turns (`time_samples`)."""
    return {name: statistics.median(values) for name, values in time_samples(steps, repeats, device, warmup).items()}


def _resident_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def _reset_peak() -> bool:
    """Reset the kernel's resident high-water mark (Linux >= 4.0); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _peak_resident_bytes() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM")


def peak_of(build: Callable[[], Step], device: torch.device, warmup: int = 2) -> int:
    """Bytes one step needs beyond what exists between steps (weights, optimizer state)."""
    step = build()
    for _ in range(warmup):
        step()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    if not _reset_peak():  # elsewhere: the peak since start, which warm-up already reached
        step()
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    before = _resident_bytes()
    step()
    # the two counters are read at different moments; a step that needs nothing new can read
    # a page or so below zero, which is noise, not memory given back
    return max(0, _peak_resident_bytes() - before)


def peaks(target: str, calls: list[dict[str, Any]], device: str) -> list[int]:
    """Peak bytes of the steps `target(**call)` builds, measured one after the other in one
    fresh subprocess (the high-water mark is reset before each)."""
    spec = json.dumps({"target": target, "calls": calls, "device": device})
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONHASHSEED": "0"}
    code = "import sys; from featkd.bench.common import child_main; child_main(sys.argv[1])"
    proc = subprocess.run([sys.executable, "-c", code, spec], capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"memory measurement failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def child_main(spec_text: str) -> None:
    spec = json.loads(spec_text)
    module, _, name = spec["target"].rpartition(".")
    build = getattr(importlib.import_module(module), name)
    device = torch.device(spec["device"])
    out = [peak_of(lambda call=call: build(**call), device) for call in spec["calls"]]
    print(json.dumps(out))


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    info = {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
            "cpu": _cpu_name(), "cpu_cores": os.cpu_count(), "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_json(path: str | Path, suite: str, results: Any, **extra: Any) -> None:
    Path(path).write_text(json.dumps({"suite": suite, "machine": machine(), **extra, "results": results},
                                     indent=2, default=str) + "\n")


def mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"
