"""Model registry: small built-in networks, `timm:<name>`, `torchvision:<name>`.

Every model is built from a name, the number of classes and the per-sample input shape:

    build_model("cnn_small", num_classes=10, input_shape=(1, 8, 8))
    build_model("timm:resnet18", num_classes=100, input_shape=(3, 32, 32))
    build_model("torchvision:resnet34", num_classes=1000, input_shape=(3, 224, 224),
                pretrained="weights/resnet34.pth")      # a local file, never a download

Built-in models name their stages `layer1`, `layer2`, ..., their pooled embedding is `fc:in`
and their classifier `fc`, so feature names carry over between teacher and student.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from featkd.capture import glob_to_regex
from featkd.errors import CheckpointError, ModelError, did_you_mean
from featkd.registry import Registry, check_arguments

if TYPE_CHECKING:
    from featkd.data import TextInfo

MODELS: Registry = Registry("model")

#: Input shape used by `featkd inspect` for built-in models when none is given.
DEFAULT_INPUT_SHAPE = (1, 8, 8)


class ConvBlock(nn.Sequential):
    """conv -> batch norm -> ReLU (in place, as in torchvision)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, dims: int) -> None:
        conv = nn.Conv2d if dims == 2 else nn.Conv1d
        norm = nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d
        super().__init__()
        self.conv = conv(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn = norm(out_channels)
        self.relu = nn.ReLU(inplace=True)


class GlobalPool(nn.Module):
    """Average over all spatial positions: (B, C, ...) -> (B, C)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).mean(-1)


class ConvNet(nn.Module):
    """A plain CNN: stages `layer1..layerN` of conv-BN-ReLU blocks, each later stage halving the
    resolution; then `pool` (global average), optional `dropout`, and the classifier `fc`."""

    def __init__(
        self,
        num_classes: int,
        input_shape: Sequence[int],
        widths: Sequence[int] = (16, 32, 64),
        blocks: int | Sequence[int] = 1,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        dims = len(input_shape) - 1
        if dims not in (1, 2):
            raise ModelError(f"ConvNet takes (C, L) or (C, H, W) inputs, got shape {tuple(input_shape)}.")
        per_stage = [blocks] * len(widths) if isinstance(blocks, int) else list(blocks)
        if len(per_stage) != len(widths) or min(per_stage) < 1:
            raise ModelError(f"ConvNet: blocks {blocks!r} must give >= 1 block for each of {len(widths)} stages.")
        channels = input_shape[0]
        for index, (width, count) in enumerate(zip(widths, per_stage), start=1):
            stage = nn.Sequential()
            for b in range(count):
                stride = 2 if (index > 1 and b == 0) else 1
                stage.append(ConvBlock(channels, width, stride, dims))
                channels = width
            self.add_module(f"layer{index}", stage)
        self.num_stages = len(widths)
        self.pool = GlobalPool()
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{index}")(x)
        return self.fc(self.dropout(self.pool(x)))


class MLP(nn.Module):
    """A multilayer perceptron on flattened inputs: `layer1..layerN` (linear, ReLU, dropout),
    then the classifier `fc`."""

    def __init__(
        self,
        num_classes: int,
        input_shape: Sequence[int],
        hidden: Sequence[int] = (256, 256),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        features = math.prod(input_shape)
        self.flatten = nn.Flatten()
        for index, width in enumerate(hidden, start=1):
            layers = [nn.Linear(features, width), nn.ReLU(inplace=True)]
            if dropout:
                layers.append(nn.Dropout(dropout))
            self.add_module(f"layer{index}", nn.Sequential(*layers))
            features = width
        self.num_layers = len(hidden)
        self.fc = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.flatten(x)
        for index in range(1, self.num_layers + 1):
            x = getattr(self, f"layer{index}")(x)
        return self.fc(x)


@MODELS.register("cnn")
def cnn(num_classes: int, input_shape: Sequence[int], widths: tuple[int, ...] = (16, 32, 64),
        blocks: int | tuple[int, ...] = 1, dropout: float = 0.0) -> ConvNet:
    """Plain CNN with stages layer1..N (2-D or 1-D by the input shape); set widths and blocks."""
    return ConvNet(num_classes, input_shape, widths, blocks, dropout)


@MODELS.register("cnn_tiny")
def cnn_tiny(num_classes: int, input_shape: Sequence[int]) -> ConvNet:
    """Very small CNN: 3 stages of 4/8/16 channels, one conv each (~1.7k parameters on digits)."""
    return ConvNet(num_classes, input_shape, (4, 8, 16), 1)


@MODELS.register("cnn_small")
def cnn_small(num_classes: int, input_shape: Sequence[int]) -> ConvNet:
    """Student-size CNN: 3 stages of 16/32/64 channels, one conv each (~24k parameters on digits)."""
    return ConvNet(num_classes, input_shape, (16, 32, 64), 1)


@MODELS.register("cnn_large")
def cnn_large(num_classes: int, input_shape: Sequence[int]) -> ConvNet:
    """Teacher-size CNN: 3 stages of 64/128/256 channels, two convs each (~1.2M parameters)."""
    return ConvNet(num_classes, input_shape, (64, 128, 256), 2, dropout=0.2)


@MODELS.register("mlp")
def mlp(num_classes: int, input_shape: Sequence[int], hidden: tuple[int, ...] = (256, 256),
        dropout: float = 0.0) -> MLP:
    """Multilayer perceptron on flattened inputs; set hidden widths and dropout."""
    return MLP(num_classes, input_shape, hidden, dropout)


# -- external models ---------------------------------------------------------------------


def _timm(name: str, num_classes: int, input_shape: Sequence[int], args: dict[str, Any]) -> nn.Module:
    """`timm:<name>`, randomly initialised, `in_chans` from the input shape; `args` go to
    `timm.create_model` (a ViT or DeiT for 8x8 digits: `{img_size: 8, patch_size: 2,
    embed_dim: 64, depth: 4, num_heads: 4}`).

    DeiT's distilled models (`timm:deit_*_distilled_*`, with a distillation token read by a
    second classifier `head_dist`) train their two heads separately, as in the paper: in
    train mode the forward returns (class-head logits, distillation-head logits), so the
    task loss reads the class head (`logits_of` takes the first) and a DeiT term
    (`deit_hard`, `deit_soft`) reads `head_dist`; in eval mode it returns the average of the
    two heads (DeiT's inference). `distilled_training: false` keeps timm's default instead
    (both heads averaged in training as well), for training such a model without a teacher.
    """
    import timm

    args = dict(args)
    distilled_training = args.pop("distilled_training", None)
    if args.get("pretrained"):
        raise ModelError(_NO_DOWNLOAD.format(name=f"timm:{name}"))
    if not timm.is_model(name):
        raise ModelError(f"unknown timm model {name!r}.{did_you_mean(name, timm.list_models())}")
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=input_shape[0], **args)
    if hasattr(model, "set_distilled_training"):
        model.set_distilled_training(True if distilled_training is None else bool(distilled_training))
    elif distilled_training is not None:
        raise ModelError(f"timm:{name} has no distillation token, so `distilled_training` does not apply; it is "
                         "for DeiT's distilled models (timm:deit_*_distilled_*).")
    return model


def _torchvision(name: str, num_classes: int, input_shape: Sequence[int], args: dict[str, Any]) -> nn.Module:
    import torchvision

    if args.get("weights") or args.get("pretrained"):
        raise ModelError(_NO_DOWNLOAD.format(name=f"torchvision:{name}"))
    known = torchvision.models.list_models()
    if name not in known:
        raise ModelError(f"unknown torchvision model {name!r}.{did_you_mean(name, known)}")
    if input_shape[0] != 3:
        raise ModelError(
            f"torchvision:{name} takes 3-channel images but the data has {input_shape[0]} "
            f"channel(s); use timm:{name} (it adapts the stem to `in_chans`) or 3-channel data."
        )
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **args)


_NO_DOWNLOAD = (
    "{name}: featkd never downloads weights. Save the pretrained state dict to a file yourself "
    "and pass its path as `pretrained: path/to/weights.pth`."
)

EXTERNAL: dict[str, Callable[[str, int, Sequence[int], dict[str, Any]], nn.Module]] = {
    "timm": _timm,
    "torchvision": _torchvision,
}
#: Sources of text models: their builders get the data's `TextInfo` as `args["text"]`.
TEXT_SOURCES: list[str] = []
#: Checks a source runs at config validation (before anything is built): `hf:` needs its extra.
SOURCE_CHECKS: dict[str, Callable[[str], None]] = {}
_SOURCES = "'timm:<name>', 'torchvision:<name>' or 'hf:<folder or model type>'"


def check_model_name(name: str, args: dict[str, Any] | None = None, where: str = "model") -> None:
    """Fail early (at config validation) on an unknown model name or bad arguments."""
    prefix, _, rest = name.partition(":")
    if rest:
        if prefix not in EXTERNAL:
            raise ModelError(f"{where}: unknown model source {prefix!r} in {name!r}; use {_SOURCES}.")
        if prefix in SOURCE_CHECKS:
            SOURCE_CHECKS[prefix](rest)
        return
    check_arguments(MODELS.get(name), args or {}, f"{where} ({name})", injected=["num_classes", "input_shape", "text"])


def build_model(
    name: str,
    num_classes: int,
    input_shape: Sequence[int],
    args: dict[str, Any] | None = None,
    pretrained: str | Path | None = None,
    text: TextInfo | None = None,
) -> nn.Module:
    """Build a model by registry name (or `timm:` / `torchvision:` / `hf:`), weights from a
    local file. With text data, `text` says what the tokens are (vocabulary, task); builders
    that take a `text` argument get it, and image models refuse it."""
    args = dict(args or {})
    input_shape = tuple(int(s) for s in input_shape)
    prefix, _, rest = name.partition(":")
    if rest:
        if prefix not in EXTERNAL:
            raise ModelError(f"unknown model source {prefix!r} in {name!r}; use {_SOURCES}.")
        if text is not None and prefix not in TEXT_SOURCES:
            raise ModelError(f"{name} is an image model, but the data is tokenised text; use a text model "
                             f"({', '.join(TEXT_SOURCES)}: or a built-in one such as 'transformer').")
        model = EXTERNAL[prefix](rest, num_classes, input_shape, {**args, "text": text} if prefix in TEXT_SOURCES else args)
    else:
        builder = MODELS.get(name)
        takes_text = "text" in inspect.signature(builder).parameters
        if text is not None and not takes_text:
            raise ModelError(f"{name!r} is an image model, but the data is tokenised text; use a text model such as "
                             "'transformer' or 'hf:<folder>'.")
        extra = {"text": text} if takes_text else {}
        model = MODELS.build(name, num_classes=num_classes, input_shape=input_shape, **extra, **args)
    if pretrained is not None:
        load_weights(model, pretrained, what=name)
    return model


def model_from_checkpoint(payload: dict[str, Any]) -> nn.Module:
    """The model a featkd checkpoint holds (a `load_checkpoint` payload): rebuilt from the
    record the trainer keeps with it (name, arguments, classes, input shape, text) and loaded
    with its weights; wrapped with the head its method gave it, if any (`featkd.heads`)."""
    from featkd.data import TextInfo

    if "model_name" not in payload or "model" not in payload:
        raise CheckpointError("the checkpoint does not record its model (no model_name); it was not written by a "
                              "featkd run.")
    text = TextInfo(**payload["text"]) if payload.get("text") else None
    model = build_model(payload["model_name"], payload["num_classes"], payload["input_shape"],
                        payload.get("model_args"), text=text)
    if payload.get("structure"):  # channels were pruned: the recorded shapes, then the weights
        from featkd.deploy.prune import restore_structure

        restore_structure(model, payload["model"], payload["structure"])
    else:
        model.load_state_dict(payload["model"])
    from featkd.heads import with_head

    return with_head(model, payload.get("head"))  # SimKD's student answers through its head


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from a plain weights file or a featkd checkpoint (safely)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {str(path)!r} does not exist; check the path.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, not a torch file, or holds arbitrary objects
        raise CheckpointError(
            f"cannot read weights from {str(path)!r}: {type(exc).__name__}: {str(exc).splitlines()[0]}. "
            "The file may be truncated or not a PyTorch state dict."
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]  # a featkd checkpoint
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{str(path)!r} does not hold a state dict of tensors.")
    return obj


def load_weights(model: nn.Module, path: str | Path, what: str = "model") -> None:
    """Load a state dict into `model`; a mismatch names the keys and shapes that differ."""
    state = read_state_dict(path)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        detail = []
        if missing:
            detail.append(f"missing {len(missing)} key(s), e.g. {missing[:3]}")
        if unexpected:
            detail.append(f"unexpected {len(unexpected)} key(s), e.g. {unexpected[:3]}")
        if wrong:
            detail.append(f"shape mismatch (file vs model) e.g. {wrong[:3]}")
        raise CheckpointError(
            f"the weights in {str(path)!r} do not fit {what}: {'; '.join(detail)}. "
            "Check that the model name, its arguments and the number of classes match the "
            "ones the weights were trained with."
        )
    model.load_state_dict(state)


def default_input_shape(name: str) -> tuple[int, ...]:
    """A sensible input shape for inspecting `name` when the user gives none."""
    prefix, _, rest = name.partition(":")
    if prefix == "timm" and rest:
        import timm

        if timm.is_model(rest):
            return tuple(timm.get_pretrained_cfg(rest).input_size) if timm.get_pretrained_cfg(rest) else (3, 224, 224)
        return (3, 224, 224)
    if prefix == "torchvision" and rest:
        return (3, 224, 224)
    return DEFAULT_INPUT_SHAPE


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@contextmanager
def frozen(model: nn.Module, freeze: Sequence[str], unfreeze: Sequence[str] = ()) -> Iterator[None]:
    """Parameters matching `freeze` globs (then not matching `unfreeze`) stop learning inside
    this block; their previous flags come back afterwards."""
    freeze_re = [glob_to_regex(p) for p in freeze]
    unfreeze_re = [glob_to_regex(p) for p in unfreeze]
    changed = [param for name, param in model.named_parameters()
               if param.requires_grad and any(r.match(name) for r in freeze_re)
               and not any(r.match(name) for r in unfreeze_re)]
    for param in changed:
        param.requires_grad_(False)
    try:
        yield
    finally:
        for param in changed:
            param.requires_grad_(True)


from featkd import cifar_models  # noqa: E402,F401  (registers the CIFAR benchmark architectures)
from featkd import text_models  # noqa: E402,F401  (registers the built-in transformer and the hf: source)
