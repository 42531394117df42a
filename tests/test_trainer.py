import json
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from featkd.checkpoint import load_checkpoint, save_checkpoint
from featkd.config import load_config
from featkd.errors import CheckpointError, ConfigError
from featkd.trainer import load_model_checkpoint, train

FAST = ["teacher.train.epochs=2", "train.epochs=2", "progress=false"]
ALL_TERMS = [
    "loss.fitnet.student=layer2", "loss.fitnet.teacher=layer3", "loss.fitnet.pretrain.epochs=1",
    "loss.at.student=layer*", "loss.at.teacher=layer*",
    "loss.rkd.student=fc:in", "loss.rkd.teacher=fc:in",
]


def quick(tmp_path, *extra: str):
    return load_config("configs/quickstart.yaml", [f"output_dir={tmp_path}", "logger=none", *FAST, *extra])


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_quickstart_trains_end_to_end_and_writes_a_complete_run_folder(tmp_path):
    result = train(quick(tmp_path, *ALL_TERMS))
    run = result.run_dir
    assert (run / "config.yaml").is_file()
    assert load_config(run / "config.yaml").to_dict() == quick(tmp_path, *ALL_TERMS).to_dict()
    records = read_jsonl(run / "metrics.jsonl")
    assert [(r["stage"], r["epoch"]) for r in records] == [
        ("teacher", 1), ("teacher", 2), ("pretrain-fitnet", 1), ("distill", 1), ("distill", 2)]
    assert "train/loss/fitnet/pretrain" in records[2]
    last = records[-1]
    for key in ["train/loss", "train/loss/ce", "train/loss/kd", "train/loss/fitnet", "train/loss/at", "train/loss/rkd",
                "train/raw/at/layer1", "train/raw/rkd/angle", "test/acc", "test/best_acc", "lr"]:
        assert key in last, key
    assert last["train/loss"] == pytest.approx(sum(v for k, v in last.items() if k.startswith("train/loss/")), rel=1e-4)
    assert 0 <= result.student.last_acc <= 100 and result.student.best_acc >= result.student.last_acc
    assert result.teacher_acc[0] > 50  # two epochs on digits already beat chance by far
    summary = json.loads((run / "summary.json").read_text())
    assert summary["distill"]["last_acc"] == pytest.approx(result.student.last_acc)
    assert result.agreement is not None


def test_checkpoints_hold_what_resuming_and_export_need(tmp_path):
    result = train(quick(tmp_path, "loss.fitnet.student=layer2", "loss.fitnet.teacher=layer3",
                         "loss.fitnet.pretrain.epochs=0"))
    last = load_checkpoint(result.run_dir / "checkpoints" / "last.pt")
    best = load_checkpoint(result.run_dir / "checkpoints" / "best.pt")
    assert last["epoch"] == 2 and best["epoch"] == result.student.best_epoch
    assert {"model", "distiller", "optimizer", "scheduler", "config", "step"} <= set(last)
    assert any(k.startswith("adapters.fitnet") for k in last["distiller"])  # adapters saved with the student
    assert last["metrics"]["acc"] == pytest.approx(result.student.last_acc)
    from featkd.models import build_model

    student = build_model(last["model_name"], last["num_classes"], last["input_shape"], last["model_args"])
    student.load_state_dict(last["model"])


def test_teachers_are_trained_once_and_reused_from_the_cache(tmp_path):
    first = train(quick(tmp_path))
    second = train(quick(tmp_path, "seed=1"))
    stages = [r["stage"] for r in read_jsonl(second.run_dir / "metrics.jsonl")]
    assert "teacher" not in stages
    assert second.teacher_acc == first.teacher_acc
    changed = train(quick(tmp_path, "teacher.seed=5"))
    assert "teacher" in [r["stage"] for r in read_jsonl(changed.run_dir / "metrics.jsonl")]


def test_same_config_and_seed_give_the_same_numbers_on_cpu(tmp_path):
    a = train(quick(tmp_path, "device=cpu", "teacher.cache=false"))
    b = train(quick(tmp_path, "device=cpu", "teacher.cache=false"))
    wa = load_checkpoint(a.run_dir / "checkpoints" / "last.pt")["model"]
    wb = load_checkpoint(b.run_dir / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert read_jsonl(a.run_dir / "metrics.jsonl")[-1]["train/loss"] == read_jsonl(b.run_dir / "metrics.jsonl")[-1]["train/loss"]


def test_student_alone_needs_no_teacher(tmp_path):
    result = train(quick(tmp_path, "teacher=null", "loss.kd=null", "loss.ce.weight=1"))
    assert result.teacher_acc == [] and result.agreement is None
    assert [r["stage"] for r in read_jsonl(result.run_dir / "metrics.jsonl")] == ["student", "student"]


def test_a_teacher_checkpoint_is_loaded_and_checked_against_the_teacher_model(tmp_path):
    first = train(quick(tmp_path))
    teacher_ckpt = first.run_dir / "checkpoints" / "teacher-last.pt"
    result = train(quick(tmp_path, f"teacher.checkpoint={teacher_ckpt}"))
    assert result.teacher_acc == first.teacher_acc
    with pytest.raises(CheckpointError, match="does not fit the model 'cnn_small'"):
        train(quick(tmp_path, f"teacher.checkpoint={teacher_ckpt}", "teacher.model=cnn_small"))


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"epoch": 1})

    def broken_save(obj, handle):
        handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"epoch": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


def test_truncated_and_foreign_checkpoints_are_clear_errors(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(1000)}})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(path)
    torch.save({"w": torch.ones(2)}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="not a featkd checkpoint"):
        load_checkpoint(tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


def test_checkpoints_are_loaded_with_weights_only(tmp_path):
    import argparse

    # any pickled object outside the tensor/container allowlist is refused, never executed
    torch.save({"format": "featkd-checkpoint", "obj": argparse.Namespace(a=1)}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path / "evil.pt")


class FakeRun:
    def __init__(self, **kwargs):
        self.init = kwargs
        self.logged: list[tuple[dict, int]] = []
        self.summary: dict = {}
        self.finished = False

    def log(self, metrics, step):
        self.logged.append((dict(metrics), step))

    def define_metric(self, name, **options):
        pass

    def finish(self):
        self.finished = True


def test_wandb_gets_the_flat_config_grouping_and_every_term(tmp_path, monkeypatch):
    runs: list[FakeRun] = []
    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: runs.append(FakeRun(**kwargs)) or runs[-1]
    fake.Settings = lambda **kwargs: kwargs
    monkeypatch.setitem(sys.modules, "wandb", fake)
    config = load_config("configs/quickstart.yaml", [f"output_dir={tmp_path}", *FAST, *ALL_TERMS,
                                                     "logger.tags=[ablation]", "logger.project=kd-study"])
    result = train(config)
    assert [r.init["job_type"] for r in runs] == ["teacher", "pretrain-fitnet", "distill"]
    for run in runs:
        assert run.init["project"] == "kd-study" and run.init["mode"] == "offline"
        assert run.init["group"] == result.run_dir.name and run.init["tags"] == ["ablation"]
        assert run.init["dir"] == str(result.run_dir)
        assert run.init["config"]["loss.kd.temperature"] == 4 and run.init["config"]["train.epochs"] == 2
        assert run.finished
    distill = runs[2]
    keys = set().union(*(m for m, _ in distill.logged))
    assert {"train/loss/kd", "train/loss/fitnet", "train/loss/at", "train/loss/rkd", "train/raw/rkd/distance",
            "test/acc", "lr", "epoch"} <= keys
    steps = [s for _, s in distill.logged]
    assert steps == sorted(steps) and len(steps) == 2
    assert distill.summary["last_acc"] == pytest.approx(result.student.last_acc)
    assert distill.summary["agreement"] == pytest.approx(result.agreement)
    assert distill.summary["student/multiply_adds"] == result.student_macs > 0
    assert distill.summary["student_vs_teacher/parameters"] == pytest.approx(
        result.student_params / result.teacher_footprints[0].parameters)


def test_wandb_offline_run_is_written_without_network(tmp_path):
    result = train(load_config("configs/quickstart.yaml", [f"output_dir={tmp_path}", *FAST, "teacher=null",
                                                           "loss.kd=null", "loss.ce.weight=1"]))
    files = list((result.run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    deadline = time.monotonic() + 30
    data = b""
    while time.monotonic() < deadline:  # the W&B service process flushes the file shortly after finish()
        data = files[0].read_bytes()
        if b"train/loss/ce" in data:
            break
        time.sleep(0.2)
    assert b"test/acc" in data and b"train/loss/ce" in data and b"featkd" in data


def test_a_checkpoint_of_another_model_is_refused(tmp_path):
    from featkd.models import build_model

    save_checkpoint(tmp_path / "t.pt", {"model": build_model("cnn_tiny", 10, (1, 8, 8)).state_dict(),
                                         "model_name": "cnn_tiny"})
    with pytest.raises(CheckpointError, match="saved from 'cnn_tiny'"):
        load_model_checkpoint(build_model("cnn_large", 10, (1, 8, 8)), tmp_path / "t.pt", "cnn_large")


def test_with_a_validation_split_the_best_epoch_is_chosen_on_it(tmp_path):
    result = train(load_config("configs/quickstart.yaml", [
        f"output_dir={tmp_path}", "logger=none", "progress=false", "teacher=null", "loss.kd=null",
        "loss.ce.weight=1", "train.epochs=4", "data.args.validation_fraction=0.2"]))
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    val = [r["val/acc"] for r in records]
    best = val.index(max(val))
    assert result.student.best_epoch == records[best]["epoch"]
    assert result.student.best_acc == pytest.approx(records[best]["test/acc"])
    assert result.student.val_acc == pytest.approx(val[-1]) and result.student.best_val_acc == pytest.approx(max(val))
    best_checkpoint = load_checkpoint(result.run_dir / "checkpoints" / "best.pt")
    assert best_checkpoint["epoch"] == records[best]["epoch"]


def test_checkpoints_of_chosen_epochs_are_kept(tmp_path):
    result = train(load_config("configs/quickstart.yaml", [
        f"output_dir={tmp_path}", "logger=none", "progress=false", "teacher.train.epochs=2", "teacher.cache=false",
        "teacher.train.checkpoint_epochs=[1]", "train.epochs=3", "train.checkpoint_epochs=[2]"]))
    folder = result.run_dir / "checkpoints"
    assert load_checkpoint(folder / "epoch2.pt")["epoch"] == 2 and load_checkpoint(folder / "last.pt")["epoch"] == 3
    assert load_checkpoint(folder / "teacher-epoch1.pt")["epoch"] == 1


def test_runs_of_one_config_started_in_the_same_second_get_folders_of_their_own(tmp_path, monkeypatch):
    import threading
    from datetime import datetime as real_datetime

    from featkd import run_folder

    class FrozenClock:  # every run starts "in the same second"
        @staticmethod
        def now():
            return real_datetime(2026, 1, 1, 12, 0, 0)

    monkeypatch.setattr(run_folder, "datetime", FrozenClock)
    config = quick(tmp_path)
    made: list[Path] = []
    threads = [threading.Thread(target=lambda: made.append(run_folder.RunFolder.create(config))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(made)) == 8
    assert sorted(p.name for p in made)[0] == f"{config.name}-20260101-120000"


def test_a_new_run_never_takes_over_a_folder_that_holds_a_run(tmp_path):
    """Its finished stages would otherwise be loaded as if the new config had trained them."""
    from featkd import run_folder

    config = quick(tmp_path)
    folder = run_folder.RunFolder.create(config, tmp_path / "run")
    run_folder.RunState(folder).update("distill", status="done")
    with pytest.raises(ConfigError, match="already holds a run"):
        run_folder.RunFolder.create(config, folder)
