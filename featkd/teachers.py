"""The teacher side of a distillation step.

Teachers are frozen: put in eval mode (and pinned there, so their batch-norm statistics never
change), excluded from gradients, and run under `torch.no_grad()`. Their features are
captured by name like the student's, and with a teacher output cache (`featkd.teacher_cache`)
a training view the teachers have seen is read back instead of recomputed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from featkd.capture import FeatureCapture, call_model, logits_of, resolve
from featkd.data import with_index
from featkd.errors import ConfigError
from featkd.teacher_cache import TeacherCache, TeacherCacheSettings


@dataclass
class TeacherOutputs:
    """What the teachers gave for one batch: logits and captured features, by teacher index."""

    logits: dict[int, torch.Tensor]
    features: dict[int, dict[str, torch.Tensor]]
    teachers: int

    def ensemble_logits(self) -> torch.Tensor | tuple[torch.Tensor, ...] | None:
        """One teacher's logits, the tuple of an ensemble's, or None if not all teachers ran
        (only feature terms needed them)."""
        if not self.logits or len(self.logits) < self.teachers:
            return None
        return self.logits[0] if self.teachers == 1 else tuple(self.logits[i] for i in range(self.teachers))


class TeacherPass:
    """Runs the frozen teachers and captures their features.

    Args:
        teachers: the teacher models (put in eval mode and frozen here).
        features: per teacher, the feature names the terms read of it.
        cache: keep the teachers' outputs per training view (see `featkd.teacher_cache`).
    """

    def __init__(self, teachers: Sequence[nn.Module], features: Sequence[Sequence[str]],
                 cache: TeacherCacheSettings | None = None) -> None:
        self.teachers = list(teachers)
        for teacher in self.teachers:
            teacher.eval()
            teacher.requires_grad_(False)
        self.cache = self._make_cache(cache, features)
        names = [list(f) for f in features]
        if self.cache is not None:  # features the cache keeps are captured whenever the teachers run
            for i, teacher in enumerate(self.teachers):
                names[i] += [s.name for s in resolve(teacher, self.cache.settings.features, "teacher")]
        many = len(self.teachers) > 1
        self.captures = [
            FeatureCapture(t, list(dict.fromkeys(n)), f"teacher {i}" if many else "teacher") if n else None
            for i, (t, n) in enumerate(zip(self.teachers, names))
        ]

    def _make_cache(self, settings: TeacherCacheSettings | None, features: Sequence[Sequence[str]]
                    ) -> TeacherCache | None:
        if settings is None:
            return None
        if not self.teachers:
            raise ConfigError("teacher_cache: there is no teacher whose outputs could be cached.")
        missing = sorted({name for names in features for name in names if name not in settings.features})
        if missing:
            raise ConfigError(
                f"teacher_cache: a term reads teacher features {missing} that the cache does not keep; list "
                "them in teacher_cache.features (each costs one stored value per element, per training view) "
                "or turn the cache off."
            )
        return TeacherCache(settings, len(self.teachers))

    def probe(self, example_input: Any) -> list[dict[str, torch.Size]]:
        """Per teacher, the shapes of its captured features on one batch (no side effects)."""
        return [c.probe(t, example_input) if c else {} for t, c in zip(self.teachers, self.captures)]

    def __call__(self, x: Any, batch: dict[str, Any], wanted: dict[int, frozenset[str]]) -> TeacherOutputs:
        """Outputs of the teachers in `wanted` (teacher index -> feature names to keep)."""
        if self.cache is not None and self.cache.ready and wanted:
            kept = frozenset(self.cache.settings.features)
            everything = {i: wanted.get(i, frozenset()) | kept for i in range(len(self.teachers))}
            logits, features = self.cache.outputs(x, batch, lambda inputs: self._compute(inputs, everything))
            return TeacherOutputs(logits, features, len(self.teachers))
        return self.run(x, wanted)

    def run(self, x: Any, wanted: dict[int, frozenset[str]]) -> TeacherOutputs:
        """Like calling the pass, but always running the teachers (the cache is not read)."""
        return TeacherOutputs(*self._compute(x, wanted), len(self.teachers))

    def _compute(self, x: Any, wanted: dict[int, frozenset[str]]
                 ) -> tuple[dict[int, torch.Tensor], dict[int, dict[str, torch.Tensor]]]:
        logits, features = {}, {}
        with torch.no_grad():
            for i, names in sorted(wanted.items()):
                teacher, capture = self.teachers[i], self.captures[i]
                if teacher.training:  # someone called .train() on it: pin it back
                    teacher.eval()
                if capture is None or not names:
                    output, features[i] = call_model(teacher, x), {}
                else:
                    output, features[i] = capture.run(teacher, x, names)
                logits[i] = logits_of(output)
        return logits, features

    def prepare_data(self, dataset: Any) -> Any:
        """The training set with sample indices, and the cache sized to it (with a cache)."""
        if self.cache is None:
            return dataset
        dataset = with_index(dataset)
        self.cache.attach(dataset)
        return dataset

    def eval(self) -> None:
        for teacher in self.teachers:
            teacher.eval()

    def clear(self) -> None:
        """Drop captured tensors (after the losses of a step are computed)."""
        for capture in self.captures:
            if capture is not None:
                capture.clear()

    def close(self) -> None:
        """Remove every hook from the teachers."""
        for capture in self.captures:
            if capture is not None:
                capture.close()

    @property
    def cloned(self) -> dict[str, list[str]]:
        return {f"teacher{i}": c.cloned for i, c in enumerate(self.captures) if c is not None}
