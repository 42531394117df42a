"""How sure a difference in test accuracy between two arms of a comparison is.

The mean test top-1 of an arm varies with the training seeds and with which test samples
happen to be in the test set. `bootstrap_difference` gives a percentile-bootstrap interval for
the difference of two arms' mean top-1 that covers both: each draw resamples the seeds (the
same seed positions for both arms when they ran the same seeds, a paired design) and the
test samples (the same samples for both arms, who were tested on the same set), and
recomputes the difference. `verdict` turns an interval into held / not held / inconclusive.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

HELD, NOT_HELD, INCONCLUSIVE = "held", "not held", "inconclusive"


@dataclass(frozen=True)
class Interval:
    """A difference of mean top-1 (points) with its bootstrap interval."""

    difference: float
    low: float
    high: float
    level: float = 0.95

    def __str__(self) -> str:
        return f"{self.difference:+.2f} [{self.low:+.2f}, {self.high:+.2f}]"


def bootstrap_difference(a: np.ndarray, b: np.ndarray, paired: bool, draws: int = 10_000, level: float = 0.95,
                         seed: int = 0) -> Interval:
    """Interval for mean top-1 of `a` minus that of `b`, in points.

    `a` and `b` are (seeds, test samples) arrays, 1 where a run classified a test sample
    correctly; both arms were tested on the same samples. With `paired`, row i of both arms
    ran seed i, and the seeds are resampled together.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"arms must be (seeds, samples) arrays over the same samples, got {a.shape} and {b.shape}")
    if paired and len(a) != len(b):
        raise ValueError(f"a paired comparison needs the same seeds in both arms, got {len(a)} and {len(b)}")
    rng = np.random.default_rng(seed)
    samples = a.shape[1]
    differences = np.empty(draws)
    for start in range(0, draws, 1000):
        k = min(1000, draws - start)
        weights = rng.multinomial(samples, np.full(samples, 1.0 / samples), size=k).T / samples  # (samples, k)
        per_seed_a, per_seed_b = a @ weights, b @ weights  # (seeds, k): each seed's top-1 on each draw's samples
        seeds_a = rng.integers(0, len(a), (len(a), k))
        seeds_b = seeds_a if paired else rng.integers(0, len(b), (len(b), k))
        columns = np.arange(k)
        differences[start:start + k] = per_seed_a[seeds_a, columns].mean(0) - per_seed_b[seeds_b, columns].mean(0)
    tail = (1 - level) / 2
    low, high = np.quantile(differences, [tail, 1 - tail])
    return Interval(100 * float(a.mean() - b.mean()), 100 * float(low), 100 * float(high), level)


def verdict(interval: Interval, claim: Literal["better", "no better"] = "better", margin: float = 0.0) -> str:
    """Whether an interval supports a claim about arm a against arm b.

    - "better" (a beats b): held when the interval excludes zero from above; not held when it
      excludes any gain larger than `margin` (it lies at or below it: no gain, or the opposite);
      inconclusive otherwise.
    - "no better" (a does not beat b by `margin` points or more): held when the interval lies
      below `margin`; not held when it excludes zero from above (a gain is shown);
      inconclusive otherwise.
    """
    if claim == "better":
        if interval.low > 0:
            return HELD
        return NOT_HELD if interval.high <= margin else INCONCLUSIVE
    if margin <= 0:
        raise ValueError("a 'no better' claim needs the margin of a gain it rules out (> 0 points)")
    if interval.low > 0:
        return NOT_HELD
    return HELD if interval.high < margin else INCONCLUSIVE
