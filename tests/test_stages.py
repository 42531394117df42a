"""Runs as lists of stages: teacher-assistant chains, freezing, validation of the stage graph."""

import json

import pytest
import torch

from featkd.checkpoint import load_checkpoint
from featkd.config import load_config
from featkd.errors import ConfigError
from featkd.stages import plan_stages
from featkd.trainer import train

TINY = ["logger=none", "progress=false", "data.args.train_fraction=0.3"]


def takd(tmp_path, *extra):
    stage_epochs = [f"stages.{i}.train.epochs=1" for i in range(3)]
    return load_config("configs/takd.yaml", [f"output_dir={tmp_path}", *TINY, *stage_epochs, *extra])


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_the_simple_form_plans_teacher_then_distill_stages():
    plan = plan_stages(load_config("configs/quickstart.yaml"))
    assert [(s.name, s.model, s.teachers, s.cache) for s in plan.stages] == [
        ("teacher", "teacher", [], True), ("distill", "student", ["teacher"], False)]
    plan = plan_stages(load_config("configs/zoo/ensemble.yaml"))
    assert [s.name for s in plan.stages] == ["teacher0", "teacher1", "teacher2", "distill"]
    assert plan.final.teachers == ["teacher0", "teacher1", "teacher2"]


def test_a_teacher_assistant_chain_trains_each_model_from_the_previous_one(tmp_path):
    result = train(takd(tmp_path))
    assert list(result.stages) == ["teacher", "assistant", "student"]
    stages = [r["stage"] for r in records(result.run_dir)]
    assert stages == ["teacher", "assistant", "student"]
    # each stage's model was saved, and the assistant's checkpoint is what taught the student
    assistant = load_checkpoint(result.run_dir / "checkpoints" / "assistant-last.pt")
    assert assistant["model_args"] == {"widths": [16, 32], "blocks": [2, 2]}
    assert result.teacher_models == ["cnn"] and result.teacher_footprints[0].parameters == sum(
        v.numel() for k, v in assistant["model"].items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    assert (result.run_dir / "checkpoints" / "last.pt").is_file()
    state = json.loads((result.run_dir / "state.json").read_text())["stages"]
    assert [state[s]["status"] for s in ("teacher", "assistant", "student")] == ["done", "done", "done"]
    # the cached teacher stage is reused by the next run
    again = train(takd(tmp_path, "seed=1"))
    state = json.loads((again.run_dir / "state.json").read_text())["stages"]
    assert state["teacher"]["status"] == "cached" and state["assistant"]["status"] == "done"
    assert again.stages["teacher"].last_acc == result.stages["teacher"].last_acc


def test_freeze_and_unfreeze_hold_parameters_for_one_stage(tmp_path):
    from featkd.data import build_data
    from featkd.trainer import build_models

    config = takd(tmp_path, "stages.2.freeze=[layer1.**]", "stages.2.unfreeze=[layer1.0.bn.*]")
    initial = build_models(plan_stages(config), build_data("digits", config.data.args), config.seed)["student"].state_dict()
    result = train(config)
    final = load_checkpoint(result.run_dir / "checkpoints" / "last.pt")["model"]
    assert torch.equal(final["layer1.0.conv.weight"], initial["layer1.0.conv.weight"])  # frozen
    assert not torch.equal(final["layer1.0.bn.weight"], initial["layer1.0.bn.weight"])  # unfrozen again
    assert not torch.equal(final["layer2.0.conv.weight"], initial["layer2.0.conv.weight"])  # never frozen
    # the assistant, trained before without freezing, moved everywhere
    assistant = load_checkpoint(result.run_dir / "checkpoints" / "assistant-last.pt")["model"]
    assert "layer1.0.conv.weight" in assistant


@pytest.mark.parametrize("override,message", [
    ("stages.1.teacher=[nobody]", r"stages\.1\.teacher: no model 'nobody'"),
    ("stages.1.model=assistent", r"stages\.1\.model: no model 'assistent'.*Did you mean 'assistant'"),
    ("stages.1.teacher=[student]", r"'student' is neither trained by an earlier stage nor loaded"),
    ("stages.2.name=teacher", r"two stages are named 'teacher'"),
    ("stages.1.loss.kd.temprature=3", r"stages\.1\.loss\.kd: unknown argument 'temprature'"),
    ("stages.0.loss.kd.weight=1", r"stages\.0\.loss\.kd: 'kd' needs a teacher; set stages\.0\.teacher"),
    ("student.model=cnn", r"remove \['student'\]"),
])
def test_stage_graphs_are_validated_before_anything_runs(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("configs/takd.yaml", [override])


def test_a_config_needs_a_student_or_stages():
    with pytest.raises(ConfigError, match="give `student:`"):
        load_config(data={"logger": "none"})


def test_a_stage_can_train_on_its_own_data(tmp_path):
    config = load_config("configs/quickstart.yaml", [
        f"output_dir={tmp_path}", "logger=none", "progress=false", "teacher.train.epochs=1", "train.epochs=1",
        "data.args.train_fraction=0.1", "teacher.data.name=digits"])
    result = train(config)
    steps = {r["stage"]: r["epoch"] for r in records(result.run_dir)}
    teacher_state = load_checkpoint(result.run_dir / "checkpoints" / "teacher-last.pt")
    student_state = load_checkpoint(result.run_dir / "checkpoints" / "last.pt")
    assert teacher_state["step"] == 1437 // 64 and student_state["step"] == 143 // 64  # full data vs 10%
    assert steps == {"teacher": 1, "distill": 1}
    with pytest.raises(ConfigError, match="not in classes or shape"):
        train(load_config("configs/quickstart.yaml", [f"output_dir={tmp_path}", "logger=none", "progress=false",
                                                      "teacher.data.name=mnist1d", "teacher.train.epochs=1"]))
