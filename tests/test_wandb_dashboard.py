"""What a featkd W&B run holds, read back from the offline run files (no network): metrics
plotted against the epoch and summarised by meaning, model artifacts and their lineage, the
final stage's per-class table and confusion matrix, a comparison's and a sweep's results,
opt-in pictures of the feature terms, and online mode checked before anything trains."""

import json
import re
import time
from pathlib import Path

import pytest
import torch

from featkd import load_config, wandb_files
from featkd.compare import run_comparison
from featkd.config import validate
from featkd.dashboard import artifact_name, log_final_tables
from featkd.errors import ConfigError
from featkd.logging import WandbLogger
from featkd.sweep import run_sweep
from featkd.trainer import train

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
TINY = ["progress=false", "measure=false", "data.args.train_fraction=0.2", "data.args.test_fraction=0.1",
        "logger.mode=offline"]
STUDENT_ONLY = ["teacher=null", "loss.kd=null", "loss.ce.weight=1", "train.epochs=1"]
FEATURE_TERMS = ["teacher.model=cnn_tiny", "teacher.train.epochs=1", "train.epochs=2",
                 "loss.at.student=layer*", "loss.at.teacher=layer*", "loss.at.weight=62.5",
                 "loss.sp.student=layer3", "loss.sp.teacher=layer3"]
VALID_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


def wandb_runs(folder: Path, expected: int) -> dict[str, str]:
    """job type -> run id of the W&B runs under `folder`, once `expected` of them are written
    to the end (W&B's service writes the last records shortly after `finish()` returns)."""
    deadline = time.monotonic() + 30
    while True:
        found = wandb_files.runs(folder)
        if len(found) >= expected and all(wandb_files.finished(folder, r["id"]) for r in found):
            return {r["job_type"]: r["id"] for r in found}
        assert time.monotonic() < deadline, found
        time.sleep(0.1)


def metrics(run_dir: Path, stage: str) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if row["stage"] == stage]


def models(run_dir: Path, run_id: str, used: bool) -> list[dict]:
    return [a for a in wandb_files.artifacts(run_dir, run_id) if a["type"] == "model" and a["used"] == used]


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    """Two runs of one KD + AT + SP config in one output folder: with pictures (the teacher
    trained, then cached), and without (the teacher taken from the cache)."""
    out = tmp_path_factory.mktemp("runs")
    pictured = train(load_config(QUICKSTART, [f"output_dir={out}", *TINY, *FEATURE_TERMS, "logger.media=true"]))
    plain = train(load_config(QUICKSTART, [f"output_dir={out}", *TINY, *FEATURE_TERMS]))
    return pictured.run_dir, wandb_runs(pictured.run_dir, 2), plain.run_dir, wandb_runs(plain.run_dir, 1)


def test_epoch_metrics_are_plotted_against_the_epoch_and_summarised_by_meaning(distilled):
    run_dir, ids, _, _ = distilled
    defined = {stage: wandb_files.metric_definitions(run_dir, ids[stage]) for stage in ("teacher", "distill")}
    for stage, definitions in defined.items():
        logged = {k for row in metrics(run_dir, stage) for k in row} - {"stage", "step", "time", "epoch"}
        assert logged <= set(definitions)  # every per-epoch metric, by name (no overlapping globs)
        assert all(definitions[k]["step_metric"] == "epoch" and not definitions[k]["glob"] for k in logged)
        assert definitions["epoch"]["step_metric"] is None
    shared = set(defined["teacher"]) & set(defined["distill"])
    assert {"test/acc", "train/loss", "lr"} <= shared
    assert all(defined["teacher"][k] == defined["distill"][k] for k in shared)  # the stages of a group line up
    distill = defined["distill"]
    assert distill["test/acc"]["summary"] == {"max", "last"}
    assert distill["train/loss"]["summary"] == distill["train/loss/at"]["summary"] == {"min"}
    raw = [k for k in distill if k.startswith("train/raw/")]
    assert raw and all(distill[k]["summary"] == {"min"} for k in [*raw, "test/loss", "train/loss/sp"])
    assert distill["lr"]["summary"] == set()

    rows = metrics(run_dir, "distill")
    summary = wandb_files.summary(run_dir, ids["distill"])
    accuracies = [row["test/acc"] for row in rows]
    assert summary["test/acc"] == {"max": pytest.approx(max(accuracies)), "last": pytest.approx(accuracies[-1])}
    assert summary["train/loss/at"] == {"min": pytest.approx(min(row["train/loss/at"] for row in rows))}
    for stage in ("teacher", "distill"):
        history = wandb_files.history(run_dir, ids[stage])
        assert [row["_step"] for row in history] == [row["step"] for row in metrics(run_dir, stage)]
    assert [row["epoch"] for row in wandb_files.history(run_dir, ids["distill"])] == [1, 2]


def test_each_stage_logs_its_best_and_last_checkpoint_as_a_model_artifact(distilled):
    run_dir, ids, _, _ = distilled
    checkpoints = run_dir / "checkpoints"
    for stage, best, last in (("teacher", "teacher-best.pt", "teacher-last.pt"), ("distill", "best.pt", "last.pt")):
        logged = models(run_dir, ids[stage], used=False)
        assert [a["name"] for a in logged] == [f"{run_dir.name}-{stage}"] * 2
        assert "best" in logged[0]["aliases"] and {"last", stage} <= set(logged[1]["aliases"])
        assert logged[0]["files"] == {"model.pt": str(checkpoints / best)}
        assert logged[1]["files"] == {"model.pt": str(checkpoints / last)}
        result = json.loads((run_dir / "state.json").read_text())["stages"][stage]["result"]
        assert logged[1]["metadata"]["top1"] == pytest.approx(result["last_acc"])
        assert logged[0]["metadata"]["epoch"] == result["best_epoch"]
        assert logged[1]["metadata"]["model"] == "cnn_tiny"
        assert all(VALID_NAME.match(a["name"]) for a in logged)


def test_the_student_uses_its_teachers_artifact_whether_trained_here_or_cached(distilled):
    run_dir, ids, plain_dir, plain_ids = distilled
    teacher_last = models(run_dir, ids["teacher"], used=False)[-1]
    inputs = models(run_dir, ids["distill"], used=True)
    assert [a["name"] for a in inputs] == [teacher_last["name"]]
    assert inputs[0]["digest"] == teacher_last["digest"]  # the same version: lineage teacher -> student
    assert not models(run_dir, ids["teacher"], used=True)

    assert set(plain_ids) == {"distill"}  # the cached teacher has no run here, but is still an input
    cached = models(plain_dir, plain_ids["distill"], used=True)
    assert [a["name"] for a in cached] == [f"{plain_dir.name}-teacher"]
    assert cached[0]["metadata"]["source"] == "stage cache"
    assert cached[0]["files"] == {"model.pt": str(plain_dir / "checkpoints" / "teacher-last.pt")}


def test_the_final_stage_has_a_per_class_table_and_a_confusion_matrix(distilled):
    run_dir, ids, _, _ = distilled
    saved = torch.load(run_dir / "predictions.pt")
    predictions, targets, teacher = saved["predictions"], saved["targets"], saved["teacher_predictions"]
    table = wandb_files.table(run_dir, ids["distill"], "per_class")
    assert table["columns"] == ["class", "samples", "student top-1", "teacher top-1"]
    assert [row[0] for row in table["data"]] == [str(c) for c in range(10)]
    for c, (_, samples, student_acc, teacher_acc) in enumerate(table["data"]):
        mine = targets == c
        assert samples == int(mine.sum())
        assert student_acc == pytest.approx(100 * (predictions[mine] == c).float().mean().item(), abs=1e-3)
        assert teacher_acc == pytest.approx(100 * (teacher[mine] == c).float().mean().item(), abs=1e-3)
    summary = wandb_files.summary(run_dir, ids["distill"])
    assert summary["agreement"] == pytest.approx(100 * (predictions == teacher).float().mean().item())

    chart = wandb_files.charts(run_dir, ids["distill"])["confusion_matrix"]
    assert chart["chart"] == "wandb/confusion_matrix/v1"
    cells = wandb_files.table(run_dir, ids["distill"], chart["table"])["data"]
    assert len(cells) == 100 and sum(n for _, _, n in cells) == len(targets)
    assert sum(n for actual, predicted, n in cells if actual == predicted) == int((predictions == targets).sum())
    assert not wandb_files.charts(run_dir, ids["teacher"])  # only the final stage


def test_pictures_of_the_feature_terms_only_when_asked_and_training_unchanged(distilled):
    run_dir, ids, plain_dir, plain_ids = distilled
    pictures = wandb_files.images(run_dir, ids["distill"])
    steps = [row["step"] for row in metrics(run_dir, "distill")]
    assert set(pictures) == {"media/at", "media/sp"}
    for logged in pictures.values():
        assert [step for step, _ in logged] == [steps[0], steps[-1]]  # the first and the last epoch
        assert all(path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for _, path in logged)
    assert not wandb_files.images(run_dir, ids["teacher"])  # cross-entropy only: nothing to draw
    assert not wandb_files.images(plain_dir, plain_ids["distill"])

    # drawing never changes training: the same losses, accuracies and weights as without
    keys = ("train/loss", "train/loss/at", "train/loss/sp", "test/acc")
    assert [[row[k] for k in keys] for row in metrics(run_dir, "distill")] == \
        [[row[k] for k in keys] for row in metrics(plain_dir, "distill")]
    weights = [torch.load(d / "checkpoints" / "last.pt", weights_only=False)["model"] for d in (run_dir, plain_dir)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_a_teacher_assistant_chain_reads_teacher_assistant_student_in_the_lineage(tmp_path):
    model, one_epoch = {"model": "cnn_tiny"}, {"epochs": 1}
    kd = {"ce": {"weight": 0.1}, "kd": {"weight": 0.9}}
    config = validate({
        "name": "chain", "output_dir": str(tmp_path), "progress": False, "measure": False,
        "data": {"name": "digits", "args": {"train_fraction": 0.2, "test_fraction": 0.1}},
        "models": {"teacher": model, "assistant": model, "student": model},
        "stages": [{"name": "teacher", "model": "teacher", "loss": {"ce": {}}, "train": one_epoch},
                   {"name": "assistant", "model": "assistant", "teacher": "teacher", "loss": kd, "train": one_epoch},
                   {"name": "student", "model": "student", "teacher": "assistant", "loss": kd, "train": one_epoch}],
        "logger": {"name": "wandb", "mode": "offline"},
    })
    run_dir = train(config).run_dir
    ids = wandb_runs(run_dir, 3)
    made = {stage: models(run_dir, ids[stage], used=False)[-1] for stage in ("teacher", "assistant", "student")}
    used = {stage: models(run_dir, ids[stage], used=True) for stage in ("teacher", "assistant", "student")}
    assert used["teacher"] == []
    for stage, teacher in (("assistant", "teacher"), ("student", "assistant")):
        assert [(a["name"], a["digest"]) for a in used[stage]] == [(made[teacher]["name"], made[teacher]["digest"])]
    assert made["student"]["name"] == f"{run_dir.name}-student" and "student" in made["student"]["aliases"]
    assert "per_class" in wandb_files.summary(run_dir, ids["student"])


def test_a_teacher_loaded_from_a_checkpoint_is_an_input_artifact(distilled, tmp_path):
    teacher_file = distilled[0] / "checkpoints" / "teacher-last.pt"
    run_dir = train(load_config(QUICKSTART, [f"output_dir={tmp_path}", *TINY, "teacher.model=cnn_tiny",
                                             f"teacher.checkpoint={teacher_file}", "train.epochs=1"])).run_dir
    ids = wandb_runs(run_dir, 1)
    [used] = models(run_dir, ids["distill"], used=True)
    assert used["name"] == f"{run_dir.name}-teacher" and used["files"] == {"model.pt": str(teacher_file)}
    assert used["metadata"]["source"] == "checkpoint" and used["metadata"]["model"] == "cnn_tiny"


def test_a_comparison_logs_its_results_table_and_bar_chart_in_its_group(tmp_path):
    spec = tmp_path / "compare.yaml"
    spec.write_text(f"name: lr\nbase: {QUICKSTART}\nseeds: [0]\nbaseline: slow\n"
                    "variants:\n  slow: {}\n  fast: {train: {optimizer: {lr: 0.1}}}\n")
    result = run_comparison(spec, [f"output_dir={tmp_path}", *TINY, *STUDENT_ONLY], progress=False)
    ids = wandb_runs(result.folder, 1)
    assert set(ids) == {"comparison"}
    table = wandb_files.table(result.folder, ids["comparison"], "results")
    assert table["columns"][:4] == ["method", "seeds", "top-1 last (mean)", "top-1 last (std)"]
    assert [row[0] for row in table["data"]] == ["slow", "fast"]
    for row, s in zip(table["data"], result.summaries):
        assert row[2] == pytest.approx(s.last_mean) and row[4] == pytest.approx(s.best_mean)
    chart = wandb_files.charts(result.folder, ids["comparison"])["top1_last"]
    assert chart["chart"] == "wandb/bar/v0"
    assert wandb_files.table(result.folder, ids["comparison"], chart["table"])["data"] == table["data"]
    runs = wandb_files.table(result.folder, ids["comparison"], "runs")["data"]
    assert [(r[0], r[1]) for r in runs] == [("slow", 0), ("fast", 0)]
    [summary_run] = wandb_files.runs(result.folder)
    variant_run = wandb_files.runs(Path(result.rows[0].run_dir))[0]
    assert summary_run["group"] == variant_run["group"] == result.folder.name


def test_a_sweep_logs_one_row_per_setting(tmp_path):
    result = run_sweep(QUICKSTART, {"train.optimizer.lr": [0.05, 0.1]},
                       [f"output_dir={tmp_path}", *TINY, *STUDENT_ONLY], progress=False)
    ids = wandb_runs(result.folder, 1)
    table = wandb_files.table(result.folder, ids["sweep"], "results")
    assert table["columns"][:3] == ["setting", "train.optimizer.lr", "seeds"]
    assert [row[:2] for row in table["data"]] == [["train.optimizer.lr=0.05", 0.05], ["train.optimizer.lr=0.1", 0.1]]
    assert [row[3] for row in table["data"]] == pytest.approx([r.last_mean for r in result.rows])
    assert wandb_files.charts(result.folder, ids["sweep"])["top1_last"]["chart"] == "wandb/bar/v0"


def test_a_token_level_task_has_no_per_class_table(tmp_path):
    logger = WandbLogger(tmp_path, "lm/distill", {}, project="featkd", entity=None, group=None, job_type="distill",
                         tags=[], mode="offline")
    logger.log({"epoch": 1, "test/acc": 50.0}, 3)
    torch.save({"correct": torch.tensor([0.5, 1.0])}, tmp_path / "predictions.pt")  # shares of tokens, no classes
    log_final_tables(logger, tmp_path, ["a", "b"])
    log_final_tables(logger, tmp_path, [])
    logger.finish()
    run_id = wandb_runs(tmp_path, 1)["distill"]
    assert "per_class" not in wandb_files.summary(tmp_path, run_id) and not wandb_files.charts(tmp_path, run_id)


def test_online_without_a_login_stops_before_anything_trains_or_falls_back(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    online = [f"output_dir={tmp_path}", *TINY, *STUDENT_ONLY, "logger.mode=online"]
    started = time.monotonic()
    with pytest.raises(ConfigError, match="no login.*`wandb login`.*logger.mode=offline"):
        train(load_config(QUICKSTART, online))
    assert time.monotonic() - started < 5 and not any(tmp_path.iterdir())  # no run folder

    result = train(load_config(QUICKSTART, [*online, "logger.fallback=offline"]))
    assert "logging offline instead" in capsys.readouterr().err
    assert set(wandb_runs(result.run_dir, 1)) == {"student"}
    assert "mode: offline" in (result.run_dir / "config.yaml").read_text()


def test_online_with_an_unreachable_server_is_an_error_in_seconds(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setattr("featkd.logging.wandb_base_url", lambda: "http://127.0.0.1:9")  # nothing listens
    started = time.monotonic()
    with pytest.raises(ConfigError, match="127.0.0.1:9 cannot be reached"):
        train(load_config(QUICKSTART, [f"output_dir={tmp_path}", *TINY, *STUDENT_ONLY, "logger.mode=online"]))
    assert time.monotonic() - started < 10


def test_a_run_wandb_refuses_online_is_an_error_or_an_offline_run(tmp_path, monkeypatch, capsys):
    import wandb

    real_init = wandb.init

    def refusing(**kwargs):
        if kwargs["mode"] == "online":
            raise wandb.errors.CommError("the server did not answer")
        return real_init(**kwargs)

    monkeypatch.setattr(wandb, "init", refusing)
    start = dict(project="featkd", entity=None, group=None, job_type="distill", tags=[], mode="online")
    with pytest.raises(ConfigError, match="could not start the run \\(the server did not answer\\)"):
        WandbLogger(tmp_path, "run/distill", {}, **start)
    logger = WandbLogger(tmp_path, "run/distill", {}, **start, fallback="offline")
    logger.finish()
    assert logger.mode == "offline" and "logging offline instead" in capsys.readouterr().err


def test_media_needs_wandb_and_artifact_names_are_valid():
    with pytest.raises(ConfigError, match="logger: `media: true` draws pictures for W&B, which this config turns off"):
        load_config(QUICKSTART, ["logger=none", "logger.media=true"])
    assert artifact_name("my run: v2/ä", "stage 1") == "my-run-v2-stage-1"
    long_a, long_b = artifact_name("x" * 200, "a"), artifact_name("x" * 200, "b")
    assert VALID_NAME.match(long_a) and VALID_NAME.match(long_b) and long_a != long_b
