"""Every shipped config validates and trains end to end on tiny settings, so none can rot."""

import json
from pathlib import Path

import pytest
import yaml

from featkd.compare import load_spec, plan
from featkd.config import dump_yaml, load_config
from featkd.data import build_data
from featkd.trainer import train

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RUN_CONFIGS = sorted(p for p in CONFIGS.rglob("*.yaml") if "variants" not in yaml.safe_load(p.read_text()))
COMPARISONS = sorted(p for p in CONFIGS.rglob("*.yaml") if "variants" in yaml.safe_load(p.read_text()))


def test_there_is_a_config_for_every_loss():
    from featkd.losses import LOSSES

    used = set()
    for path in RUN_CONFIGS:
        for name, term in load_config(path).terms.items():
            used.add(term.type or name)
    assert {n for n in LOSSES.names() if LOSSES.get(n).__module__.startswith("featkd.losses")} <= used


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_run_config_trains_on_tiny_settings(path, tmp_path):
    tiny = [f"output_dir={tmp_path}", "logger=none", "progress=false"]
    text = build_data(load_config(path).data.name, load_config(path).data.args).text is not None
    tiny += ["data.args.train_size=128", "data.args.test_size=32"] if text else ["data.args.train_fraction=0.2"]
    args = load_config(path).data.args
    tiny += [f"data.args.{k}={v}" for k, v in (("train_subset", 64), ("validation_size", 32)) if args.get(k)]
    for i, teacher in enumerate(load_config(path).teacher or []):
        if teacher.data is not None and teacher.data.args.get("train_size"):  # a teacher's own, larger draw
            tiny += [f"teacher.{i}.data.args.train_size=128", f"teacher.{i}.data.args.test_size=32"]
            tiny += [f"teacher.{i}.data.args.validation_size=32"] if teacher.data.args.get("validation_size") else []
    config = load_config(path, tiny)
    if config.stages:
        overrides = [f"stages.{i}.train.epochs=1" for i in range(len(config.stages))]
    else:
        overrides = ["train.epochs=1", *(f"teacher.{i}.train.epochs=1" for i in range(len(config.teacher or [])))]
        overrides += [f"loss.{name}.pretrain.epochs=1" for name, term in config.terms.items()
                      if "pretrain" in (yaml.safe_load(path.read_text()).get("loss", {}).get(name) or {})]
    result = train(load_config(path, tiny + overrides))
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["stage"] == (config.stages[-1].name if config.stages else result.student.stage)
    assert all(v == v for r in records for v in r.values() if isinstance(v, float))  # no NaN


@pytest.mark.parametrize("path", COMPARISONS, ids=lambda p: p.name)
def test_comparison_files_validate(path):
    spec, spec_path = load_spec(path)
    assert set(plan(spec, spec_path)) == set(spec.variants)


ROOT = CONFIGS.parent
ALL_RUN_CONFIGS = RUN_CONFIGS + sorted(
    p for p in (ROOT / "paper_repro").rglob("*.yaml")
    if p.name != "base.yaml" and "variants" not in yaml.safe_load(p.read_text())
)


def _roundtrip(config):
    return load_config(data=yaml.safe_load(dump_yaml(config)))


def _plan(config):
    from featkd.terms import terms_from

    stages = config.stages or []
    terms = [terms_from(s.terms) for s in stages] if stages else [terms_from(config.terms)]
    return config.to_dict(), [[(t.name, t.loss, t.weight, t.adapter, t.student, t.teacher) for t in ts] for ts in terms]


@pytest.mark.parametrize("path", ALL_RUN_CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_a_saved_config_reloads_to_the_same_run(path):
    """config.yaml (saved by every run, reloaded by --resume, --smoke and compare) must mean
    what the file it came from meant: same settings, same terms, same adapters."""
    config = load_config(path)
    assert _plan(_roundtrip(config)) == _plan(config)


@pytest.mark.parametrize("path", COMPARISONS, ids=lambda p: p.name)
def test_every_variant_of_a_comparison_reloads_to_the_same_run(path):
    spec, spec_path = load_spec(path)
    for config in plan(spec, spec_path).values():
        assert _plan(_roundtrip(config)) == _plan(config)
