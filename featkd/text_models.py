"""Text models: the built-in `transformer`, the `hf:` source, DistilBERT-style students and the
`bilstm` of Tang et al. 2019.

    build_model("transformer", num_classes=2, input_shape=(64,), text=info, args={"layers": 4})
    build_model("hf:bert", 2, (128,), text=info,
                args={"num_hidden_layers": 4, "hidden_size": 256, "num_attention_heads": 4})
    build_model("hf:runs/teacher/hf", 2, (128,), text=info)   # a `save_pretrained` folder
    student = student_from_teacher(teacher)                     # layers 0, 2, 4, ... of the teacher
    build_model("bilstm", 2, (64,), text=info, args={"hidden": 150, "fc_hidden": 200})

Text models take keywords `input_ids`, `attention_mask` (1 at real tokens) and optionally
`token_type_ids`, and give (B, C) logits for classification or (B, T, V) for the language-model
tasks (for causal LMs the logits at position t predict token t + 1).

The built-in transformer names its modules like BERT (`embeddings`, `encoder.layer.N`, inside
each block `attention.self` with `query` / `key` / `value`, `attention.output`,
`intermediate`, `output`; then `pooler` + `classifier`, or `lm_head`), so feature names and
attention captures carry over between it and Hugging Face BERT models.

Hugging Face transformers is optional (the `nlp` extra) and only imported by `hf:` models.
Nothing here downloads: `hf:` reads local folders (`local_files_only=True`) or builds
randomly initialised models from a model type and a config.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from featkd.capture import unwrap
from featkd.data import TEXT_TASKS, TextInfo
from featkd.errors import ModelError, did_you_mean
from featkd.models import EXTERNAL, MODELS, SOURCE_CHECKS, TEXT_SOURCES

log = logging.getLogger(__name__)

#: Attribute names under which models and their configs keep their number of blocks.
LAYER_COUNTS = ("num_hidden_layers", "n_layers", "n_layer", "num_layers")

_INIT_STD = 0.02
_LN_EPS = 1e-12


# -- the built-in transformer ------------------------------------------------------------


class Embeddings(nn.Module):
    """Word + learned position + token-type embeddings, then LayerNorm and dropout (BERT)."""

    def __init__(self, vocab_size: int, hidden: int, max_length: int, dropout: float, type_vocab_size: int = 2) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, hidden)
        self.position_embeddings = nn.Embedding(max_length, hidden)
        self.token_type_embeddings = nn.Embedding(type_vocab_size, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=_LN_EPS)
        self.dropout = nn.Dropout(dropout)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)[None]
        if token_type_ids is None:
            x = x + self.token_type_embeddings.weight[0]
        else:
            x = x + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))


class SelfAttention(nn.Module):
    """Multi-head scaled dot-product attention over `query`, `key`, `value` projections.

    `num_attention_heads`, `attention_head_size` and `is_causal` let feature capture recompute
    the attention maps from the projections (they are not returned here)."""

    def __init__(self, hidden: int, heads: int, dropout: float, causal: bool) -> None:
        super().__init__()
        self.num_attention_heads = heads
        self.attention_head_size = hidden // heads
        self.is_causal = causal
        self.dropout_prob = dropout
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.reshape(b, t, self.num_attention_heads, self.attention_head_size).transpose(1, 2)

    def forward(self, hidden: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """`keep` (B, 1, T, T) bool says which keys each query may attend to (None: all, or
        the causal pattern when `is_causal`)."""
        q, k, v = self._heads(self.query(hidden)), self._heads(self.key(hidden)), self._heads(self.value(hidden))
        context = F.scaled_dot_product_attention(
            q, k, v, attn_mask=keep, dropout_p=self.dropout_prob if self.training else 0.0,
            is_causal=self.is_causal and keep is None,
        )
        b, _, t, _ = context.shape
        return context.transpose(1, 2).reshape(b, t, -1)


class SelfOutput(nn.Module):
    """Projection of the attended values, dropout, then LayerNorm of the residual sum."""

    def __init__(self, hidden: int, dropout: float) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(dropout)
        self.LayerNorm = nn.LayerNorm(hidden, eps=_LN_EPS)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class Attention(nn.Module):
    """`self` (the attention) and `output` (projection + residual + LayerNorm), as in BERT."""

    def __init__(self, hidden: int, heads: int, dropout: float, causal: bool) -> None:
        super().__init__()
        self.self = SelfAttention(hidden, heads, dropout, causal)
        self.output = SelfOutput(hidden, dropout)

    def forward(self, hidden: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        return self.output(self.self(hidden, keep), hidden)


class Intermediate(nn.Module):
    """The feed-forward expansion: dense to the intermediate width, then GELU."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, intermediate)
        self.intermediate_act_fn = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.intermediate_act_fn(self.dense(x))


class Output(nn.Module):
    """The feed-forward contraction, dropout, then LayerNorm of the residual sum."""

    def __init__(self, hidden: int, intermediate: int, dropout: float) -> None:
        super().__init__()
        self.dense = nn.Linear(intermediate, hidden)
        self.dropout = nn.Dropout(dropout)
        self.LayerNorm = nn.LayerNorm(hidden, eps=_LN_EPS)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class TransformerLayer(nn.Module):
    """One post-LN encoder block: `attention`, `intermediate`, `output`; gives (B, T, D)."""

    def __init__(self, hidden: int, heads: int, intermediate: int, dropout: float, causal: bool) -> None:
        super().__init__()
        self.attention = Attention(hidden, heads, dropout, causal)
        self.intermediate = Intermediate(hidden, intermediate)
        self.output = Output(hidden, intermediate, dropout)

    def forward(self, hidden: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        attended = self.attention(hidden, keep)
        return self.output(self.intermediate(attended), attended)


class Encoder(nn.Module):
    """The stack of blocks, `layer.0 .. layer.N-1`."""

    def __init__(self, layers: int, hidden: int, heads: int, intermediate: int, dropout: float, causal: bool) -> None:
        super().__init__()
        self.layer = nn.ModuleList(TransformerLayer(hidden, heads, intermediate, dropout, causal) for _ in range(layers))

    def forward(self, hidden: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.layer:
            hidden = block(hidden, keep)
        return hidden


class Pooler(nn.Module):
    """Linear + tanh on one token's hidden state (BERT's pooled output)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.activation = nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.dense(x))


class LMHead(nn.Module):
    """dense, GELU, LayerNorm, then `decoder` to the vocabulary (its weight tied to the word
    embeddings, as in BERT)."""

    def __init__(self, hidden: int, vocab_size: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.act = nn.GELU()
        self.LayerNorm = nn.LayerNorm(hidden, eps=_LN_EPS)
        self.decoder = nn.Linear(hidden, vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.LayerNorm(self.act(self.dense(x))))


class Transformer(nn.Module):
    """A small BERT-style encoder (post-LN, GELU, learned positions) with a classification or
    language-model head; causal attention for `causal_lm`.

    Padding never reaches real tokens: with an `attention_mask`, real positions attend only
    to real positions, and the classifier pools the first real token (position 0 when the
    padding is on the right, as in BERT)."""

    def __init__(self, num_classes: int, vocab_size: int, max_length: int, task: str = "classification",
                 layers: int = 2, hidden: int = 64, heads: int = 4, intermediate: int | None = None,
                 dropout: float = 0.1) -> None:
        super().__init__()
        if task not in TEXT_TASKS:
            raise ModelError(f"transformer: unknown task {task!r}; use one of {', '.join(TEXT_TASKS)}.")
        if heads < 1 or hidden % heads:
            raise ModelError(f"transformer: hidden size {hidden} is not divisible by {heads} heads; choose "
                             "`hidden` a multiple of `heads` (e.g. hidden 64 with 4 heads).")
        if layers < 1:
            raise ModelError(f"transformer: layers must be at least 1, got {layers}.")
        self.task = task
        self.vocab_size = vocab_size
        self.max_length = max_length
        self.hidden_size = hidden
        self.num_attention_heads = heads
        self.num_layers = layers
        causal = task == "causal_lm"
        self.embeddings = Embeddings(vocab_size, hidden, max_length, dropout)
        self.encoder = Encoder(layers, hidden, heads, intermediate or 4 * hidden, dropout, causal)
        if task == "classification":
            self.pooler = Pooler(hidden)
            self.dropout = nn.Dropout(dropout)
            self.classifier = nn.Linear(hidden, num_classes)
        else:
            self.lm_head = LMHead(hidden, vocab_size)
        self.apply(_init_bert)
        if task != "classification":
            self.lm_head.decoder.weight = self.embeddings.word_embeddings.weight

    @property
    def is_causal(self) -> bool:
        return self.task == "causal_lm"

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        length = input_ids.shape[1]
        if length > self.max_length:
            raise ModelError(
                f"transformer: got sequences of {length} tokens, but the model has positions for at most "
                f"{self.max_length}: lower data.args.max_length or raise the model's max_length."
            )
        keep = self._keep(attention_mask, length)
        hidden = self.encoder(self.embeddings(input_ids, token_type_ids), keep)
        if self.task != "classification":
            return self.lm_head(hidden)
        if attention_mask is None:
            first = hidden[:, 0]
        else:
            leading_padding = attention_mask.ne(0).cumsum(1).eq(0).sum(1)
            index = leading_padding.clamp(max=length - 1)
            first = hidden[torch.arange(hidden.shape[0], device=hidden.device), index]
        return self.classifier(self.dropout(self.pooler(first)))

    def _keep(self, attention_mask: torch.Tensor | None, length: int) -> torch.Tensor | None:
        """(B, 1, T, T) bool: real keys (and earlier ones when causal); every position may see
        itself, so padded rows never attend to nothing (no NaN) and stay out of real rows."""
        if attention_mask is None:
            return None
        keys = attention_mask.ne(0)[:, None, None, :]
        own = torch.eye(length, dtype=torch.bool, device=attention_mask.device)
        if self.is_causal:
            keys = keys & torch.ones(length, length, dtype=torch.bool, device=attention_mask.device).tril()
        return keys | own


def _init_bert(module: nn.Module) -> None:
    """BERT's initialisation: normal(0, 0.02) weights, zero biases, unit LayerNorms."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=_INIT_STD)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


@MODELS.register("transformer")
def transformer(num_classes: int, input_shape: Sequence[int], text: TextInfo | None = None, layers: int = 2,
                hidden: int = 64, heads: int = 4, intermediate: int | None = None, dropout: float = 0.1,
                max_length: int | None = None, vocab_size: int | None = None) -> Transformer:
    """Small BERT-style transformer for text (classification, masked or causal LM); set layers, hidden, heads."""
    if text is None and vocab_size is None:
        raise ModelError(
            "transformer needs text data (a tokenised dataset gives its vocabulary and task); for images "
            "use an image model such as 'cnn_small', or give `vocab_size` to build it without data."
        )
    task = text.task if text is not None else "classification"
    if text is not None and vocab_size is not None and vocab_size < text.vocab_size:
        raise ModelError(
            f"transformer: vocab_size {vocab_size} is smaller than the tokenizer's {text.vocab_size} tokens; "
            "remove `vocab_size` (it comes from the data) or raise it."
        )
    vocab = vocab_size if vocab_size is not None else text.vocab_size  # type: ignore[union-attr]
    needed = text.max_length if text is not None else int(input_shape[0])
    positions = max_length if max_length is not None else needed
    if needed > positions:
        raise ModelError(
            f"transformer: the data holds sequences of up to {needed} tokens, but the model has positions "
            f"for at most {positions}: lower data.args.max_length or raise the model's max_length."
        )
    classes = num_classes if task == "classification" else vocab
    return Transformer(classes, vocab, positions, task, layers, hidden, heads, intermediate, dropout)


# -- the BiLSTM student of Tang et al. (2019) --------------------------------------------

BILSTM_POOLING = ("max", "last")


class BiLSTMClassifier(nn.Module):
    """Word embeddings, one bidirectional LSTM layer, pooling over the real tokens, then a
    ReLU layer and the output layer (`embeddings`, `lstm`, `fc1`, `classifier`): the student
    of Tang et al. 2019, "Distilling Task-Specific Knowledge from BERT into Simple Neural
    Networks".

    Pooling: "max" takes, per feature, the maximum over the real tokens of the concatenated
    forward and backward states; "last" concatenates the forward direction's state at the
    last real token with the backward direction's state at the first (the final state of
    each direction, the single-sentence model drawn in the paper).

    Padding never reaches the LSTM: the embedded tokens are packed with
    `pack_padded_sequence`, so each sequence is read for exactly its real tokens and the
    logits do not depend on the padding (its ids, or how much of it there is). Real tokens
    are the positions where `attention_mask` is non-zero (all when it is None); they need
    not be contiguous, as they are gathered in order first. A row without real tokens is
    read as its first token alone.

    Sentence pairs: Tang et al. encode the two sentences separately with one shared BiLSTM
    (a siamese network) and classify [h1, h2, h1 * h2, |h1 - h2|]. This model instead reads
    the pair as the one sequence the tokenizer made of it, `[CLS] a [SEP] b [SEP]`, and
    ignores `token_type_ids` (the [SEP] token marks the boundary).
    """

    def __init__(self, num_classes: int, vocab_size: int, pad_id: int = 0, embedding: int = 300, hidden: int = 300,
                 fc_hidden: int = 400, pooling: str = "max", dropout: float = 0.1) -> None:
        super().__init__()
        if pooling not in BILSTM_POOLING:
            raise ModelError(f"bilstm: pooling {pooling!r} is not one of {', '.join(BILSTM_POOLING)}."
                             f"{did_you_mean(pooling, BILSTM_POOLING)}")
        for name, value in (("embedding", embedding), ("hidden", hidden), ("fc_hidden", fc_hidden),
                            ("vocab_size", vocab_size), ("num_classes", num_classes)):
            if value < 1:
                raise ModelError(f"bilstm: {name} must be at least 1, got {value}.")
        if not 0 <= dropout < 1:
            raise ModelError(f"bilstm: dropout must be in [0, 1), got {dropout}.")
        if not 0 <= pad_id < vocab_size:
            raise ModelError(f"bilstm: the padding id {pad_id} is not in the vocabulary of {vocab_size} tokens.")
        self.task = "classification"
        self.vocab_size = vocab_size
        self.pad_id = pad_id
        self.hidden_size = hidden
        self.pooling = pooling
        self.embeddings = nn.Embedding(vocab_size, embedding, padding_idx=pad_id)
        self.lstm = nn.LSTM(embedding, hidden, num_layers=1, batch_first=True, bidirectional=True)
        self.fc1 = nn.Linear(2 * hidden, fc_hidden)
        self.activation = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(fc_hidden, num_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C) logits of (B, T) token ids; `token_type_ids` is accepted and ignored."""
        ids, lengths = self._real_tokens(input_ids, attention_mask)
        packed = nn.utils.rnn.pack_padded_sequence(self.embeddings(ids), lengths.cpu(), batch_first=True,
                                                   enforce_sorted=False)
        states, (final, _) = self.lstm(packed)
        if self.pooling == "last":
            # final: (2, B, H), forward then backward, in the batch's own order
            pooled = torch.cat([final[0], final[1]], dim=1)
        else:
            padded, _ = nn.utils.rnn.pad_packed_sequence(states, batch_first=True, total_length=ids.shape[1])
            real = torch.arange(ids.shape[1], device=ids.device)[None, :] < lengths.to(ids.device)[:, None]
            pooled = padded.masked_fill(~real[:, :, None], float("-inf")).amax(dim=1)
        return self.classifier(self.dropout(self.activation(self.fc1(pooled))))

    @staticmethod
    def _real_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The ids with each row's real tokens first (in order) and each row's count of them."""
        if input_ids.dim() != 2:
            raise ModelError(f"bilstm: input_ids must be (batch, length), got shape {tuple(input_ids.shape)}.")
        batch, length = input_ids.shape
        if attention_mask is None:
            return input_ids, torch.full((batch,), length, dtype=torch.long, device=input_ids.device)
        real = attention_mask.ne(0)
        lengths = real.sum(1)
        prefix = torch.arange(length, device=input_ids.device)[None, :] < lengths[:, None]
        if not torch.equal(real, prefix):  # padding on the left, or inside: gather the real tokens first
            order = torch.argsort((~real).to(torch.uint8), dim=1, stable=True)
            input_ids = input_ids.gather(1, order)
        return input_ids, lengths.clamp(min=1)


@MODELS.register("bilstm")
def bilstm(num_classes: int, input_shape: Sequence[int], text: TextInfo | None = None, embedding: int = 300,
           hidden: int = 300, pooling: str = "max", dropout: float = 0.1, vocab_size: int | None = None,
           fc_hidden: int = 400) -> BiLSTMClassifier:
    """One-layer BiLSTM text classifier (Tang et al. 2019's student); set embedding, hidden, fc_hidden, pooling.

    Sizes: Tang et al. use 300-dimensional word embeddings (word2vec; there are no pretrained
    vectors here, so they are learned from scratch), and choose 150 or 300 LSTM units per
    direction with 200 or 400 units in the ReLU layer on validation data (the authors' SST-2
    configuration: 150 and 200; their larger one: 300 and 400). The defaults are the larger
    pair, `hidden=300`, `fc_hidden=400`, with dropout 0.1 after the ReLU layer as in their
    code. The defaults hold about 1.7M parameters besides the embeddings; small data on a
    CPU wants far less (e.g. embedding 64, hidden 64, fc_hidden 64).

    Pooling defaults to "max" over time (the stronger sentence encoder in InferSent's
    comparison, and here: 93.2% against 91.2% on generated_sentiment, configs/nlp/bilstm.yaml);
    "last", the final state of each direction, is Tang et al.'s (their figure, and their
    code's default). Classification only: a language-model task is refused. Needs text data
    (its vocabulary and padding id), or `vocab_size` to be built without data (padding id 0).
    """
    if text is None and vocab_size is None:
        raise ModelError(
            "bilstm needs text data (a tokenised dataset gives its vocabulary and padding id); for images use an "
            "image model such as 'cnn_small', or give `vocab_size` to build it without data."
        )
    if text is not None and text.task != "classification":
        raise ModelError(
            f"bilstm classifies whole sequences, but the data's task is {text.task!r}; use task 'classification' "
            "(data.args.task), or a model with a language-model head such as 'transformer'."
        )
    if text is not None and vocab_size is not None and vocab_size < text.vocab_size:
        raise ModelError(
            f"bilstm: vocab_size {vocab_size} is smaller than the tokenizer's {text.vocab_size} tokens; "
            "remove `vocab_size` (it comes from the data) or raise it."
        )
    vocab = vocab_size if vocab_size is not None else text.vocab_size  # type: ignore[union-attr]
    pad_id = text.pad_id if text is not None else 0
    return BiLSTMClassifier(num_classes, vocab, pad_id, embedding, hidden, fc_hidden, pooling, dropout)


# -- Hugging Face models (`hf:`) ---------------------------------------------------------

_NEED_EXTRA = ('hf: models need Hugging Face transformers: pip install "featkd[nlp]" '
               '(or pip install -e ".[nlp]" in a checkout).')
#: Arguments of `hf:` models that are not config fields.
HF_RESERVED = ("task", "attn_implementation")
_HEADS = {
    "classification": "AutoModelForSequenceClassification",
    "masked_lm": "AutoModelForMaskedLM",
    "causal_lm": "AutoModelForCausalLM",
}
_ARCHITECTURE_TASKS = (("ForSequenceClassification", "classification"), ("ForMaskedLM", "masked_lm"),
                       ("ForCausalLM", "causal_lm"), ("LMHeadModel", "causal_lm"))
#: Model types whose position ids start after the padding id (RoBERTa's layout).
_OFFSET_POSITIONS = ("camembert", "data2vec-text", "ibert", "longformer")


def hf_available() -> bool:
    """Whether Hugging Face transformers can be imported (the `nlp` extra), without importing it."""
    if "transformers" in sys.modules:
        return sys.modules["transformers"] is not None
    try:
        return importlib.util.find_spec("transformers") is not None
    except (ImportError, ValueError):
        return False


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ModelError(_NEED_EXTRA) from None
    return transformers


@contextmanager
def _quiet(transformers: Any) -> Iterator[None]:
    """Silence transformers' warnings and progress bars (load reports, config advice)."""
    tlog = transformers.utils.logging
    level, bars = tlog.get_verbosity(), tlog.is_progress_bar_enabled()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        tlog.set_verbosity(level)
        if bars:
            tlog.enable_progress_bar()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _config_keys(config: Any) -> list[str]:
    return sorted({*config.to_dict(), *getattr(config, "attribute_map", {})})


def _check_config_args(config: Any, args: dict[str, Any], source: str) -> None:
    unknown = [k for k in args if not hasattr(config, k)]
    if unknown:
        key = unknown[0]
        raise ModelError(
            f"{source}: {key!r} is not a field of {type(config).__name__}.{did_you_mean(key, _config_keys(config))} "
            f"Model arguments are config fields, besides {', '.join(HF_RESERVED)}."
        )


def hf_max_positions(config: Any) -> int | None:
    """The longest sequence a Hugging Face config has position embeddings for (None: no limit known)."""
    value = getattr(config, "max_position_embeddings", None)
    if not isinstance(value, int):
        value = getattr(config, "n_positions", None)
    if not isinstance(value, int) or isinstance(value, bool):
        return None
    model_type = getattr(config, "model_type", "") or ""
    if "roberta" in model_type or model_type in _OFFSET_POSITIONS:
        value -= (getattr(config, "pad_token_id", None) or 0) + 1
    return value


def _task_of(config: Any) -> str | None:
    for architecture in getattr(config, "architectures", None) or []:
        for suffix, task in _ARCHITECTURE_TASKS:
            if architecture.endswith(suffix):
                return task
    return None


def _hf(name: str, num_classes: int, input_shape: Sequence[int], args: dict[str, Any]) -> nn.Module:
    """`hf:<folder>` (a `save_pretrained` folder) or `hf:<model type>` with its config under
    args (random weights). The task head comes from `args["task"]`, else the data's task,
    else (a folder without data) the architecture the folder was saved with."""
    args = dict(args)
    text: TextInfo | None = args.pop("text", None)
    task = args.pop("task", None)
    attn = args.pop("attn_implementation", None)
    source = f"hf:{name}"
    transformers = _transformers()
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    folder = Path(name).expanduser()
    with _quiet(transformers):
        if folder.is_dir():
            if not (folder / "config.json").is_file():
                raise ModelError(
                    f"{source}: the folder has no config.json; put a model saved with `model.save_pretrained(folder)` "
                    "there (config.json and weights)."
                )
            try:
                config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
            except (OSError, ValueError, KeyError) as exc:
                raise ModelError(f"{source}: cannot read its config.json ({_first_line(exc)}).") from None
            _check_config_args(config, args, source)
            for key, value in args.items():
                setattr(config, key, value)
            if text is not None and hasattr(config, "pad_token_id") and config.pad_token_id is None:
                config.pad_token_id = text.pad_id
        elif name in CONFIG_MAPPING:
            _check_config_args(CONFIG_MAPPING[name](), args, source)
            defaults: dict[str, Any] = {}
            if text is not None:
                defaults = {"vocab_size": text.vocab_size, "pad_token_id": text.pad_id}
            config = transformers.AutoConfig.for_model(name, **{**defaults, **args})
            for special in ("bos_token_id", "eos_token_id"):  # the default tokenizer's, out of a small vocabulary
                value = getattr(config, special, None)
                if special not in args and isinstance(value, int) and value >= config.vocab_size:
                    setattr(config, special, None)
        else:
            raise ModelError(
                f"{source}: there is no folder {str(folder)!r} and {name!r} is not a model type transformers knows."
                f"{did_you_mean(name, list(CONFIG_MAPPING.keys()))} Put a model saved with "
                "`model.save_pretrained(folder)` there (config.json and weights), or name a model type (bert, "
                "distilbert, roberta, gpt2, ...) and give its config under `args`; featkd never downloads."
            )
    from_folder = folder.is_dir()
    task = task or (text.task if text is not None else None) or (_task_of(config) if from_folder else None)
    task = task or "classification"
    if task not in TEXT_TASKS:
        raise ModelError(f"{source}: unknown task {task!r}; use one of {', '.join(TEXT_TASKS)}.")
    _check_fits(config, text, source)
    if task == "classification":
        config.num_labels = num_classes
    if task == "causal_lm" and hasattr(config, "is_decoder"):
        config.is_decoder = True  # encoder types (BERT, RoBERTa) attend causally as LM decoders
    if hasattr(config, "use_cache"):
        config.use_cache = False  # training and distillation never reuse past keys and values
    auto = getattr(transformers, _HEADS[task])
    extra = {"attn_implementation": attn} if attn is not None else {}
    with _quiet(transformers):
        try:
            if from_folder:
                model, info = auto.from_pretrained(
                    folder, config=config, local_files_only=True, ignore_mismatched_sizes=True,
                    output_loading_info=True, dtype=torch.float32, **extra,
                )
            else:
                model, info = auto.from_config(config, **extra), None
        except (OSError, ValueError, RuntimeError, KeyError, ImportError) as exc:
            message = _first_line(exc)
            if "Unrecognized configuration class" in message:
                raise ModelError(f"{source}: transformers has no {task} model for the type "
                                 f"{config.model_type!r}; choose another task or model type.") from None
            raise ModelError(f"{source}: cannot build the model ({message}). For a folder, check that it holds "
                             "config.json and the weights `model.save_pretrained(folder)` wrote.") from None
    if info is not None:
        _report_loading(model, info, source)
    return model.train()


def _check_fits(config: Any, text: TextInfo | None, source: str) -> None:
    if text is None:
        return
    vocab = getattr(config, "vocab_size", None)
    if isinstance(vocab, int) and vocab < text.vocab_size:
        raise ModelError(
            f"{source}: the model embeds {vocab} tokens but the tokenizer has {text.vocab_size}; use the tokenizer "
            "saved with the model (data.args.tokenizer: the model's folder), or a model with a larger vocab_size."
        )
    positions = hf_max_positions(config)
    if positions is not None and text.max_length > positions:
        raise ModelError(
            f"{source}: the data holds sequences of up to {text.max_length} tokens, but the model has positions "
            f"for at most {positions}: lower data.args.max_length."
        )


def _report_loading(model: nn.Module, info: dict[str, Any], source: str) -> None:
    """Refuse reinitialised body weights (a different architecture); log new head weights in one line."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    body = [key for key, *_ in info.get("mismatched_keys", ()) if prefix and key.startswith(prefix + ".")]
    if body:
        raise ModelError(
            f"{source}: the saved weights do not fit the config (e.g. {sorted(body)[:3]}); remove the model arguments "
            "that change its shape (hidden size, layers, ...) or save the model again."
        )
    new = sorted({*info.get("missing_keys", ()), *(key for key, *_ in info.get("mismatched_keys", ()))})
    if new:
        shown = ", ".join(new[:4]) + (f" and {len(new) - 4} more" if len(new) > 4 else "")
        log.warning("%s: %d weight(s) not in the folder are newly initialised: %s", source, len(new), shown)


def check_hf(name: str) -> None:
    """What config validation checks of `hf:<name>` before anything is built: the extra."""
    if not hf_available():
        raise ModelError(_NEED_EXTRA)


EXTERNAL["hf"] = _hf
TEXT_SOURCES.append("hf")
SOURCE_CHECKS["hf"] = check_hf


# -- students from teachers --------------------------------------------------------------


def layer_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's stack of blocks: (its module name, the nn.ModuleList), found as the
    ModuleList of same-typed modules with the most entries (the first such list on a tie).
    `encoder.layer` in the built-in transformer and BERT, `transformer.layer` in DistilBERT,
    `transformer.h` in GPT-2 (names inside DDP / compile wrappers)."""
    inner = unwrap(model)
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in inner.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1:
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    if best is None:
        raise ModelError(f"{type(inner).__name__} has no stack of layers (an nn.ModuleList of blocks of one type), "
                         "so a student cannot be made from its layers.")
    return best


def choose_layers(layers: str | int | Sequence[int], count: int) -> list[int]:
    """Teacher layer indices to keep out of `count`: "every_other" (0, 2, 4, ...; DistilBERT),
    an int n (the uniform pick floor(k * count / n) for k < n: layer 0 and every count/n-th
    after it, which for n = count / 2 is "every_other"), or an explicit list."""
    if isinstance(layers, str):
        if layers != "every_other":
            raise ModelError(f"student layers {layers!r}: use 'every_other', a number of layers, or a list of "
                             f"teacher layer indices (0 to {count - 1}).{did_you_mean(layers, ['every_other'])}")
        return list(range(0, count, 2))
    if isinstance(layers, bool) or not isinstance(layers, (int, Sequence)):
        raise ModelError(f"student layers {layers!r}: use 'every_other', a number of layers, or a list of "
                         f"teacher layer indices (0 to {count - 1}).")
    if isinstance(layers, int):
        if not 1 <= layers <= count:
            raise ModelError(f"student layers {layers}: the teacher has {count} layers; keep 1 to {count} of them.")
        return [k * count // layers for k in range(layers)]
    chosen = list(layers)
    if not chosen:
        raise ModelError("student layers: the list is empty; name at least one teacher layer.")
    for index in chosen:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count:
            raise ModelError(f"student layers {chosen}: {index!r} is not a teacher layer; the teacher has {count} "
                             f"layers, numbered 0 to {count - 1}.")
    if any(b <= a for a, b in zip(chosen, chosen[1:])):
        raise ModelError(f"student layers {chosen}: list teacher layers in increasing order, each once.")
    return chosen


def student_from_teacher(teacher: nn.Module, layers: str | int | Sequence[int] = "every_other") -> nn.Module:
    """A student initialised from the teacher, as DistilBERT was: a copy keeping only the
    chosen blocks of the layer stack (see `choose_layers`) and every other weight
    (embeddings, heads). Works for the built-in transformer and Hugging Face models (BERT,
    DistilBERT, RoBERTa, GPT-2, ...): the layer counts the model and its config keep are
    updated, and blocks that know their index (`layer_idx`) are renumbered. The teacher is
    left unchanged; hooks on it (feature capture) are not copied, and all of the student's
    parameters train even when the teacher's are frozen."""
    teacher = unwrap(teacher)
    path, stack = layer_stack(teacher)
    count = len(stack)
    chosen = choose_layers(layers, count)
    student = copy.deepcopy(teacher)
    for module in student.modules():
        for hooks in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                      "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs"):
            table = getattr(module, hooks, None)
            if table is not None:
                table.clear()
    parent_path, _, attribute = path.rpartition(".")
    parent = student.get_submodule(parent_path)
    old = parent.get_submodule(attribute)
    kept = nn.ModuleList(old[i] for i in chosen)
    setattr(parent, attribute, kept)
    for new_index, block in enumerate(kept):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index
    owners: list[Any] = [student.get_submodule(".".join(path.split(".")[:i])) for i in range(path.count(".") + 1)]
    configs = {id(c): c for m in student.modules() if (c := getattr(m, "config", None)) is not None}
    for owner in [*owners, *configs.values()]:
        for attribute_name in LAYER_COUNTS:
            value = getattr(owner, attribute_name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value == count:
                setattr(owner, attribute_name, len(chosen))
        layer_types = getattr(owner, "layer_types", None)
        if isinstance(layer_types, list) and len(layer_types) == count:
            owner.layer_types = [layer_types[i] for i in chosen]
    student.requires_grad_(True)
    return student


# -- example inputs ----------------------------------------------------------------------


def text_vocab_size(model: nn.Module) -> int | None:
    """How many token ids the model embeds (None when it has no embedding)."""
    inner = unwrap(model)
    vocab = getattr(inner, "vocab_size", None)
    if not isinstance(vocab, int):
        vocab = getattr(getattr(inner, "config", None), "vocab_size", None)
    if isinstance(vocab, int) and vocab > 0:
        return vocab
    getter = getattr(inner, "get_input_embeddings", None)
    embedding = getter() if callable(getter) else None
    if not isinstance(embedding, nn.Embedding):
        embedding = next((m for m in inner.modules() if isinstance(m, nn.Embedding)), None)
    return embedding.num_embeddings if embedding is not None else None


def text_max_length(model: nn.Module) -> int | None:
    """The longest sequence the model has positions for (None: not known)."""
    inner = unwrap(model)
    if isinstance(getattr(inner, "max_length", None), int):
        return inner.max_length
    config = getattr(inner, "config", None)
    return hf_max_positions(config) if config is not None else None


def example_text_input(model: nn.Module, length: int = 16, batch: int = 2) -> dict[str, torch.Tensor]:
    """A batch of token ids within the model's vocabulary (avoiding id 0, often padding) and
    an all-ones attention mask, for inspecting a text model without data; `length` is capped
    at the model's positions."""
    vocab = text_vocab_size(model)
    if vocab is None:
        raise ModelError(f"{type(unwrap(model)).__name__} embeds no tokens; it is not a text model.")
    limit = text_max_length(model)
    length = max(1, min(length, limit) if limit else length)
    ids = torch.arange(batch * length).reshape(batch, length)
    ids = 1 + ids % (vocab - 1) if vocab > 1 else torch.zeros_like(ids)
    parameter = next(unwrap(model).parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids, device=device)}
