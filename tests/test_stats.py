"""Bootstrap intervals for differences of accuracy, and the verdicts they give."""

import numpy as np
import pytest

from featkd.stats import HELD, INCONCLUSIVE, NOT_HELD, Interval, bootstrap_difference, verdict


def arms(seed: int = 0, seeds: int = 5, samples: int = 300, gain: float = 0.03, shared: float = 0.05):
    """Two arms' correct/incorrect test samples; each seed moves both arms' accuracy alike."""
    rng = np.random.default_rng(seed)
    hardness = rng.uniform(0, 1, samples)  # per test sample
    seed_effect = rng.normal(0, shared, (seeds, 1))
    a = rng.uniform(0, 1, (seeds, samples)) < np.clip(0.8 - 0.3 * hardness + seed_effect + gain, 0, 1)
    b = rng.uniform(0, 1, (seeds, samples)) < np.clip(0.8 - 0.3 * hardness + seed_effect, 0, 1)
    return a.astype(float), b.astype(float)


def naive_bootstrap(a, b, paired, draws, rng):
    """The same interval written out draw by draw."""
    out = []
    for _ in range(draws):
        images = rng.choice(a.shape[1], a.shape[1], replace=True)
        sa = rng.choice(len(a), len(a), replace=True)
        sb = sa if paired else rng.choice(len(b), len(b), replace=True)
        out.append(100 * (a[sa][:, images].mean() - b[sb][:, images].mean()))
    return np.quantile(out, [0.025, 0.975])


@pytest.mark.parametrize("paired", [True, False])
def test_the_interval_matches_a_draw_by_draw_bootstrap(paired):
    a, b = arms()
    interval = bootstrap_difference(a, b, paired, draws=20_000)
    low, high = naive_bootstrap(a, b, paired, 20_000, np.random.default_rng(1))
    assert interval.difference == pytest.approx(100 * (a.mean() - b.mean()))
    assert interval.low == pytest.approx(low, abs=0.3) and interval.high == pytest.approx(high, abs=0.3)


def test_identical_arms_give_a_zero_interval_and_pairing_removes_shared_seed_noise():
    a, b = arms(shared=0.08)
    assert str(bootstrap_difference(a, a, True)) == "+0.00 [+0.00, +0.00]"
    paired, unpaired = bootstrap_difference(a, b, True), bootstrap_difference(a, b, False)
    assert paired.high - paired.low < unpaired.high - unpaired.low


def test_a_real_gain_is_found_and_noise_is_not():
    a, b = arms(gain=0.08, samples=1000)
    assert verdict(bootstrap_difference(a, b, True)) == HELD
    a, b = arms(gain=0.0, samples=1000, seed=3)
    assert verdict(bootstrap_difference(a, b, True)) == INCONCLUSIVE
    assert verdict(bootstrap_difference(b, a, True, seed=1)) == INCONCLUSIVE


def test_verdicts_for_a_gain_and_for_no_gain():
    assert verdict(Interval(1.0, 0.2, 1.8)) == HELD
    assert verdict(Interval(-1.0, -1.8, -0.2)) == NOT_HELD
    assert verdict(Interval(0.1, -0.5, 0.7)) == INCONCLUSIVE
    assert verdict(Interval(0.1, -0.5, 0.4), margin=0.5) == NOT_HELD  # no gain as large as claimed
    assert verdict(Interval(0.1, -0.3, 0.4), "no better", margin=0.5) == HELD
    assert verdict(Interval(1.0, 0.2, 1.8), "no better", margin=0.5) == NOT_HELD
    assert verdict(Interval(0.3, -0.3, 0.9), "no better", margin=0.5) == INCONCLUSIVE
    with pytest.raises(ValueError, match="margin"):
        verdict(Interval(0.0, -1.0, 1.0), "no better")


def test_arms_must_share_their_test_samples_and_paired_arms_their_seeds():
    a, b = arms()
    with pytest.raises(ValueError, match="same samples"):
        bootstrap_difference(a, b[:, :10], False)
    with pytest.raises(ValueError, match="same seeds"):
        bootstrap_difference(a, b[:3], True)
