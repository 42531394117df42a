"""Teacher output cache: each training view's teacher outputs are computed once and reused.

The teacher is frozen, so its output on a given input never changes; when the student sees
the same inputs again (no augmentation, or a fixed set of views per sample replayed from a
seed), the teacher forward of every later epoch can be skipped. The cache keeps logits (fp16
by default: 2 bytes per class per view) and, only if asked, named teacher features (pooled
embeddings are small; full feature maps are not, which is why none are kept by default).

A training set whose random augmentation cannot be replayed is refused: cached outputs would
describe views the student is not seeing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from featkd import distributed
from featkd.errors import ConfigError

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

#: teachers' logits and named features, by teacher index
Outputs = tuple[dict[int, torch.Tensor], dict[int, dict[str, torch.Tensor]]]


@dataclass
class TeacherCacheSettings:
    """What to keep: logits in `dtype`, plus the teacher `features` named here."""

    dtype: str = "fp16"
    features: list[str] = field(default_factory=list)


class TeacherCache:
    """Per-view storage of the teachers' logits and chosen features, filled on first sight."""

    def __init__(self, settings: TeacherCacheSettings, num_teachers: int) -> None:
        if settings.dtype not in DTYPES:
            raise ConfigError(f"teacher_cache.dtype: {settings.dtype!r}; use one of {', '.join(DTYPES)}.")
        self.settings = settings
        self.dtype = DTYPES[settings.dtype]
        self.num_teachers = num_teachers
        self.views = 0
        self.samples = 0
        self.filled: torch.Tensor | None = None
        self.logits: list[torch.Tensor | None] = [None] * num_teachers
        self.features: dict[tuple[int, str], torch.Tensor] = {}

    def attach(self, dataset: Any) -> None:
        """Size the cache to a training set, after checking that its views can be replayed."""
        views = getattr(dataset, "replayable_views", None)
        if views is None:
            raise ConfigError(
                "teacher_cache: the training set draws random augmentations that cannot be replayed, so cached "
                "teacher outputs would describe other views than the student sees. Turn augmentation off, use "
                "a fixed number of replayable views per sample (data.args.views=N for digits and mnist1d), or "
                "turn the teacher cache off."
            )
        per_token = getattr(dataset, "per_token_outputs", False)
        if getattr(dataset, "pads_sequences", False) and (self.settings.features or per_token):
            kept = "language-model logits" if per_token else f"teacher_cache.features {self.settings.features}"
            raise ConfigError(
                f"teacher_cache: text batches are padded to their own longest sequence, so per-token teacher outputs "
                f"({kept}) change shape from batch to batch and cannot be kept per sample. Cache a classifier's "
                "logits only (no teacher_cache.features), or turn the cache off."
            )
        # a set that lists every view as an item (a transfer set) says how many samples it has
        self.views, self.samples = int(views), int(getattr(dataset, "samples", len(dataset)))
        self.filled = None
        self.logits = [None] * self.num_teachers
        self.features = {}

    @property
    def ready(self) -> bool:
        return self.samples > 0

    def outputs(self, x: Any, batch: dict[str, Any], compute: Callable[[Any], Outputs]) -> Outputs:
        """The teachers' outputs on a batch: views seen before are read back, the others go
        through `compute` (every teacher, every kept feature) and are stored.

        In a DDP run the processes agree first: if any of them meets a new view, each
        computes its whole batch and stores every process's outputs (a collective call).
        """
        keys = self.keys(batch)
        missing = self.missing(keys)
        if distributed.is_distributed():
            new_anywhere = distributed.all_reduce_sum(missing.any().float().reshape(1))
            if bool(new_anywhere > 0):
                out = compute(x)
                self.store(keys, *out, gather=True)
                return out
        elif bool(missing.any()):
            if not isinstance(x, torch.Tensor) or bool(missing.all()):
                out = compute(x)
                self.store(keys, *out)
                return out
            # only the new views go through the teachers (eval mode: a sample's outputs do not
            # depend on the rest of its batch)
            self.store(keys[missing], *compute(x[missing]))
        logits, feats = self.lookup(keys)
        return dict(enumerate(logits)), feats

    def keys(self, batch: dict[str, Any]) -> torch.Tensor:
        """One key per (sample, view) of the batch."""
        if "index" not in batch:
            raise ConfigError("teacher_cache: batches carry no sample index; wrap the training set with "
                              "`distiller.prepare_data(train_set)` and pass its extras on (the trainer does).")
        index = torch.as_tensor(batch["index"]).long()
        view = torch.as_tensor(batch.get("view", 0)).long()
        return (view * self.samples + index).flatten()

    def missing(self, keys: torch.Tensor) -> torch.Tensor:
        """Which of `keys` have nothing stored yet."""
        if self.filled is None:
            return torch.ones(len(keys), dtype=torch.bool, device=keys.device)
        return ~self.filled[keys.to(self.filled.device)].to(keys.device)

    def lookup(self, keys: torch.Tensor) -> tuple[list[torch.Tensor], dict[int, dict[str, torch.Tensor]]]:
        """Logits per teacher and features per teacher for `keys`, all of which are stored."""
        keys = keys.to(self.filled.device)
        logits = [stored.index_select(0, keys).float() for stored in self.logits]  # type: ignore[union-attr]
        feats: dict[int, dict[str, torch.Tensor]] = {}
        for (teacher, name), stored in self.features.items():
            feats.setdefault(teacher, {})[name] = stored.index_select(0, keys).float()
        return logits, feats

    @torch.no_grad()
    def store(self, keys: torch.Tensor, logits: dict[int, torch.Tensor], feats: dict[int, dict[str, torch.Tensor]],
              gather: bool = False) -> None:
        """Keep these outputs (with `gather`, every rank's: a collective call, on full batches)."""
        keys = keys.to(next(iter(logits.values())).device)
        if gather:
            keys = distributed.gather_with_local_grad(keys)
        n = self.samples * self.views
        for i, value in logits.items():
            value = distributed.gather_with_local_grad(value.detach()) if gather else value.detach()
            if self.logits[i] is None:
                self.logits[i] = torch.zeros((n, *value.shape[1:]), dtype=self.dtype, device=value.device)
            self.logits[i][keys] = value.to(self.dtype)
        for i, named in feats.items():
            for name in self.settings.features:
                if name not in named:
                    continue
                value = named[name].detach()
                value = distributed.gather_with_local_grad(value) if gather else value
                if (i, name) not in self.features:
                    self.features[(i, name)] = torch.zeros((n, *value.shape[1:]), dtype=self.dtype, device=value.device)
                self.features[(i, name)][keys] = value.to(self.dtype)
        if self.filled is None:
            self.filled = torch.zeros(n, dtype=torch.bool, device=keys.device)
        self.filled[keys] = True

    def memory_bytes(self) -> int:
        tensors = [t for t in self.logits if t is not None] + list(self.features.values())
        return sum(t.numel() * t.element_size() for t in tensors)
