"""Interrupt a real training process with a real signal, resume it, and get the same result."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from featkd.checkpoint import load_checkpoint
from featkd.cli import main
from featkd.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "quickstart.yaml")
SETTINGS = ["logger=none", "progress=false", "teacher.train.epochs=2", "train.epochs=4", "data.batch_size=16",
            "loss.at.student=layer[12]", "loss.at.teacher=layer[12]", "loss.at.weight=50"]


def start(output_dir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "featkd.cli", "train", CONFIG, f"output_dir={output_dir}",
                             *SETTINGS, *extra], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "WANDB_SILENT": "true"})


def run_dir_of(output_dir: Path) -> Path:
    return next(p for p in output_dir.iterdir() if p.name.startswith("quickstart-"))


def wait_for_distill(output_dir: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Wait until the distillation stage has logged one epoch (so the signal lands mid-run)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        runs = [p for p in output_dir.glob("quickstart-*/metrics.jsonl")]
        if runs and '"stage": "distill"' in runs[0].read_text():
            time.sleep(0.15)  # into the next epoch
            return
        time.sleep(0.05)
    raise TimeoutError("the run did not reach the distillation stage")


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    output = tmp_path_factory.mktemp("reference")
    proc = start(output)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return run_dir_of(output)


def assert_same_run(resumed: Path, reference: Path) -> None:
    a = load_checkpoint(resumed / "checkpoints" / "last.pt")
    b = load_checkpoint(reference / "checkpoints" / "last.pt")
    for key in b["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key in b["distiller"]:
        assert torch.equal(a["distiller"][key], b["distiller"][key]), key
    ma = [(r["stage"], r["epoch"], r["test/acc"], round(r["train/loss"], 10)) for r in metrics(resumed)]
    mb = [(r["stage"], r["epoch"], r["test/acc"], round(r["train/loss"], 10)) for r in metrics(reference)]
    assert ma == mb


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_checkpoints_and_resume_ends_like_an_uninterrupted_run(signum, tmp_path, reference):
    proc = start(tmp_path)
    wait_for_distill(tmp_path, proc)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err
    run_dir = run_dir_of(tmp_path)
    assert f"featkd train --resume {run_dir}" in err and "Traceback" not in err
    state = json.loads((run_dir / "state.json").read_text())["stages"]
    assert state["distill"]["status"] == "running"
    checkpoint = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert checkpoint["epoch"] < 5
    resumed = subprocess.run([sys.executable, "-m", "featkd.cli", "train", "--resume", str(run_dir)], cwd=ROOT,
                             capture_output=True, text=True, timeout=300, env={**os.environ, "WANDB_SILENT": "true"})
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(run_dir, reference)


def test_a_killed_run_resumes_from_its_last_epoch_checkpoint(tmp_path, reference):
    proc = start(tmp_path)
    wait_for_distill(tmp_path, proc)
    proc.kill()  # no chance to write anything
    proc.communicate(timeout=60)
    run_dir = run_dir_of(tmp_path)
    assert main(["train", "--resume", str(run_dir)]) == 0
    assert_same_run(run_dir, reference)


def test_resume_refuses_a_different_config_and_a_folder_that_is_not_a_run(tmp_path, reference):
    with pytest.raises(ConfigError, match=r"differs from the run's in .*train\.epochs"):
        from featkd.config import load_config
        from featkd.run_folder import resume_config

        resume_config(reference, load_config(CONFIG, [*SETTINGS, "train.epochs=7"]))
    assert main(["train", "--resume", str(tmp_path)]) == 2


def test_a_moved_run_folder_resumes_from_any_directory_without_the_cache(tmp_path, reference):
    proc = start(tmp_path / "here")
    wait_for_distill(tmp_path / "here", proc)
    proc.kill()
    proc.communicate(timeout=60)
    run_dir = run_dir_of(tmp_path / "here")
    moved = tmp_path / "there" / run_dir.name
    moved.parent.mkdir()
    shutil.move(run_dir, moved)
    shutil.rmtree(tmp_path / "here")  # the stage cache went with it: the folder must hold its teacher
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    resumed = subprocess.run([sys.executable, "-m", "featkd.cli", "train", "--resume", str(moved)], cwd=elsewhere,
                             capture_output=True, text=True, timeout=300, env={**os.environ, "WANDB_SILENT": "true"})
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(moved, reference)  # the same weights, and every epoch logged once


def test_a_run_that_lost_its_checkpoint_says_so_instead_of_starting_over(tmp_path):
    proc = start(tmp_path)
    wait_for_distill(tmp_path, proc)
    proc.kill()
    proc.communicate(timeout=60)
    run_dir = run_dir_of(tmp_path)
    (run_dir / "checkpoints" / "last.pt").unlink()
    before = (run_dir / "metrics.jsonl").read_text()
    resumed = subprocess.run([sys.executable, "-m", "featkd.cli", "train", "--resume", str(run_dir)], cwd=ROOT,
                             capture_output=True, text=True, timeout=300, env={**os.environ, "WANDB_SILENT": "true"})
    assert resumed.returncode == 2 and "cannot continue where it stopped" in resumed.stderr
    assert "Traceback" not in resumed.stderr and (run_dir / "metrics.jsonl").read_text() == before


def test_a_teacher_killed_while_training_is_cached_once_the_resumed_run_finishes_it(tmp_path):
    output = tmp_path / "runs"
    teacher = ["teacher.model=cnn_small", "teacher.train.epochs=20", "train.epochs=1"]
    proc = start(output, *teacher)
    deadline = time.monotonic() + 120
    while not list(output.glob("quickstart-*/metrics.jsonl")):  # the teacher has finished an epoch
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    proc.kill()
    proc.communicate(timeout=60)
    assert not list(output.glob("cache/*.pt"))
    assert main(["train", "--resume", str(run_dir_of(output))]) == 0
    assert len(list(output.glob("cache/*.pt"))) == 1
    assert main(["train", CONFIG, f"output_dir={output}", *SETTINGS, *teacher]) == 0
    newest = max(output.glob("quickstart-*"), key=lambda p: p.stat().st_mtime)
    assert json.loads((newest / "state.json").read_text())["stages"]["teacher"]["status"] == "cached"
