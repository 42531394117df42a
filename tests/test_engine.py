"""The training loop's options: non-finite losses, mixed precision, accumulation, evaluation."""

import json

import pytest
import torch

from featkd.checkpoint import load_checkpoint
from featkd.cli import main
from featkd.config import load_config
from featkd.engine import NonFiniteLoss
from featkd.losses import LOSSES
from featkd.trainer import train

QUICK = ["logger=none", "progress=false", "teacher.train.epochs=1", "train.epochs=2"]


def quick(tmp_path, *extra):
    return load_config("configs/quickstart.yaml", [f"output_dir={tmp_path}", *QUICK, *extra])


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


NAN = ["plugins=[featkd_test_plugins]", "loss.nan_after.steps=30", "train.epochs=3"]


def test_a_non_finite_term_stops_the_run_naming_term_and_step_and_keeps_the_good_checkpoint(tmp_path):
    with pytest.raises(NonFiniteLoss) as error:
        train(quick(tmp_path, *NAN))
    message = str(error.value)
    assert "'nan_after'" in message and "optimizer step 31" in message and "epoch 2" in message
    assert "nonfinite: skip" in message
    run_dir = next(tmp_path.glob("quickstart-*"))
    good = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert good["epoch"] == 1 and all(torch.isfinite(v).all() for v in good["model"].values() if v.is_floating_point())


def test_the_command_line_exits_non_zero_on_a_non_finite_loss(tmp_path, capsys):
    code = main(["train", "configs/quickstart.yaml", f"output_dir={tmp_path}", *QUICK, *NAN])
    assert code == 3
    err = capsys.readouterr().err
    assert "not finite" in err and "Traceback" not in err


def test_non_finite_steps_can_be_skipped_instead(tmp_path):
    result = train(quick(tmp_path, *NAN, "nonfinite=skip"))
    assert result.student.skipped_steps == 3 * 22 - 30
    last = metrics(result.run_dir)[-1]
    assert last["train/skipped_steps"] == 3 * 22 - 30
    weights = load_checkpoint(result.run_dir / "checkpoints" / "last.pt")["model"]
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_learns_like_full_precision(tmp_path, precision):
    alone = ["teacher=null", "loss.kd=null", "loss.ce.weight=1", "train.epochs=3"]
    reduced = train(quick(tmp_path, f"precision={precision}", *alone)).student.last_acc
    full = train(quick(tmp_path, "precision=fp32", *alone)).student.last_acc
    assert reduced > 40 and abs(reduced - full) < 10


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_distillation_stays_finite(tmp_path, precision):
    result = train(quick(tmp_path, f"precision={precision}", "loss.rkd.student=fc:in", "loss.rkd.teacher=fc:in",
                         "teacher.model=cnn_small", "data.args.train_fraction=0.4"))
    assert all(v == v for r in metrics(result.run_dir) for k, v in r.items() if k.startswith("train/"))


def test_under_autocast_models_run_in_low_precision_and_losses_in_fp32():
    from featkd import Distiller, Term
    from featkd.models import build_model

    teacher, student = build_model("cnn_small", 10, (1, 8, 8)), build_model("cnn_tiny", 10, (1, 8, 8))
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    distiller = Distiller(teacher, student, [Term("ce"), Term("kd"), Term("rkd", student="fc:in", teacher="fc:in")],
                          example_input=x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = distiller(x, y)
    assert out.logits.dtype == torch.bfloat16
    assert all(v.dtype == torch.float32 for v in out.losses.values())


# relational losses without per-sample state, so that they can be recomputed by hand
RELATIONAL = [n for n in LOSSES.names() if LOSSES.get(n).relational and not LOSSES.get(n).batch_keys]


def test_relational_losses_compute_in_fp32_under_autocast():
    from featkd import Distiller, Term
    from featkd.models import build_model

    torch.manual_seed(0)
    teacher, student = build_model("cnn_small", 10, (1, 8, 8)), build_model("cnn_tiny", 10, (1, 8, 8))
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    examples = {n: LOSSES.get(n).example for n in RELATIONAL}  # one feature pair each
    terms = [Term(n, student=e.student, teacher=e.teacher, adapter=e.adapter, **e.params) for n, e in examples.items()]
    distiller = Distiller(teacher, student, terms, example_input=x).eval()
    captured = {}
    for name in RELATIONAL:
        module = distiller.losses[name]
        module.register_forward_hook(lambda m, args, out, name=name: captured.setdefault(name, args) and None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = distiller(x, y)
    for name, (s, t) in captured.items():  # the losses got bf16 features; recompute them in fp32 by hand
        assert s.dtype == t.dtype == torch.bfloat16, name
        exact = distiller.losses[name](s.float(), t.float())
        exact = sum(exact.values()) if isinstance(exact, dict) else exact
        weight = next(t.weight for t in distiller.terms if t.name == name)
        assert mixed.losses[name].item() == pytest.approx(weight * exact.item(), rel=1e-5), name


def test_accumulating_two_half_batches_equals_one_full_batch(tmp_path):
    common = ["teacher=null", "loss.kd=null", "loss.ce.weight=1", "student.model=mlp", "train.epochs=1",
              "data.args.augment=false", "train.optimizer.momentum=0", "train.optimizer.weight_decay=0"]
    full = train(quick(tmp_path, *common, "data.batch_size=64"))
    halves = train(quick(tmp_path, *common, "data.batch_size=32", "train.accumulate=2"))
    a = load_checkpoint(full.run_dir / "checkpoints" / "last.pt")
    b = load_checkpoint(halves.run_dir / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 22
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-5, atol=1e-6)


def test_gradient_clipping_bounds_the_update(tmp_path):
    result = train(quick(tmp_path, "teacher=null", "loss.kd=null", "loss.ce.weight=1", "train.grad_clip=0.001",
                         "train.epochs=1", "train.optimizer.momentum=0", "train.optimizer.weight_decay=0",
                         "train.scheduler=constant", "train.optimizer.lr=1.0"))
    from featkd.data import build_data
    from featkd.stages import plan_stages
    from featkd.trainer import build_models

    config = quick(tmp_path, "teacher=null", "loss.kd=null", "loss.ce.weight=1", "train.epochs=1")
    initial = build_models(plan_stages(config), build_data("digits"), config.seed)["student"].state_dict()
    final = load_checkpoint(result.run_dir / "checkpoints" / "last.pt")["model"]
    moved = torch.cat([(final[k] - initial[k]).flatten() for k in initial if initial[k].is_floating_point()
                       and "running" not in k])
    assert moved.norm() <= 22 * 0.001 * 1.0 + 1e-6  # 22 steps of lr x at most the clip norm


def test_eval_command_reproduces_the_runs_accuracy(tmp_path, capsys):
    result = train(quick(tmp_path))
    assert main(["eval", str(result.run_dir / "checkpoints" / "best.pt")]) == 0
    out = capsys.readouterr().out
    assert f"test top-1 {result.student.best_acc:.2f}%" in out and "cnn_tiny" in out
    assert main(["eval", str(tmp_path / "nope.pt")]) == 2


def test_the_summary_measures_size_and_cpu_latency_of_student_and_teacher(tmp_path, capsys):
    assert main(["train", "configs/quickstart.yaml", f"output_dir={tmp_path}", *QUICK,
                 "measure={batch_sizes: [1, 8], repeats: 5, warmup: 1, threads: 1}"]) == 0
    out = capsys.readouterr().out
    assert "multiply-adds" in out and "agreement" in out and "student / teacher" in out and "1 thread," in out
    summary = json.loads(next(tmp_path.glob("quickstart-*/summary.json")).read_text())["run"]
    student, teacher = ({k.split("/", 1)[1]: v for k, v in summary.items() if k.startswith(who + "/")}
                        for who in ("student", "teacher"))
    assert student["multiply_adds"] > 0 and teacher["multiply_adds"] > 10 * student["multiply_adds"]
    assert teacher["parameters"] > 10 * student["parameters"]
    # the weights file: 4 bytes a float32 parameter and buffer, and a little framing
    assert 4 * student["parameters"] < student["file_mb"] * 2**20 < 4 * student["parameters"] + 64 * 1024
    for who in (student, teacher):
        assert who["threads"] == 1
        for batch in (1, 8):
            assert 0 < who[f"latency_b{batch}_median_ms"] <= who[f"latency_b{batch}_p90_ms"]
    assert summary["student_vs_teacher/parameters"] == pytest.approx(student["parameters"] / teacher["parameters"])
    assert summary["student_vs_teacher/latency_b8_median_ms"] == pytest.approx(
        student["latency_b8_median_ms"] / teacher["latency_b8_median_ms"])
