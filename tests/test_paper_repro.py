"""The paper_repro configs cannot rot: the full-scale protocols run end to end in smoke mode
(tiny synthetic data of the same shapes, one epoch) and every claim's files validate."""

from pathlib import Path

import pytest
import yaml

from featkd.compare import load_spec, plan, run_comparison
from featkd.config import load_config, smoke_config
from featkd.trainer import train

PAPER_REPRO = Path(__file__).resolve().parents[1] / "paper_repro"
FULL_SCALE = sorted(p for p in (PAPER_REPRO / "full_scale").rglob("*.yaml") if p.name != "base.yaml")
CLAIM_FILES = sorted(p for p in PAPER_REPRO.glob("[0-9]*/*.yaml"))


def is_comparison(path: Path) -> bool:
    return "variants" in (yaml.safe_load(path.read_text()) or {})


# every single-run protocol, and one pair's every method, train end to end; every other pair's
# methods are set up on their own architectures (below), which is where they differ
TRAINED = [p for p in FULL_SCALE if not is_comparison(p) or p.name == "resnet56-resnet20.methods.yaml"]


@pytest.mark.parametrize("path", TRAINED, ids=lambda p: str(p.relative_to(PAPER_REPRO / "full_scale")))
def test_full_scale_config_runs_in_smoke_mode(path, tmp_path):
    if is_comparison(path):
        result = run_comparison(path, [f"output_dir={tmp_path}"], smoke=True, progress=False)
        spec, _ = load_spec(path)
        assert [s.variant for s in result.summaries] == list(spec.variants)
        assert all(r.seed == spec.seeds[0] for r in result.rows)
    else:
        config = smoke_config(load_config(path, [f"output_dir={tmp_path}"]))
        assert config.data.name == "synthetic"
        result = train(config)
        assert (result.run_dir / "checkpoints" / "last.pt").is_file()


@pytest.mark.parametrize("path", [p for p in FULL_SCALE if is_comparison(p)],
                         ids=lambda p: str(p.relative_to(PAPER_REPRO / "full_scale")))
def test_every_full_scale_method_is_set_up_on_its_architectures(path):
    """Each variant's terms, their features, adapters, losses, stages and data wrapping, built on
    the pair's own teacher and student (with a batch of smoke data), without training."""
    import torch

    from featkd import Distiller
    from featkd.data import build_data
    from featkd.terms import terms_from
    from featkd.trainer import build_models
    from featkd.stages import plan_stages

    spec, spec_path = load_spec(path)
    configs = {name: smoke_config(c) for name, c in plan(spec, spec_path).items()}
    first = configs[next(name for name, c in configs.items() if c.teacher)]
    bundle = build_data(first.data.name, first.data.args)
    models = build_models(plan_stages(first), bundle, 0)
    x = torch.stack([bundle.train[i][0] for i in range(4)])
    for name, config in configs.items():
        final = plan_stages(config).final
        teachers = [models[k] for k in final.teachers] or None
        with Distiller(teachers, models["student"], terms_from(final.terms), example_input=x) as distiller:
            distiller.prepare_data(bundle.train)
            objectives = [distiller.pretraining(term) for term, _ in distiller.pretrain_stages()]
            assert all(o.trainable_parameters() for o in objectives), name


def test_there_are_full_scale_protocols_for_every_published_pair():
    names = {p.name for p in FULL_SCALE}
    for pair in ("wrn40_2-wrn16_2", "resnet56-resnet20", "resnet32x4-resnet8x4", "vgg13-vgg8", "resnet34-resnet18"):
        assert {f"{pair}.yaml", f"{pair}.methods.yaml"} <= names


@pytest.mark.parametrize("path", CLAIM_FILES, ids=lambda p: str(p.relative_to(PAPER_REPRO)))
def test_claim_files_validate(path):
    if is_comparison(path):
        spec, spec_path = load_spec(path)
        assert set(plan(spec, spec_path)) == set(spec.variants)
    else:
        load_config(path)


def test_every_claim_runs_end_to_end_in_smoke_mode(tmp_path):
    """Each claim's run.py (its comparison, its own analysis, its verdict) runs on tiny data,
    and a smoke run leaves the recorded results alone."""
    import json
    import subprocess
    import sys

    claims = sorted(p.parent.name for p in PAPER_REPRO.glob("[0-9]*/run.py"))
    recorded = {p: p.read_text() for p in PAPER_REPRO.rglob("*.md")}
    done = subprocess.run([sys.executable, str(PAPER_REPRO / "run.py"), "--smoke", "--output", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for claim in claims:
        summary = json.loads((tmp_path / claim / "claim.json").read_text())
        assert summary["verdict"] and summary["claim"] and summary["paper"]
    assert {p: p.read_text() for p in PAPER_REPRO.rglob("*.md")} == recorded
