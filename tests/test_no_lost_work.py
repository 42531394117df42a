"""Mistakes are caught before anything trains, leave nothing behind, and end in one message;
W&B keeps the whole history of a run killed and resumed."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from featkd import wandb_files
from featkd.checkpoint import save_checkpoint
from featkd.cli import main

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
ENV = {**os.environ, "WANDB_SILENT": "true"}


def cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "featkd.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env=ENV, timeout=300)


@pytest.mark.parametrize("override,message", [
    ("loss.at.student=layr2", "student has no module 'layr2'. Did you mean 'layer2'"),
    ("loss.kd.temperature=0", "temperature must be > 0"),
    ("loss.kd.weight=-1", "a term's weight is a finite number >= 0"),
])
def test_a_config_mistake_stops_train_and_config_before_anything_trains(override, message, tmp_path):
    extra = ["loss.at.teacher=layer2"] if "loss.at" in override else []
    started = time.monotonic()
    for command in ("train", "config"):
        proc = cli(command, QUICKSTART, f"output_dir={tmp_path}", override, *extra)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert time.monotonic() - started < 60  # the 30-epoch teacher never started
    assert not any(tmp_path.iterdir())  # no run folder, no cached teacher


def test_bad_files_and_arguments_exit_with_code_2_and_one_message(tmp_path, capsys):
    binary = tmp_path / "weights.yaml"
    binary.write_bytes(bytes(range(256)) * 4)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cases = [
        (["train", str(binary)], "is not a text file"),
        (["train", QUICKSTART, f"output_dir={blocker}/runs", "teacher=null", "loss.kd=null", "train.epochs=1",
          "logger=none", "progress=false"], "cannot create the run folder"),
        (["inspect", "cnn_small", "--input-shape", "3,x,32"], "give positive integers"),
        (["inspect", "cnn_small", "--input-shape", "1,,8"], "give positive integers"),
    ]
    for args, message in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert message in err and err.count("\n") <= 3, err


def test_a_checkpoint_write_cleans_what_a_killed_writer_left(tmp_path):
    stale = tmp_path / ".last.pt.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    save_checkpoint(tmp_path / "last.pt", {"epoch": 1})
    assert not stale.exists() and [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_wandb_history_matches_metrics_after_repeated_kills(tmp_path):
    settings = [QUICKSTART, f"output_dir={tmp_path}", "logger.mode=offline", "progress=false", "teacher.model=cnn_small",
                "teacher.train.epochs=1", "train.epochs=6", "data.batch_size=16"]
    proc = subprocess.Popen([sys.executable, "-m", "featkd.cli", "train", *settings], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    run_dir = None
    for kill in range(2):
        lines = 0
        deadline = time.monotonic() + 120
        while lines <= kill + 1:  # kill as soon as the distillation logs its next epoch
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            metrics = list(tmp_path.glob("quickstart-*/metrics.jsonl"))
            if metrics:
                run_dir = metrics[0].parent
                lines = sum('"stage": "distill"' in line for line in metrics[0].read_text().splitlines())
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        proc = subprocess.Popen([sys.executable, "-m", "featkd.cli", "train", "--resume", str(run_dir)], cwd=ROOT,
                                env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    distill = [row for row in logged if row["stage"] == "distill"]
    run_id = json.loads((run_dir / "state.json").read_text())["stages"]["distill"]["wandb_id"]
    rows = {int(r["_step"]): r for r in wandb_files.history(run_dir, run_id)}
    assert sorted(rows) == [row["step"] for row in distill] and len(distill) == 6
    for row in distill:
        assert rows[row["step"]]["train/loss"] == pytest.approx(row["train/loss"])
        assert rows[row["step"]]["epoch"] == row["epoch"]
