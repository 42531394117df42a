"""DIST+'s feature-level relations against a written-out loop over positions and samples,
with their invariances, minimum, gradients and errors."""

import numpy as np
import pytest
import torch

from featkd.errors import ConfigError
from featkd.losses.dist_plus import DISTFeatureRelation


def pearson(a, b):
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    a, b = a - a.mean(), b - b.mean()
    return (a * b).sum() / (np.sqrt((a * a).sum()) * np.sqrt((b * b).sum()))


def reference(s, t):
    """(channel, spatial) relations of (B, C, H, W) maps, loop by loop."""
    batch, _, height, width = s.shape
    channel = [pearson(s[b, :, h, w], t[b, :, h, w]) for b in range(batch) for h in range(height) for w in range(width)]
    spatial = [pearson([s[b, :, h, w].sum() for b in range(batch)], [t[b, :, h, w].sum() for b in range(batch)])
               for h in range(height) for w in range(width)]
    return 1 - np.mean(channel), 1 - np.mean(spatial)


def draw(seed, shape=(4, 5, 3, 2)):
    rng = np.random.default_rng(seed)
    t = rng.normal(size=shape)
    s = 0.5 * t + rng.normal(size=shape)  # related, not equal
    return s, t


def t64(a) -> torch.Tensor:
    return torch.tensor(np.asarray(a), dtype=torch.float64)


@pytest.mark.parametrize("channel_weight, spatial_weight", [(1.0, 1.0), (0.5, 3.0)])
def test_dist_feature_matches_the_channel_and_spatial_pearson_relations(channel_weight, spatial_weight):
    s, t = draw(0)
    parts = DISTFeatureRelation(channel_weight, spatial_weight)(t64(s), t64(t))
    channel, spatial = reference(s, t)
    assert parts["channel"].item() == pytest.approx(channel_weight * channel, rel=1e-7)
    assert parts["spatial"].item() == pytest.approx(spatial_weight * spatial, rel=1e-7)


def test_dist_feature_on_token_maps():
    s, t = draw(1, shape=(3, 4, 5))  # (B, C, L): one spatial dimension
    parts = DISTFeatureRelation()(t64(s), t64(t))
    channel, spatial = reference(s[..., None], t[..., None])
    assert parts["channel"].item() == pytest.approx(channel, rel=1e-7)
    assert parts["spatial"].item() == pytest.approx(spatial, rel=1e-7)


def test_dist_feature_invariances_and_minimum():
    s, t = draw(2)
    loss = DISTFeatureRelation()
    base = loss(t64(s), t64(t))
    rng = np.random.default_rng(3)
    # per sample and position, a positive scale and a shift across channels: the channel relation stays
    a, b = rng.uniform(0.2, 5, size=(4, 1, 3, 2)), rng.normal(size=(4, 1, 3, 2)) * 5
    assert loss(t64(a * s + b), t64(t))["channel"].item() == pytest.approx(base["channel"].item(), rel=1e-9)
    # per position, a positive scale and a shift of every channel-summed value: the spatial relation stays
    c, d = rng.uniform(0.2, 5, size=(1, 1, 3, 2)), rng.normal(size=(1, 1, 3, 2))
    assert loss(t64(c * s + d), t64(t))["spatial"].item() == pytest.approx(base["spatial"].item(), rel=1e-9)
    for key, value in loss(t64(7 * s), t64(0.1 * t)).items():  # both: any positive scale of either map
        assert value.item() == pytest.approx(base[key].item(), rel=1e-9)
    assert sum(loss(t64(t), t64(t)).values()).item() == pytest.approx(0.0, abs=1e-6)  # up to the Pearson eps
    # an anti-correlated student is the worst case (2 per part), a correlated one better than an unrelated one
    worst = loss(t64(-t), t64(t))
    assert worst["channel"].item() == pytest.approx(2.0, abs=1e-6)
    assert worst["spatial"].item() == pytest.approx(2.0, abs=1e-6)
    assert all(0 < v.item() < 1 for v in base.values())


def test_dist_feature_reaches_the_student_never_the_teacher():
    s = torch.randn(4, 5, 3, 3, requires_grad=True)
    t = torch.randn(4, 5, 3, 3, requires_grad=True)
    parts = DISTFeatureRelation()(s, t)
    parts["channel"].backward(retain_graph=True)
    assert s.grad.abs().sum() > 0 and t.grad is None
    s.grad = None
    parts["spatial"].backward()
    assert s.grad.abs().sum() > 0 and t.grad is None


def test_dist_feature_refuses_bad_settings_and_shapes():
    with pytest.raises(ConfigError, match="channel_weight"):
        DISTFeatureRelation(channel_weight=-1.0)
    with pytest.raises(ConfigError, match="spatial_weight"):
        DISTFeatureRelation(spatial_weight=float("nan"))
    with pytest.raises(ConfigError, match="eps must be > 0"):
        DISTFeatureRelation(eps=0.0)
    with pytest.raises(ConfigError, match="pooled embedding"):
        DISTFeatureRelation()(torch.randn(4, 8), torch.randn(4, 8))
    with pytest.raises(ConfigError, match="adapter: auto"):
        DISTFeatureRelation()(torch.randn(4, 8, 2, 2), torch.randn(4, 16, 2, 2))
