"""Teacher output cache, replayable views, torch.compile with capture hooks, channels_last."""

import json

import pytest
import torch

from featkd import Distiller, Term
from featkd.checkpoint import load_checkpoint
from featkd.config import load_config
from featkd.data import build_data
from featkd.distributed import ShardedSampler
from featkd.errors import ConfigError
from featkd.models import build_model
from featkd.teacher_cache import TeacherCacheSettings
from featkd.trainer import train

QUICK = ["logger=none", "progress=false", "teacher.train.epochs=1", "train.epochs=3", "teacher.model=cnn_small"]


def quick(tmp_path, *extra):
    return load_config("configs/quickstart.yaml", [f"output_dir={tmp_path}", *QUICK, *extra])


def count_calls(model):
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    return calls


def test_views_are_replayed_exactly_and_visited_one_per_epoch():
    data = build_data("digits", {"views": 3})
    n = len(data.train)
    a, b = data.train[5 + 2 * n], data.train[5 + 2 * n]
    assert torch.equal(a[0], b[0]) and a[2] == {"index": 5, "view": 2}
    assert not torch.equal(data.train[5][0], data.train[5 + n][0]) or not torch.equal(data.train[5][0], a[0])
    assert data.train.replayable_views == 3
    sampler = ShardedSampler(n, seed=0, views=3, num_replicas=1, rank_=0)
    for epoch, view in [(1, 0), (2, 1), (3, 2), (4, 0)]:
        sampler.set_epoch(epoch)
        assert {i // n for i in sampler} == {view}
    assert build_data("digits", {"augment": True}).train.replayable_views is None
    assert build_data("digits", {"augment": False}).train.replayable_views == 1


def test_the_teacher_runs_only_until_every_view_is_cached(tmp_path):
    bundle = build_data("digits", {"views": 2})
    teacher, student = build_model("cnn_small", 10, (1, 8, 8)), build_model("cnn_tiny", 10, (1, 8, 8))
    distiller = Distiller(teacher, student, [Term("ce", 0.1), Term("kd", 0.9)], example_input=bundle.train.inputs[:4],
                          teacher_cache=TeacherCacheSettings("fp32"))
    from featkd.data import make_loaders

    config = load_config("configs/quickstart.yaml")
    loader, _ = make_loaders(distiller.prepare_data(bundle.train), bundle.test, config.data, seed=0)
    samples = []
    teacher.register_forward_hook(lambda module, args, out: samples.append(len(args[0])))
    seen, per_epoch = set(), []
    for epoch in range(1, 6):
        loader.sampler.set_epoch(epoch)
        before = sum(samples)
        for x, y, extras in loader:
            distiller(x, y, **extras)
            seen.update((extras["view"] * len(bundle.train) + extras["index"]).tolist())
        per_epoch.append(sum(samples) - before)
    assert sum(samples) == len(seen)  # every (sample, view) went through the teacher exactly once
    assert per_epoch[0] == per_epoch[1] == 22 * 64  # two views to fill...
    assert max(per_epoch[2:]) <= 1437 - 22 * 64  # ...then only the few samples an epoch had left out


def test_cached_fp32_logits_train_exactly_like_the_live_teacher(tmp_path):
    live = train(quick(tmp_path, "data.args.augment=false"))
    cached = train(quick(tmp_path, "data.args.augment=false", "teacher_cache.enabled=true", "teacher_cache.dtype=fp32"))
    a = load_checkpoint(live.run_dir / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(cached.run_dir / "checkpoints" / "last.pt")["model"]
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst < 1e-4  # the teacher's outputs differ only in float rounding (other batch compositions)
    fp16 = train(quick(tmp_path, "data.args.augment=false", "teacher_cache=true"))
    assert abs(fp16.student.last_acc - live.student.last_acc) < 5


def test_random_augmentation_that_cannot_be_replayed_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="cannot be replayed.*data.args.views"):
        train(quick(tmp_path, "data.args.augment=true", "teacher_cache=true"))


def test_feature_terms_need_their_teacher_features_in_the_cache(tmp_path):
    rkd = ["loss.rkd.student=fc:in", "loss.rkd.teacher=fc:in", "data.args.augment=false", "teacher_cache=true"]
    with pytest.raises(ConfigError, match=r"reads teacher features \['fc:in'\].*teacher_cache.features"):
        train(quick(tmp_path, *rkd))
    result = train(quick(tmp_path, *rkd, "teacher_cache.features=[fc:in]"))
    records = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["train/loss/rkd"] > 0


def test_compile_keeps_the_capture_hooks(tmp_path):
    torch.manual_seed(0)
    teacher, student = build_model("cnn_small", 10, (1, 8, 8)), build_model("cnn_tiny", 10, (1, 8, 8))
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    terms = [Term("ce"), Term("kd"), Term("fitnet", student="layer1.0.bn", teacher="layer1.0.bn"),
             Term("rkd", student="fc:in", teacher="fc:in")]
    distiller = Distiller(teacher, student, terms, example_input=x)
    eager = {k: v.item() for k, v in distiller(x, y).losses.items()}
    student.compile(backend="aot_eager")  # hooks were registered first, by the Distiller
    teacher.compile(backend="aot_eager")
    out = distiller(x, y)
    for key, value in eager.items():
        assert out.losses[key].item() == pytest.approx(value, rel=1e-5)
    out.loss.backward()
    assert student.layer1[0].conv.weight.grad.abs().sum() > 0
    assert distiller.cloned_features["student"] == ["layer1.0.bn"]  # in-place detection still works


def test_compile_and_channels_last_options_train(tmp_path):
    result = train(quick(tmp_path, "compile=aot_eager", "channels_last=true", "train.epochs=1",
                         "loss.at.student=layer*", "loss.at.teacher=layer*"))
    assert result.student.last_acc > 0
