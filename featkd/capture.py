"""Capture intermediate features of a model with forward hooks, addressed by module name.

A feature name is a path from `model.named_modules()` with optional suffixes:

    layer3            output of module `layer3` (same as `layer3:out`)
    fc:in             input of module `fc` (the pooled embedding of most classifiers)
    relu@1            output of the second call of a module that runs several times
    relu@-1           ... of its last call
    layer*            glob: `*` stays within one path segment, `**` crosses dots
    attn#1            element 1 of a module's tuple output (`#name`: a field of a dict or
                      ModelOutput); without `#`, a tuple or ModelOutput gives its first tensor
                      (a transformer layer's hidden states)

On a self-attention module (one with query and key projections as children: `query`/`key`,
`q_lin`/`k_lin` or `q_proj`/`k_proj`, and a head count), two more ports give (B, H, T, T)
tensors computed from the captured projections, whatever attention kernel the model runs:

    attn:attention    attention probabilities: softmax(q k^T / sqrt(d)) over the real keys
                      (padding from the model's `attention_mask` input left out; causal when
                      the module is)
    attn:scores       the scaled dot products q k^T / sqrt(d), 0 at padded keys (TinyBERT)

They hold for models that attend with the projections as they are (BERT, RoBERTa,
DistilBERT, ViT and the built-in transformer); a model that rotates queries and keys after
projecting them (rotary embeddings) needs `hf:` with `attn_implementation: eager` and
`#1` on its attention module's output instead. Queries, keys and values themselves are
the projections' outputs, captured by name like any module.

Hooks are registered once, when the capture is created, and removed by `close()`; a hook
never returns a value, so the model computes exactly what it computed before. Names with a
`module.` prefix (from a DDP or DataParallel wrapper) resolve the same as without it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from featkd.errors import CaptureError, FeatkdError, did_you_mean

_SPEC = re.compile(r"^(?P<path>[^:@#]*)(?::(?P<port>[a-z]+))?(?:#(?P<item>\w+))?(?:@(?P<call>-?\d+))?$")
PORTS = ("out", "in", "attention", "scores")
#: (query, key) child names of the self-attention modules whose attention can be computed
ATTENTION_PROJECTIONS = (("query", "key"), ("q_lin", "k_lin"), ("q_proj", "k_proj"))
_HEAD_COUNTS = ("num_attention_heads", "num_heads", "n_heads")
_GLOB_CHARS = set("*?[")


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


@dataclass(frozen=True)
class FeatureSpec:
    """One resolved feature: which module, its input or output, and which call."""

    module: str
    port: str = "out"  # one of PORTS
    call: int | None = None  # None: the module must run exactly once per forward
    item: str | None = None  # element of a tuple output ("1") or field of a dict output

    @property
    def name(self) -> str:
        """Canonical text, used as the key of captured features."""
        text = self.module
        if self.port != "out":
            text += f":{self.port}"
        if self.item is not None:
            text += f"#{self.item}"
        if self.call is not None:
            text += f"@{self.call}"
        return text


def glob_to_regex(pattern: str) -> re.Pattern[str]:
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append(r"[^.]*")
            i += 1
        elif pattern[i] == "?":
            out.append(r"[^.]")
            i += 1
        elif pattern[i] == "[":
            end = pattern.find("]", i)
            if end < 0:
                raise CaptureError(f"feature pattern {pattern!r}: unclosed '['")
            out.append(pattern[i : end + 1])
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("^" + "".join(out) + "$")


def resolve(model: nn.Module, names: str | Sequence[str], label: str = "model") -> list[FeatureSpec]:
    """Turn user feature names (globs allowed) into specs; unknown names raise CaptureError."""
    if isinstance(names, str):
        names = [names]
    inner = unwrap(model)
    modules = [n for n, _ in inner.named_modules() if n]
    known = set(modules)
    specs: list[FeatureSpec] = []
    for text in names:
        match = _SPEC.match(text.strip())
        if not match or not match["path"]:
            raise CaptureError(
                f"{label}: cannot read feature name {text!r}. Write a module path such as "
                "'layer3', 'fc:in' (a module's input), 'relu@0' (its first call) or 'attn#1' (an element of its output)."
            )
        path, port, item = match["path"], match["port"] or "out", match["item"]
        if port not in PORTS:
            raise CaptureError(f"{label}: {text!r}: unknown port {port!r}; a port is one of {', '.join(PORTS)}.")
        call = int(match["call"]) if match["call"] is not None else None
        if call is not None and call < -1:
            raise CaptureError(f"{label}: {text!r}: a call index is 0, 1, ... or -1 (the last call).")
        if path.startswith("module.") and path not in known:
            path = path[len("module.") :]
        if _GLOB_CHARS & set(path):
            regex = glob_to_regex(path)
            matched = [m for m in modules if regex.match(m)]
            if not matched:
                raise CaptureError(
                    f"{label}: the pattern {path!r} matches no module.{did_you_mean(path, modules)} "
                    f"Run `featkd inspect` on the model to list names."
                )
            specs.extend(FeatureSpec(m, port, call, item) for m in matched)
        elif path in known:
            specs.append(FeatureSpec(path, port, call, item))
        else:
            raise CaptureError(
                f"{label} has no module {path!r}.{did_you_mean(path, modules)} "
                f"Run `featkd inspect` on the model to list the names it offers."
            )
    modules_by_name = dict(inner.named_modules())
    for spec in specs:
        if spec.port in ATTENTION_PORTS:
            attention_parts(modules_by_name[spec.module], spec.module, label)
    # keep order, drop repeats
    return list(dict.fromkeys(specs))


ATTENTION_PORTS = ("attention", "scores")


def attention_parts(module: nn.Module, path: str, label: str = "model") -> tuple[str, str, int]:
    """(query child, key child, head count) of a self-attention module, or a CaptureError
    saying what a module needs for its `:attention` and `:scores` ports."""
    children = dict(module.named_children())
    for query, key in ATTENTION_PROJECTIONS:
        if query in children and key in children:
            break
    else:
        names = " / ".join(f"{q}+{k}" for q, k in ATTENTION_PROJECTIONS)
        raise CaptureError(
            f"{label}: {path!r} has no query and key projections ({names}) among its children, so its "
            "attention cannot be computed. Name the self-attention module itself (e.g. "
            "'encoder.layer.0.attention.self'); run `featkd inspect` to list names."
        )
    config = getattr(module, "config", None)
    for owner in (module, config):
        for attribute in _HEAD_COUNTS:
            heads = getattr(owner, attribute, None)
            if isinstance(heads, int) and heads > 0:
                return query, key, heads
    raise CaptureError(f"{label}: {path!r} does not say its number of heads (an attribute "
                       f"{' / '.join(_HEAD_COUNTS)}), so its attention cannot be computed.")


def attention_maps(port: str, query: torch.Tensor, key: torch.Tensor, heads: int, mask: torch.Tensor | None,
                   causal: bool) -> torch.Tensor:
    """(B, H, T, T) attention probabilities ("attention") or scaled dot products ("scores")
    from projections (B, T, H * d), in float32; `mask` (B, T) is True at real tokens."""
    b, t, width = query.shape
    q = query.float().reshape(b, t, heads, width // heads).transpose(1, 2)
    k = key.float().reshape(b, key.shape[1], heads, width // heads).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(width // heads)
    keep = mask[:, None, None, :].bool() if mask is not None else None
    if causal:
        lower = torch.ones(t, k.shape[2], dtype=torch.bool, device=scores.device).tril()
        keep = lower if keep is None else keep & lower
    if keep is None:
        return scores if port == "scores" else scores.softmax(-1)
    if port == "scores":
        return scores.masked_fill(~keep, 0.0)
    return scores.masked_fill(~keep, torch.finfo(scores.dtype).min).softmax(-1)


def select_item(value: object, item: str) -> object:
    """Element `item` of a tuple/list output (an index) or field of a dict/ModelOutput."""
    if isinstance(value, (tuple, list)) and item.lstrip("-").isdigit():
        index = int(item)
        return value[index] if -len(value) <= index < len(value) else None
    if isinstance(value, dict):
        return value.get(item)
    return getattr(value, item, None)


def first_tensor(value: object) -> torch.Tensor | None:
    """The tensor a hook sees: the value itself, or the first tensor in a tuple/list/dict."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        for item in value:
            if isinstance(item, torch.Tensor):
                return item
    if isinstance(value, dict):
        for item in value.values():
            if isinstance(item, torch.Tensor):
                return item
    return None


def logits_of(output: object) -> torch.Tensor:
    """The logits in a model's output: the tensor itself, `.logits`, or the first tensor."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(getattr(output, "logits", None), torch.Tensor):
        return output.logits  # type: ignore[attr-defined]
    if isinstance(output, dict) and isinstance(output.get("logits"), torch.Tensor):
        return output["logits"]
    tensor = first_tensor(output)
    if tensor is None:
        raise FeatkdError(f"cannot find logits in a model output of type {type(output).__name__}")
    return tensor


class FeatureCapture:
    """Forward hooks that fill `features[name]` while `recording()` is active.

    Typical use (the Distiller does this for you):

        capture = FeatureCapture(model, ["layer2", "fc:in"], label="student")
        with capture.recording():
            logits = model(x)
        feats = capture.collect()      # {"layer2": tensor, "fc:in": tensor}
        ...
        capture.clear()                # drop references once the losses are computed
        capture.close()                # remove the hooks

    A captured tensor that the model later modifies in place (an inplace ReLU after a hooked
    BatchNorm) is detected through its version counter; that feature is cloned at capture
    from then on. `collect()` raises `StaleFeatureError` for the step where it was first
    seen, since that value is already overwritten: call `probe()` once with an example
    input to find such features before training (the Distiller does).
    """

    def __init__(self, model: nn.Module, names: str | Sequence[str], label: str = "model") -> None:
        self.label = label
        self.specs = resolve(model, names, label)
        self._inner = unwrap(model)
        self._clone: dict[str, bool] = {s.name: False for s in self.specs}
        self._stored: dict[str, torch.Tensor] = {}
        self._versions: dict[str, int] = {}
        self._calls: dict[tuple[str, str], int] = {}
        self._recording = False
        self._wanted: frozenset[str] | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        by_hook: dict[tuple[str, str], list[FeatureSpec]] = {}
        for spec in self.specs:
            by_hook.setdefault((spec.module, spec.port), []).append(spec)
        modules = dict(self._inner.named_modules())
        #: per attention module: (query child path, key child path, heads, causal)
        self._attention: dict[str, tuple[str, str, int, bool]] = {}
        self._projections: dict[str, torch.Tensor] = {}
        self._mask: torch.Tensor | None = None
        for (path, port), specs in by_hook.items():
            module = modules[path]
            if port == "in":
                self._handles.append(module.register_forward_pre_hook(self._in_hook(path, specs)))
                continue
            if port in ATTENTION_PORTS and path not in self._attention:
                query, key, heads = attention_parts(module, path, label)
                self._attention[path] = (f"{path}.{query}", f"{path}.{key}", heads, bool(getattr(module, "is_causal", False)))
                for child in (query, key):
                    self._handles.append(getattr(module, child).register_forward_hook(self._projection_hook(f"{path}.{child}")))
            self._handles.append(module.register_forward_hook(self._out_hook(path, port, specs)))
        if self._attention:  # the padding mask, from the model's own `attention_mask` input
            self._handles.append(self._inner.register_forward_pre_hook(self._mask_hook, with_kwargs=True))

    # -- hooks -------------------------------------------------------------------------
    def _store(self, key: tuple[str, str], specs: list[FeatureSpec], value: object) -> None:
        count = self._calls.get(key, 0)
        self._calls[key] = count + 1
        for spec in specs:
            if self._wanted is not None and spec.name not in self._wanted:
                continue
            if spec.call is None and count > 0:
                continue  # reported by collect(): the module ran more than once
            if spec.call is not None and spec.call != -1 and spec.call != count:
                continue
            tensor = self._value_of(spec, value)
            if self._clone[spec.name]:
                tensor = tensor.clone()
            self._stored[spec.name] = tensor
            self._versions[spec.name] = tensor._version

    def _value_of(self, spec: FeatureSpec, value: object) -> torch.Tensor:
        """The feature `spec` names in what its module's hook saw."""
        if spec.port in ATTENTION_PORTS:
            query, key, heads, causal = self._attention[spec.module]
            return attention_maps(spec.port, self._projections[query], self._projections[key], heads, self._mask, causal)
        if spec.item is not None:
            value = select_item(value, spec.item)
            if value is None:
                raise CaptureError(f"{self.label}: {spec.name!r}: the output of {spec.module!r} has no element "
                                   f"{spec.item!r}.")
        tensor = first_tensor(value)
        if tensor is None:
            raise CaptureError(
                f"{self.label}: {spec.name!r} is a {type(value).__name__}, not a tensor; "
                "hook a module whose output (or ':in' input) is a tensor, or pick an element with '#'."
            )
        return tensor

    def _projection_hook(self, path: str):
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            if self._recording:
                self._projections[path] = first_tensor(output)

        return hook

    def _mask_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._recording:
            self._mask = token_mask(kwargs) if "attention_mask" in kwargs else token_mask(args[0] if args else None)

    def _out_hook(self, path: str, port: str, specs: list[FeatureSpec]):
        key = (path, port)

        def hook(module: nn.Module, args: tuple, output: object) -> None:
            if self._recording:
                self._store(key, specs, output)

        return hook

    def _in_hook(self, path: str, specs: list[FeatureSpec]):
        key = (path, "in")

        def hook(module: nn.Module, args: tuple) -> None:
            if self._recording:
                self._store(key, specs, args)

        return hook

    # -- public ------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return [s.name for s in self.specs]

    @contextmanager
    def recording(self, names: frozenset[str] | None = None) -> Iterator[None]:
        """Store features during forwards inside this block; start from an empty store.

        `names` limits what is kept to the features needed now (default: all of them).
        """
        self.clear()
        self._recording = True
        self._wanted = names
        try:
            yield
        finally:
            self._recording = False

    def collect(self) -> dict[str, torch.Tensor]:
        """The features of the last recorded forward, checked for repeats and in-place edits."""
        stale = []
        for spec in self.specs:
            if self._wanted is not None and spec.name not in self._wanted:
                continue
            calls = self._calls.get((spec.module, spec.port), 0)
            if calls == 0:
                raise CaptureError(
                    f"{self.label}: module {spec.module!r} did not run in this forward, so "
                    f"{spec.name!r} has no value. Hook a module on the forward path."
                )
            if spec.call is None and calls > 1:
                raise CaptureError(
                    f"{self.label}: module {spec.module!r} ran {calls} times in one forward (a "
                    f"module reused inside the model). Say which call to keep: "
                    f"'{spec.module}@0' ... '{spec.module}@{calls - 1}' (or @-1 for the last), "
                    "or hook a module that runs once."
                )
            if spec.call is not None and spec.call >= calls:
                raise CaptureError(
                    f"{self.label}: {spec.name!r} asks for call {spec.call} but module "
                    f"{spec.module!r} ran {calls} time(s) in this forward."
                )
            if self._stored[spec.name]._version != self._versions[spec.name]:
                self._clone[spec.name] = True
                stale.append(spec.name)
        if stale:
            raise StaleFeatureError(self.label, stale)
        return dict(self._stored)

    def clear(self) -> None:
        """Drop stored tensors and call counts (call after the losses are computed)."""
        self._stored.clear()
        self._projections.clear()
        self._mask = None
        self._versions.clear()
        self._calls.clear()

    @property
    def cloned(self) -> list[str]:
        """Features captured as clones because the model modifies them in place."""
        return [n for n, c in self._clone.items() if c]

    def run(self, model: nn.Module, x: object, names: frozenset[str] | None = None) -> tuple[object, dict[str, torch.Tensor]]:
        """One forward of `model` on `x`, keeping the features in `names` (default: all);
        a feature found overwritten in place is cloned from now on and the forward repeated."""
        for attempt in range(2):
            with self.recording(names):
                output = call_model(model, x)
            try:
                return output, self.collect()
            except StaleFeatureError:
                if attempt:  # cloning did not help: should not happen
                    raise
        raise AssertionError("unreachable")

    @torch.no_grad()
    def probe(self, model: nn.Module, example_input: object) -> dict[str, torch.Size]:
        """Run one side-effect-free forward (eval mode, no grad) and return feature shapes.

        Also finds features the model overwrites in place, so that real steps clone them.
        Batch-norm statistics are not updated: the model runs in eval mode, and its
        train/eval flags are restored afterwards.
        """
        with eval_mode(model):
            for _ in range(2):  # a second pass if the first found in-place writes
                with self.recording():
                    call_model(model, example_input)
                try:
                    feats = self.collect()
                except StaleFeatureError:
                    continue
                shapes = {k: v.shape for k, v in feats.items()}
                self.clear()
                return shapes
        raise CaptureError(f"{self.label}: features keep changing in place even when cloned")

    def close(self) -> None:
        """Remove every hook; the model is left exactly as it was before."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()

    def __enter__(self) -> FeatureCapture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class StaleFeatureError(CaptureError):
    """A captured tensor was modified in place after capture; it is cloned from now on."""

    def __init__(self, label: str, names: list[str]) -> None:
        self.names = names
        super().__init__(
            f"{label}: {', '.join(names)} changed in place after capture (an inplace op such "
            "as ReLU(inplace=True) follows it); featkd clones it from now on. Repeat the forward."
        )


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """The model in eval mode inside the block; every module's train/eval flag restored after."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, flag in flags:
            module.training = flag


def token_mask(inputs: object) -> torch.Tensor | None:
    """(B, T) bool, True at real tokens, from a text batch's `attention_mask` (None for
    inputs without one: images, or text without padding)."""
    mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
    return mask.bool() if isinstance(mask, torch.Tensor) else None


def call_model(model: nn.Module, example_input: object) -> object:
    if isinstance(example_input, (tuple, list)):
        return model(*example_input)
    if isinstance(example_input, dict):
        return model(**example_input)
    return model(example_input)


@dataclass
class ModuleInfo:
    """One row of `featkd inspect`: a module, its type, shapes and parameter count."""

    name: str
    type: str
    input_shape: tuple[int, ...] | None
    output_shape: tuple[int, ...] | None
    calls: int
    params: int


@torch.no_grad()
def list_modules(model: nn.Module, example_input: object) -> list[ModuleInfo]:
    """Every named module with the shapes it sees in one eval forward of `example_input`."""
    inner = unwrap(model)
    rows: dict[str, ModuleInfo] = {}
    handles = []

    def make_hook(name: str, module: nn.Module):
        def hook(mod: nn.Module, args: tuple, output: object) -> None:
            row = rows[name]
            row.calls += 1
            if row.calls == 1:
                x, y = first_tensor(args), first_tensor(output)
                row.input_shape = tuple(x.shape) if x is not None else None
                row.output_shape = tuple(y.shape) if y is not None else None

        return hook

    for name, module in inner.named_modules():
        if not name:
            continue
        rows[name] = ModuleInfo(
            name, type(module).__name__, None, None, 0,
            sum(p.numel() for p in module.parameters(recurse=True)),
        )
        handles.append(module.register_forward_hook(make_hook(name, module)))
    try:
        with eval_mode(model):
            call_model(model, example_input)
    finally:
        for handle in handles:
            handle.remove()
    return list(rows.values())


def feature_names(model: nn.Module) -> Iterable[str]:
    """All module paths a feature name can use."""
    return (n for n, _ in unwrap(model).named_modules() if n)
