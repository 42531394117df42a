import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from featkd.bench import overhead
from featkd.cli import main
from featkd.compare import load_spec, plan, run_comparison
from featkd.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")


def write_spec(tmp_path, variants, **extra) -> Path:
    spec = {"name": "mini", "base": QUICKSTART, "seeds": [0, 1], "baseline": "alone", "variants": variants, **extra}
    path = tmp_path / "mini.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


ALONE = {"teacher": None, "loss": {"kd": None, "ce": {"weight": 1.0}}}
FAST = ["train.epochs=1", "teacher.train.epochs=1", "logger=none", "progress=false"]


def test_a_comparison_runs_every_variant_and_seed_and_tabulates_them(tmp_path):
    path = write_spec(tmp_path, {"alone": ALONE, "KD": {}})
    result = run_comparison(path, [f"output_dir={tmp_path}", *FAST], progress=False)
    assert [(r.variant, r.seed) for r in result.rows] == [("alone", 0), ("KD", 0), ("alone", 1), ("KD", 1)]
    kd = next(s for s in result.summaries if s.variant == "KD")
    kd_last = [r.last_acc for r in result.rows if r.variant == "KD"]
    assert kd.last_mean == pytest.approx(statistics.fmean(kd_last))
    assert kd.last_std == pytest.approx(statistics.stdev(kd_last))
    alone = next(s for s in result.summaries if s.variant == "alone")
    assert kd.delta_last == pytest.approx(kd.last_mean - alone.last_mean) and alone.delta_last is None
    table = (result.folder / "results.md").read_text()
    assert "| KD |" in table and "top-1 last" in table and "top-1 best" in table
    assert len((result.folder / "results.csv").read_text().splitlines()) == 5
    assert json.loads((result.folder / "results.json").read_text())["baseline"] == "alone"
    assert result.teacher_acc and result.teacher_models == ["cnn_large"]


def test_variants_whose_names_slug_alike_get_run_folders_of_their_own():
    from featkd.compare import run_names

    names = run_names(["DIST", "DIST+", "dist", "KD + DOT", "KD+LS"])
    assert names == {"DIST": "dist", "DIST+": "dist-2", "dist": "dist-3", "KD + DOT": "kd-dot", "KD+LS": "kd-ls"}


def test_overrides_apply_to_the_variants_that_have_the_section(tmp_path):
    path = write_spec(tmp_path, {"alone": ALONE, "KD": {}})
    spec, spec_path = load_spec(path)
    configs = plan(spec, spec_path, ["loss.kd.temperature=2", "train.epochs=3"])
    assert configs["KD"].terms["kd"].params == {"temperature": 2}
    assert "kd" not in configs["alone"].terms
    assert configs["alone"].train.epochs == configs["KD"].train.epochs == 3
    with pytest.raises(ConfigError, match="matches no variant"):
        plan(spec, spec_path, ["loss.sp.weight=1"])


def test_a_bad_variant_fails_before_anything_runs(tmp_path):
    path = write_spec(tmp_path, {"alone": ALONE, "broken": {"loss": {"at": {"weight": 1}}}})
    with pytest.raises(ConfigError, match="variant 'broken'.*loss.at"):
        run_comparison(path, [f"output_dir={tmp_path}", *FAST], progress=False)
    assert not any(p.is_dir() for p in tmp_path.iterdir())
    bad = write_spec(tmp_path, {"alone": ALONE}, baseline="nobody")
    with pytest.raises(ConfigError, match="baseline 'nobody'"):
        load_spec(bad)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_SILENT": "true"}
    return subprocess.run([sys.executable, "-m", "featkd.cli", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)


FAST_CLI = ["train.epochs=1", "teacher.train.epochs=1", "logger=none", "progress=false"]


@pytest.mark.parametrize("args,message", [
    (["train", QUICKSTART, "trian.epochs=3"], "trian: unknown key. Did you mean 'train'?"),
    (["train", QUICKSTART, "loss.kdd.weight=1"], "unknown loss 'kdd'. Did you mean 'kd'"),
    (["train", QUICKSTART, "student.model=cnn_smal"], "unknown model 'cnn_smal'"),
    (["train", QUICKSTART, "data.name=digts"], "unknown dataset 'digts'"),
    (["train", QUICKSTART, "loss.fitnet.student=fc:in", "loss.fitnet.teacher=layer3", *FAST_CLI],
     "no adapter maps a student vector (16,) to a teacher map (256, 2, 2)"),
    (["train", QUICKSTART, "data=cifar10", "data.args.root=/nonexistent", "student.model=cnn_tiny", *FAST_CLI],
     "featkd does not download data"),
    (["train", QUICKSTART, "teacher.checkpoint=configs/quickstart.yaml", *FAST_CLI], "cannot read checkpoint"),
    (["train", QUICKSTART, "loss.at.student=layer9", "loss.at.teacher=layer3", "train.epochs=1",
      "teacher.train.epochs=1", "logger=none"], "no module 'layer9'"),
    (["train", "missing.yaml"], "not found"),
    (["inspect", "cnn_smal"], "Did you mean 'cnn_small'"),
    (["compare", QUICKSTART], "invalid comparison file"),
])
def test_bad_input_exits_with_code_2_and_one_message(args, message, tmp_path, capsys):
    if args[0] == "train" and len(args) > 2:
        args = [*args, f"output_dir={tmp_path}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") <= 3


def test_a_real_process_exits_with_code_2_without_a_traceback():
    proc = run_cli("train", QUICKSTART, "loss.kd.temprature=2")
    assert proc.returncode == 2
    assert "unknown argument 'temprature'. Did you mean 'temperature'?" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_teacher_checkpoint_of_another_model_exits_with_code_2(tmp_path, capsys):
    assert main(["train", QUICKSTART, f"output_dir={tmp_path}", *FAST_CLI, "teacher=null", "loss.kd=null"]) == 0
    student_checkpoint = next(tmp_path.glob("quickstart-*/checkpoints/last.pt"))
    capsys.readouterr()
    assert main(["train", QUICKSTART, f"output_dir={tmp_path}", *FAST_CLI,
                 f"teacher.checkpoint={student_checkpoint}"]) == 2
    assert "does not fit the model 'cnn_large'" in capsys.readouterr().err


def test_train_command_prints_a_summary(tmp_path, capsys):
    assert main(["train", QUICKSTART, f"output_dir={tmp_path}", *FAST]) == 0
    out = capsys.readouterr().out
    assert "student      top-1 last" in out and "teacher      top-1" in out and "agreement" in out


def test_inspect_lists_hookable_names_with_shapes(capsys):
    assert main(["inspect", "cnn_small"]) == 0
    out = capsys.readouterr().out
    assert "layer1" in out and "16x8x8" in out and "fc" in out
    assert main(["inspect", "torchvision:resnet18", "--input-shape", "3,32,32", "--depth", "3"]) == 0
    out = capsys.readouterr().out
    assert "layer4.1.relu" in out and "runs 2x" in out and "512x1x1" in out
    assert main(["inspect", "timm:resnet18", "--input-shape", "3,32,32", "--num-classes", "5"]) == 0
    assert "global_pool" in capsys.readouterr().out


def test_list_and_config_commands(capsys):
    assert main(["list", "losses"]) == 0
    out = capsys.readouterr().out
    assert "kd" in out and "Hinton" in out and "rkd" in out
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert all(kind + ":" in out for kind in ["losses", "adapters", "models", "datasets", "optimizers", "schedulers"])
    assert main(["config", "quickstart", "loss.kd.temperature=2"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["loss"]["kd"]["temperature"] == 2


def test_bench_rkd_angle_prints_and_writes_numbers(tmp_path, capsys):
    out = tmp_path / "rkd.json"
    assert main(["bench", "rkd-angle", "--batch", "24", "--dim", "8", "--repeats", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "naive" in printed and "gram / naive" in printed
    data = json.loads(out.read_text())
    assert [r["form"] for r in data["results"]] == ["naive", "gram"]
    assert all(r["seconds"] > 0 for r in data["results"]) and "torch" in data["machine"]


def test_bench_overhead_measures_each_step_against_its_bound(tmp_path, capsys):
    out = tmp_path / "overhead.json"
    assert main(["bench", "--teacher", "cnn_small", "--student", "cnn_tiny", "--input-shape", "1,8,8",
                 "--classes", "10", "--batch", "16", "--repeats", "3", "--methods", "kd,rkd", "--json", str(out)]) == 0
    assert "T_d/(T_s+T_t)" in capsys.readouterr().out
    rows = {r["name"]: r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {"student", "teacher", "kd", "rkd"}
    bound = rows["student"]["seconds"] + rows["teacher"]["seconds"]
    assert rows["kd"]["ratio"] == pytest.approx(rows["kd"]["seconds"] / bound)
    assert rows["rkd"]["peak_mib"] >= 0 and rows["student"]["ratio"] is None  # tiny models: a few pages at most
    # every method of the suite (`all`: the default run's and the zoo's later ones), at tiny sizes
    assert main(["bench", "--teacher", "cnn_small", "--student", "cnn_tiny", "--input-shape", "1,8,8",
                 "--classes", "10", "--batch", "8", "--repeats", "1", "--methods", "all", "--no-memory",
                 "--json", str(out)]) == 0
    rows = {r["name"]: r for r in json.loads(out.read_text())["results"]}
    assert list(rows) == ["student", "teacher", *overhead.METHODS, *overhead.ZOO2_METHODS]
    assert all(rows[m]["ratio"] > 0 for m in overhead.GROUPS["all"])
    assert main(["bench", "--teacher", "cnn_small", "--student", "cnn_tiny", "--input-shape", "1,8,8",
                 "--methods", "kd+nope", "--no-memory"]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err


def test_bench_overhead_times_each_method_as_it_trains():
    common = {"teacher": "cnn_small", "student": "cnn_tiny", "input_shape": [1, 8, 8], "classes": 10, "batch": 8}
    sskd = overhead.build("sskd", **common)  # each image with its three rotated copies: 4x the rows
    x, y, extras = sskd.batch
    assert x.shape[0] == 32 and (y != -100).sum() == 8 and extras["rotation"][:4].tolist() == [0, 1, 2, 3]
    dot = overhead.build("kd+dot", **common)  # TrainStep: two backward passes, the DOT update
    dot()
    assert dot.train_step is not None and dot.optimizer.state
    assert all(set(s) == {"task_momentum", "distillation_momentum"} for s in dot.optimizer.state.values())
    ofd = overhead.build("ofd", **common)  # the pre-ReLU batch norms, whose beta and gamma give the margins
    assert ofd.distiller.term("ofd").teacher == ["layer1.0.bn", "layer2.0.bn", "layer3.0.bn"]
    assert bool(ofd.distiller.losses["ofd"].from_batchnorm)
    from featkd.models import build_model

    resnet = overhead.feature_names(build_model("torchvision:resnet18", 10, [3, 32, 32]))
    assert resnet["pre_relu"] == ["layer1.1.bn2", "layer2.1.bn2", "layer3.1.bn2", "layer4.1.bn2"]
    assert (resnet["embedding"], resnet["classifier"], resnet["width"]) == ("fc:in", "fc", 512)
    wide = overhead.feature_names(build_model("wrn_16_2", 10, [3, 32, 32]))  # pre-activation: the stage itself
    assert wide["pre_relu"] == ["layer1", "layer2", "layer3"]


def test_bench_overhead_on_text_models_runs_the_text_methods(tmp_path, capsys):
    out = tmp_path / "text.json"
    assert main(["bench", "--teacher", "transformer", "--teacher-args", '{"layers": 2, "hidden": 32}',
                 "--student", "transformer", "--student-args", '{"layers": 1, "hidden": 32}', "--input-shape", "16",
                 "--vocab", "100", "--classes", "2", "--batch", "4", "--repeats", "1", "--no-memory",
                 "--json", str(out)]) == 0
    rows = {r["name"]: r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {"student", "teacher", "kd", "distilbert", "minilm", "minilmv2", "tinybert"}
    assert all(rows[m]["ratio"] > 0 for m in ("distilbert", "minilm", "tinybert"))
    assert main(["bench", "--teacher", "transformer", "--teacher-args", "[1]"]) == 2
    assert "give a JSON object" in capsys.readouterr().err


def test_bench_scaling_and_cache_suites(tmp_path, capsys):
    assert main(["bench", "scaling", "--batches", "16,32", "--repeats", "1"]) == 0
    printed = capsys.readouterr().out
    assert "rkd" in printed and "crd" in printed and "exp" in printed
    assert main(["bench", "cache", "--teacher", "cnn_small", "--student", "cnn_tiny", "--input-shape", "1,8,8",
                 "--classes", "10", "--batch", "32"]) == 0
    assert "KD + teacher cache" in capsys.readouterr().out


def test_results_name_each_variants_teacher_when_the_variants_compare_teachers(tmp_path):
    from featkd.compare import ComparisonResult, results_markdown

    def result(teachers):
        return ComparisonResult("t", tmp_path, [], [], teachers, None, 1.0)

    same = results_markdown(result({"KD": [("cnn_large", 99.0)], "AT": [("cnn_large", 99.0)]}))
    assert "Teacher cnn_large: top-1 99.00% (last epoch)." in same and " of " not in same.splitlines()[0]
    differ = results_markdown(result({"small": [("cnn_small", 97.5)], "large": [("cnn_large", 99.0)]}))
    assert "Teacher of small: cnn_small top-1 97.50% (last epoch)." in differ
    assert "Teacher of large: cnn_large top-1 99.00% (last epoch)." in differ
    assert "Teacher cnn_large:" not in differ


def test_each_difference_comes_with_an_interval_over_seeds_and_test_images(tmp_path):
    path = write_spec(tmp_path, {"alone": ALONE, "KD": {}})
    result = run_comparison(path, [f"output_dir={tmp_path}", *FAST], progress=False)
    kd = next(s for s in result.summaries if s.variant == "KD")
    assert kd.interval.difference == pytest.approx(kd.delta_last)
    assert kd.interval.low <= kd.delta_last <= kd.interval.high
    assert "[95% CI]" in (result.folder / "results.md").read_text()
    assert all((Path(r.run_dir) / "predictions.pt").is_file() for r in result.rows)


def test_select_chooses_each_variants_setting_on_the_validation_split(tmp_path):
    select = {"grid": {"train.optimizer.lr": [0.0001, 0.1]}, "seeds": [5]}
    path = write_spec(tmp_path, {"alone": ALONE, "KD": {}}, select=select)
    held_out = ["data.args.validation_fraction=0.2", "train.epochs=2"]
    result = run_comparison(path, [f"output_dir={tmp_path}", *FAST, *held_out], progress=False)
    assert sorted((r.variant, r.seed) for r in result.selection) == [
        ("KD @ train.optimizer.lr=0.0001", 5), ("KD @ train.optimizer.lr=0.1", 5),
        ("alone @ train.optimizer.lr=0.0001", 5), ("alone @ train.optimizer.lr=0.1", 5)]
    for variant in ("alone", "KD"):
        scores = {r.variant: r.val_acc for r in result.selection if r.variant.startswith(variant + " @")}
        best = max(scores, key=scores.get).split("=")[-1]
        assert result.chosen[variant] == {"train.optimizer.lr": float(best)}
        run = next(Path(r.run_dir) for r in result.rows if r.variant == variant)
        assert yaml.safe_load((run / "config.yaml").read_text())["train"]["optimizer"]["lr"] == float(best)
    assert "chosen on the validation split" in (result.folder / "results.md").read_text()
    with pytest.raises(ConfigError, match="no validation split"):
        run_comparison(path, [f"output_dir={tmp_path / 'none'}", *FAST], progress=False)


def test_a_setting_that_diverges_during_selection_is_never_chosen(tmp_path):
    select = {"grid": {"train.optimizer.lr": [1.0e6, 0.05]}, "seeds": [5]}
    path = write_spec(tmp_path, {"alone": ALONE}, select=select, baseline=None)
    result = run_comparison(path, [f"output_dir={tmp_path}", "train.epochs=1", "logger=none", "progress=false",
                                   "data.args.validation_fraction=0.2"], progress=False)
    assert [r.diverged for r in result.selection] == [True, False]
    assert result.chosen == {"alone": {"train.optimizer.lr": 0.05}}
    assert "| alone | diverged | **" in (result.folder / "results.md").read_text()
