"""Grid sweeps, their tables, parallel runs, and the W&B sweep file."""

import csv
import shlex

import pytest
import yaml

from featkd.cli import main
from featkd.errors import ConfigError
from featkd.sweep import parse_grid, plan_sweep, run_sweep, wandb_sweep_yaml

BASE = ["logger=none", "progress=false", "teacher.train.epochs=1", "train.epochs=1", "data.args.train_fraction=0.3"]


def test_grid_parsing():
    assert parse_grid(["loss.kd.temperature=1,2,4", "seed=0,1"]) == {"loss.kd.temperature": [1, 2, 4], "seed": [0, 1]}
    assert parse_grid(["student.args.widths=[4,8];[8,16]"]) == {"student.args.widths": [[4, 8], [8, 16]]}
    with pytest.raises(ConfigError, match="key=value1,value2"):
        parse_grid(["loss.kd.temperature"])
    with pytest.raises(ConfigError, match="given twice"):
        parse_grid(["seed=1", "seed=2"])


def test_every_point_of_the_grid_is_validated_first(tmp_path):
    with pytest.raises(ConfigError, match=r"sweep setting 'loss.kd.temprature=1'"):
        plan_sweep("configs/quickstart.yaml", parse_grid(["loss.kd.temprature=1,2"]), [f"output_dir={tmp_path}"])
    configs, seeds = plan_sweep("configs/quickstart.yaml", parse_grid(["loss.kd.temperature=1,8", "seed=3,4"]), [])
    assert list(configs) == ["loss.kd.temperature=1", "loss.kd.temperature=8"] and seeds == [3, 4]
    assert configs["loss.kd.temperature=8"].terms["kd"].params == {"temperature": 8}


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_sweep_writes_one_row_per_setting_over_seeds(tmp_path, jobs):
    grid = parse_grid(["loss.kd.temperature=1,4", "seed=0,1"])
    result = run_sweep("configs/quickstart.yaml", grid, [f"output_dir={tmp_path}", *BASE], jobs=jobs, name="t-sweep",
                       progress=False)
    assert [r.setting for r in result.rows] == [{"loss.kd.temperature": 1}, {"loss.kd.temperature": 4}]
    assert all(r.seeds == 2 for r in result.rows) and len(result.runs) == 4
    table = (result.folder / "results.md").read_text()
    assert "top-1 last (mean ± std)" in table and "top-1 best (mean ± std)" in table
    rows = list(csv.DictReader((result.folder / "results.csv").open()))
    assert [r["loss.kd.temperature"] for r in rows] == ["1", "4"]
    mine = [r.last_acc for r in result.runs if r.variant == "loss.kd.temperature=4"]
    assert float(rows[1]["top1_last_mean"]) == pytest.approx(sum(mine) / 2, abs=1e-3)
    assert result.folder.name.startswith("t-sweep")
    # the teacher was trained once and shared by every run
    teachers = list((tmp_path / "cache").glob("cnn_large-*.pt"))
    assert len(teachers) == 1


def test_the_wandb_sweep_file_runs_featkd_train_with_each_grid_point(tmp_path, capsys):
    out = tmp_path / "sweep.yaml"
    overrides = [f"output_dir={tmp_path}", *BASE]
    assert main(["sweep", "configs/quickstart.yaml", *overrides, "--grid", "loss.kd.temperature=2,4",
                 "--grid", "seed=0,1", "--wandb-sweep", str(out)]) == 0
    spec = yaml.safe_load(out.read_text())
    assert spec["method"] == "grid" and spec["parameters"]["seed"] == {"values": [0, 1]}
    assert "${args_no_hyphens}" in spec["command"]
    # what a W&B agent runs for one grid point: the command with the point's key=value pairs
    point = ["loss.kd.temperature=4", "seed=1"]
    command = [part for part in spec["command"] if part != "${args_no_hyphens}"] + point
    assert command[:2] == ["featkd", "train"]
    assert main([*command[1:], "logger=none"]) == 0, shlex.join(command)  # logger=none: no network in tests
    assert "student      top-1" in capsys.readouterr().out
