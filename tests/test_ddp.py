"""Two CPU processes with the gloo backend, launched by torchrun, against one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from featkd.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "quickstart.yaml")
ENV = {**os.environ, "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}


def torchrun(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           *args], cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def featkd_train(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "featkd.cli", "train", *args], cwd=ROOT, capture_output=True,
                          text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_every_rank_ends_with_the_same_weights(tmp_path):
    torchrun("tests/ddp_worker.py", str(tmp_path))
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    trained = [k for k in rank0 if "running" not in k and "num_batches" not in k]
    assert any(k.startswith("student.") for k in trained)
    for key in trained:
        assert torch.equal(rank0[key], rank1[key]), key


@pytest.fixture(scope="module")
def teacher_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    featkd_train(CONFIG, f"output_dir={out}", "logger=none", "progress=false", "teacher=null", "loss.kd=null",
                 "student.model=cnn_small", "train.epochs=2", "data.args.augment=false")
    return next(out.glob("quickstart-*/checkpoints/last.pt"))


def settings(teacher: Path, out: Path, batch: int, *extra: str) -> list[str]:
    # an MLP student (no batch norm, no dropout) so that a step depends on the batch's samples only
    return [CONFIG, f"output_dir={out}", "logger=none", "progress=false", "teacher.model=cnn_small",
            f"teacher.checkpoint={teacher}", "student=mlp", "student.args.hidden=[64]", "train.epochs=1",
            f"data.batch_size={batch}", "data.args.augment=false", *extra]


def final(out: Path) -> tuple[dict, list[dict]]:
    run = next(out.glob("quickstart-*"))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return load_checkpoint(run / "checkpoints" / "last.pt"), records


def test_two_processes_of_batch_b_equal_one_process_of_batch_2b(tmp_path, teacher_checkpoint):
    torchrun("-m", "featkd.cli", "train", *settings(teacher_checkpoint, tmp_path / "two", 32))
    featkd_train(*settings(teacher_checkpoint, tmp_path / "one", 64))
    (two, two_log), (one, one_log) = final(tmp_path / "two"), final(tmp_path / "one")
    assert two["step"] == one["step"]
    for key in one["model"]:
        torch.testing.assert_close(two["model"][key], one["model"][key], rtol=1e-4, atol=1e-5)
    for a, b in zip(two_log, one_log):  # metrics are reduced over ranks
        assert a["train/loss/kd"] == pytest.approx(b["train/loss/kd"], rel=1e-4)
        assert a["test/acc"] == pytest.approx(b["test/acc"])


def test_a_gathered_relational_loss_sees_the_global_batch(tmp_path, teacher_checkpoint):
    rkd = ["loss.kd=null", "loss.rkd.student=fc:in", "loss.rkd.teacher=fc:in"]
    torchrun("-m", "featkd.cli", "train", *settings(teacher_checkpoint, tmp_path / "gather", 32, *rkd,
                                                    "loss.rkd.gather=true"))
    torchrun("-m", "featkd.cli", "train", *settings(teacher_checkpoint, tmp_path / "local", 32, *rkd))
    featkd_train(*settings(teacher_checkpoint, tmp_path / "one", 64, *rkd))
    (gathered, g_log), (local, l_log), (one, o_log) = (final(tmp_path / n) for n in ("gather", "local", "one"))
    assert g_log[0]["train/loss/rkd"] == pytest.approx(o_log[0]["train/loss/rkd"], rel=1e-4)
    assert l_log[0]["train/loss/rkd"] != pytest.approx(o_log[0]["train/loss/rkd"], rel=1e-3)
    for key in one["model"]:  # and the gradients match the one-process ones
        torch.testing.assert_close(gathered["model"][key], one["model"][key], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("gather", ["gather", "local"])
def test_crd_memory_banks_hold_every_processs_samples_and_agree_across_ranks(tmp_path, gather):
    # 256 samples, 2 processes of batch 32: one epoch visits every sample exactly once
    torchrun("tests/ddp_crd_worker.py", str(tmp_path), gather)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for name in ("memory_student", "memory_teacher"):
        initial, final = ranks[0]["initial"][name], ranks[0]["final"][name]
        updated = ~torch.isclose(final, initial).all(1)
        assert int(updated.sum()) == 256, name
        torch.testing.assert_close(final.norm(dim=1), torch.ones(256))  # each row a momentum-updated unit vector
        assert torch.equal(final, ranks[1]["final"][name]), name
    assert torch.equal(ranks[0]["final"]["normalizers"], ranks[1]["final"]["normalizers"])
    assert (ranks[0]["final"]["normalizers"] > 0).all()


def test_text_two_processes_equal_one_despite_each_padding_its_own_batch(tmp_path):
    """Each process pads its half batch to its own longest sentence, one process the whole batch
    to the longest of all: with padding masked everywhere, the same steps result."""
    text = [str(ROOT / "configs" / "nlp" / "kd.yaml"), "logger=none", "progress=false",
            "data.args.train_size=256", "data.args.test_size=64", "data.args.validation_size=0",
            "teacher.args.dropout=0", "student.args.dropout=0", "teacher.train.epochs=1", "train.epochs=1"]
    torchrun("-m", "featkd.cli", "train", *text, f"output_dir={tmp_path / 'two'}", "data.batch_size=32")
    featkd_train(*text, f"output_dir={tmp_path / 'one'}", "data.batch_size=64")
    runs = [next((tmp_path / n).glob("nlp-kd-*")) for n in ("two", "one")]
    two, one = (load_checkpoint(run / "checkpoints" / "last.pt") for run in runs)
    assert two["step"] == one["step"] == 4
    for key in one["model"]:
        torch.testing.assert_close(two["model"][key], one["model"][key], rtol=1e-4, atol=1e-5)
