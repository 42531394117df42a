"""Errors featkd raises for bad input. Each says what was wrong and what to do next.

The command line prints a `FeatkdError` as one message and exits with code 2; anything
else is a bug in featkd and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class FeatkdError(Exception):
    """Base class: a problem with what the user asked for, not a bug."""


class ConfigError(FeatkdError, ValueError):
    """A config key, type or value is wrong."""


class RegistryError(FeatkdError, KeyError):
    """A name is not (or already) registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class CaptureError(FeatkdError, ValueError):
    """A feature name cannot be captured as asked."""


class AdapterError(FeatkdError, ValueError):
    """No adapter maps the student feature to the teacher feature."""


class CheckpointError(FeatkdError, ValueError):
    """A checkpoint file is missing, truncated, foreign, or does not fit the model."""


class DataError(FeatkdError, ValueError):
    """A dataset cannot be built (missing folder, bad split, ...)."""


class ModelError(FeatkdError, ValueError):
    """A model cannot be built (unknown name, download requested, bad weights, ...)."""


def closest(word: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """The names in `choices` that look most like `word`, best first."""
    choices = list(choices)
    found = difflib.get_close_matches(word, choices, n=n, cutoff=0.5)
    if not found:  # a prefix or substring is still a useful hint ("layer" -> "layer1")
        found = [c for c in choices if word and (c.startswith(word) or word in c)][:n]
    return found


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' Did you mean 'x' or 'y'?' or an empty string."""
    found = closest(word, choices)
    if not found:
        return ""
    return " Did you mean " + " or ".join(repr(f) for f in found) + "?"


class ExportError(FeatkdError, ValueError):
    """A model cannot be exported or quantized (unfinished run, unsupported op, existing folder, ...)."""


class ReportError(FeatkdError, ValueError):
    """A report cannot be made from a folder (not a run, comparison or sweep folder)."""
