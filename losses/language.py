"""Losses for transformers and language models: token-level logit distillation and the
hidden-state, attention and self-attention-relation losses of DistilBERT, TinyBERT and MiniLM.

Text batches follow one convention: logits are (B, C) for sequence classification and
(B, T, V) for language models, labels (B, T) aligned with the logits (the label at t is what
position t predicts) with -100 where nothing is predicted; hidden states are (B, T, D);
attention features are (B, H, T, T). Every loss here sets `reads_mask` and takes `mask=`,
(B, T) bool, True at real tokens (None: no padding). Padded positions are left out entirely:
their values change nothing, and means are over real tokens (real query rows, real keys).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from featkd.errors import ConfigError
from featkd.losses.base import (
    IGNORE_INDEX,
    LOSSES,
    Example,
    FeaturePairLoss,
    FeatureSetLoss,
    LogitLoss,
    Shape,
    TeacherLogits,
    as_ensemble,
    check_temperature,
    ensemble_log_probs,
    full_precision,
)


Divergence = Literal["forward_kl", "reverse_kl", "jsd"]
Positions = Literal["tokens", "labelled"]


# -- helpers -------------------------------------------------------------------------------


def _token_mask(name: str, mask: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """`mask` as bool, checked against the (B, T) leading dimensions of a token-level x."""
    if mask is None:
        return None
    if tuple(mask.shape) != tuple(x.shape[:2]):
        raise ConfigError(
            f"{name}: the token mask has shape {tuple(mask.shape)}, but the input {tuple(x.shape)} has "
            f"(batch, tokens) = {tuple(x.shape[:2])}. Compare features with one entry per input token."
        )
    return mask.bool()


def token_rows(name: str, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The rows of x that count: (N, D) real-token rows of a (B, T, D) x (every row when
    `mask` is None); a (B, D) x as it is (one row per sample, no tokens to leave out)."""
    if x.dim() == 2:
        return x
    if x.dim() != 3:
        raise ConfigError(f"{name}: expects (B, D) or (B, T, D) inputs, got shape {tuple(x.shape)}.")
    keep = _token_mask(name, mask, x)
    return x.reshape(-1, x.shape[-1]) if keep is None else x[keep]


def kl_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_v p_v (log p_v - log q_v) over the last dimension, from log-probabilities.

    Entries with p_v = 0 (log p_v = -inf: masked vocabulary, padded or causal keys) add 0, with
    no NaN in the value or the gradient.
    """
    p = log_p.exp()
    present = p > 0
    zero = torch.zeros((), dtype=log_p.dtype, device=log_p.device)
    diff = torch.where(present, log_p, zero) - torch.where(present, log_q, zero)
    return (p * diff).sum(-1)


def jsd_rows(log_p: torch.Tensor, log_q: torch.Tensor, beta: float) -> torch.Tensor:
    """Generalised Jensen-Shannon divergence JSD(beta)(P || Q) per row:
    beta KL(P || M) + (1 - beta) KL(Q || M), M = beta P + (1 - beta) Q, in log space."""
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
    return beta * kl_rows(log_p, log_m) + (1 - beta) * kl_rows(log_q, log_m)


def _mean_over_rows(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of (B, H, T) per-row values over heads and real query rows (all rows if no mask)."""
    if mask is None:
        return values.mean()
    rows = mask[:, None, :].expand_as(values)
    count = rows.sum()
    if count == 0:
        return values.sum() * 0.0
    return torch.where(rows, values, torch.zeros((), dtype=values.dtype, device=values.device)).sum() / count


def relation_log_probs(x: torch.Tensor, heads: int, mask: torch.Tensor | None) -> torch.Tensor:
    """log softmax(x_h x_h^T / sqrt(d_h)) per head: x (B, T, D) split into `heads` heads of
    d_h = D / heads, softmax over the real tokens (keys); (B, heads, T, T). Padded keys get
    probability exactly 0 (log-probability -inf)."""
    b, t, width = x.shape
    x = full_precision(x).reshape(b, t, heads, width // heads).transpose(1, 2)
    scores = x @ x.transpose(-1, -2) / math.sqrt(width // heads)
    if mask is not None:
        keys = mask[:, None, None, :]
        # the most negative finite number, not -inf: a sample with no real token stays finite
        scores = scores.masked_fill(~keys, torch.finfo(scores.dtype).min)
        return scores.log_softmax(-1).masked_fill(~keys, float("-inf"))
    return scores.log_softmax(-1)


def attention_kl(p_teacher: torch.Tensor, p_student: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """KL(A_t || A_s) between attention probabilities (B, H, T, T), summed over the real keys
    and averaged over heads and real query rows. Keys where the teacher gives 0 (padded,
    causal) add 0; a real key where only the student's probability underflowed to 0 counts
    with log of the smallest positive float instead of an infinite value."""
    keep = p_teacher > 0
    if mask is not None:
        keep = keep & mask[:, None, None, :]
    one = torch.ones((), dtype=p_teacher.dtype, device=p_teacher.device)
    log_t = torch.where(keep, p_teacher, one).log()
    log_s = torch.where(keep, p_student, one).clamp_min(torch.finfo(p_student.dtype).tiny).log()
    zero = torch.zeros((), dtype=p_teacher.dtype, device=p_teacher.device)
    rows = torch.where(keep, p_teacher * (log_t - log_s), zero).sum(-1)
    return _mean_over_rows(rows, mask)


def relation_kl(teacher: torch.Tensor, student: torch.Tensor, heads: int, mask: torch.Tensor | None) -> torch.Tensor:
    """KL(R_t || R_s) of the self-relations of (B, T, D) vectors split into `heads` heads,
    summed over keys, averaged over heads and real query rows."""
    with torch.no_grad():
        log_t = relation_log_probs(teacher.detach(), heads, mask)
    log_s = relation_log_probs(student, heads, mask)
    return _mean_over_rows(kl_rows(log_t, log_s), mask)


def _check_choice(name: str, key: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}: {key} is one of {', '.join(repr(c) for c in choices)}, got {value!r}.")


def _check_hidden_shapes(name: str, student_shapes: Sequence[Shape], teacher_shapes: Sequence[Shape]) -> None:
    for s, t in zip(student_shapes, teacher_shapes):
        if len(s) not in (1, 2) or len(t) != len(s):
            raise ConfigError(
                f"{name}: compares hidden states (T, D) or embeddings (D) per sample, got student {tuple(s)} and "
                f"teacher {tuple(t)}. Capture transformer layers such as 'encoder.layer.1' (`featkd inspect`)."
            )


def _check_attention_pair(name: str, s: Shape, t: Shape, port: str, why: str) -> None:
    if len(s) != 3 or len(t) != 3 or s[1] != s[2] or t[1] != t[2]:
        raise ConfigError(
            f"{name}: expects attention maps (heads, T, T) per sample, got student {tuple(s)} and teacher "
            f"{tuple(t)}. Capture '<self-attention module>:{port}', e.g. 'encoder.layer.1.attention.self:{port}'."
        )
    if s[0] != t[0]:
        raise ConfigError(
            f"{name}: {why} needs equal head counts of student and teacher, got {s[0]} student heads and "
            f"{t[0]} teacher heads. Use 'minilmv2', whose relation heads are independent of the models' heads."
        )
    if s[1:] != t[1:]:
        raise ConfigError(f"{name}: student and teacher attention maps differ in length: {tuple(s)} vs {tuple(t)}.")


# -- logit losses --------------------------------------------------------------------------


@LOSSES.register("token_kd")
class TokenKD(LogitLoss):
    """Token-level logit distillation (Hinton et al. 2015; DistilBERT, Sanh et al. 2019; MiniLLM,
    Gu et al. 2024; GKD, Agarwal et al. 2024): match the teacher's softened next-token (or
    masked-token, or class) distribution at every selected position.

    With P = softmax(t / T) (teacher; for an ensemble, the mean of the teachers' softened
    probabilities) and Q = softmax(s / T) (student) over the vocabulary at one position,
    L = T^2 * (1/N) sum over the N selected positions of D(P, Q), where D is
    `divergence`:

    - "forward_kl": KL(P || Q) = sum_v P_v log(P_v / Q_v), the KD of Hinton and DistilBERT
      (mean-seeking);
    - "reverse_kl": KL(Q || P), as MiniLLM (mode-seeking);
    - "jsd": GKD's generalised Jensen-Shannon divergence JSD(beta) = beta KL(P || M) +
      (1 - beta) KL(Q || M), M = beta P + (1 - beta) Q; beta in (0, 1), 0.5 the symmetric JSD.
      JSD(beta) / beta -> KL(P || Q) as beta -> 0 and JSD(beta) / (1 - beta) -> KL(Q || P) as
      beta -> 1, so small beta behaves as forward KL, large beta as reverse KL.

    `positions` selects the rows: "tokens", every real token (DistilBERT's default: the
    attention mask), or "labelled", only where the labels are not -100 (the masked positions
    of masked-LM: DistilBERT's `restrict_ce_to_mask`; the response tokens of a causal LM),
    which needs the labels. For (B, C) logits the rows are the samples (the batch mean; the
    token mask does not apply). With forward_kl this equals DistilBERT's
    `KLDivLoss(reduction="batchmean")` on the selected rows, times T^2. Defaults: T = 1 and
    beta = 0.5 (GKD); DistilBERT used T = 2 with weights 5 (this term), 2 (ce on the masked
    tokens) and 1 (hidden_cosine).
    """

    reads_mask = True

    def __init__(self, divergence: Divergence = "forward_kl", temperature: float = 1.0, beta: float = 0.5,
                 positions: Positions = "tokens") -> None:
        super().__init__()
        _check_choice("token_kd", "divergence", divergence, ("forward_kl", "reverse_kl", "jsd"))
        _check_choice("token_kd", "positions", positions, ("tokens", "labelled"))
        check_temperature("token_kd", temperature)
        if divergence == "jsd" and not 0 < beta < 1:
            raise ConfigError(f"token_kd: beta weighs the teacher in JSD(beta) and must be in (0, 1), got {beta} "
                              "(its limits are divergence: forward_kl and reverse_kl).")
        self.divergence, self.temperature, self.beta, self.positions = divergence, temperature, beta, positions
        self.needs_targets = positions == "labelled"  # the Distiller then asks for labels

    def _selected(self, logits: torch.Tensor, targets: torch.Tensor | None,
                  mask: torch.Tensor | None) -> torch.Tensor | None:
        """(B, T) or (B,) bool of the rows that count, or None for all of them."""
        keep = _token_mask("token_kd", mask, logits) if logits.dim() == 3 else None
        if self.positions == "labelled":
            if targets is None:
                raise ConfigError("token_kd: positions 'labelled' distils only where the labels are not -100, so it "
                                  "needs the labels: call distiller(x, targets), or use positions: tokens.")
            if tuple(targets.shape) != tuple(logits.shape[:-1]):
                raise ConfigError(f"token_kd: labels of shape {tuple(targets.shape)} do not fit logits "
                                  f"{tuple(logits.shape)}; they need shape {tuple(logits.shape[:-1])}.")
            labelled = targets != IGNORE_INDEX
            keep = labelled if keep is None else keep & labelled
        return keep

    def forward(self, student_logits: torch.Tensor, teacher_logits: TeacherLogits,
                targets: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        if student_logits.dim() not in (2, 3):
            raise ConfigError(f"token_kd: expects logits (B, C) or (B, T, V), got {tuple(student_logits.shape)}.")
        keep = self._selected(student_logits, targets, mask)
        teachers = as_ensemble(teacher_logits)
        for t in teachers:
            if t.shape != student_logits.shape:
                raise ConfigError(f"token_kd: teacher logits {tuple(t.shape)} and student logits "
                                  f"{tuple(student_logits.shape)} differ; they need the same vocabulary.")
        vocab = student_logits.shape[-1]
        if keep is None:
            rows_s = student_logits.reshape(-1, vocab)
            rows_t = [t.detach().reshape(-1, vocab) for t in teachers]
        else:
            rows_s = student_logits[keep]
            rows_t = [t.detach()[keep] for t in teachers]
        if len(rows_s) == 0:  # no position to distil in this batch
            return student_logits.sum() * 0.0
        temperature = self.temperature
        log_s = F.log_softmax(full_precision(rows_s) / temperature, dim=-1)
        log_t = ensemble_log_probs(rows_t, temperature)
        if self.divergence == "forward_kl":
            per_row = kl_rows(log_t, log_s)
        elif self.divergence == "reverse_kl":
            per_row = kl_rows(log_s, log_t)
        else:
            per_row = jsd_rows(log_t, log_s, self.beta)
        return per_row.mean() * (temperature * temperature)

    def extra_repr(self) -> str:
        beta = f", beta={self.beta}" if self.divergence == "jsd" else ""
        return f"divergence={self.divergence!r}, temperature={self.temperature}{beta}, positions={self.positions!r}"


@LOSSES.register("soft_ce")
class SoftCrossEntropy(LogitLoss):
    """TinyBERT's prediction-layer loss (Jiao et al. 2020): cross-entropy with the teacher's
    softened predictions.

    L = -(1/N) sum_i sum_v softmax(t_i / T)_v log softmax(s_i / T)_v, over the N samples of
    (B, C) logits or the N real tokens of (B, T, V) ones; no T^2 factor (TinyBERT's choice; it
    differs from KD's KL by the teacher's entropy, constant in the student). TinyBERT uses
    T = 1. For an ensemble, softmax(t / T) is the mean of the teachers' softened probabilities.
    """

    reads_mask = True

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        check_temperature("soft_ce", temperature)
        self.temperature = temperature

    def forward(self, student_logits: torch.Tensor, teacher_logits: TeacherLogits,
                targets: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        rows_s = token_rows("soft_ce", student_logits, mask)
        rows_t = [token_rows("soft_ce", t.detach(), mask) for t in as_ensemble(teacher_logits)]
        if len(rows_s) == 0:
            return student_logits.sum() * 0.0
        log_s = F.log_softmax(full_precision(rows_s) / self.temperature, dim=-1)
        p_t = ensemble_log_probs(rows_t, self.temperature).exp()
        return -(p_t * log_s).sum(-1).mean()

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


# -- hidden states -------------------------------------------------------------------------


@LOSSES.register("hidden_cosine")
class HiddenCosine(FeaturePairLoss):
    """DistilBERT's cosine embedding loss (Sanh et al. 2019): align the directions of the
    student's and the teacher's hidden states token by token.

    L = (1/N) sum over the N real tokens of (1 - cos(h_s, h_t)), the same as PyTorch's
    `CosineEmbeddingLoss` with target 1 on the real-token rows; (B, D) features give the
    batch mean. DistilBERT applies it to the last hidden states, the student having the
    teacher's width, so there is no adapter by default (pass one when widths differ).
    """

    reads_mask = True
    needs_same_shape = True
    example = Example("encoder.layer.1", "encoder.layer.3", adapter="linear", models="transformer")

    def bind(self, student_shapes: Sequence[Shape], teacher_shapes: Sequence[Shape]) -> None:
        _check_hidden_shapes("hidden_cosine", student_shapes, teacher_shapes)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        s = token_rows("hidden_cosine", full_precision(student), mask)
        t = token_rows("hidden_cosine", full_precision(teacher.detach()), mask)
        if len(s) == 0:
            return student.sum() * 0.0
        return (1 - F.cosine_similarity(s, t, dim=-1, eps=1e-8)).mean()


@LOSSES.register("hidden_mse")
class HiddenMSE(FeaturePairLoss):
    """TinyBERT's embedding-layer and hidden-state losses (Jiao et al. 2020).

    L = MSE(h_s W_h, h_t) = (1 / (N d)) sum over the N real tokens and the d teacher dims of
    ((h_s W_h)_i - (h_t)_i)^2, where W_h is the learned projection from the student's width to
    the teacher's (featkd's `linear` adapter, the default). TinyBERT applies it to the
    embedding outputs and to student layer m against teacher layer m * N / M (uniform
    mapping): pass lists, e.g. student ["embeddings", "encoder.layer.0", "encoder.layer.1"],
    teacher ["embeddings", "encoder.layer.1", "encoder.layer.3"]; each pair gets its own
    projection (TinyBERT shares one W_h across the hidden layers).
    """

    reads_mask = True
    needs_same_shape = True
    default_adapter = "linear"
    example = Example("encoder.layer.1", "encoder.layer.3", models="transformer")

    def bind(self, student_shapes: Sequence[Shape], teacher_shapes: Sequence[Shape]) -> None:
        _check_hidden_shapes("hidden_mse", student_shapes, teacher_shapes)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        s = token_rows("hidden_mse", full_precision(student), mask)
        t = token_rows("hidden_mse", full_precision(teacher.detach()), mask)
        if len(s) == 0:
            return student.sum() * 0.0
        return F.mse_loss(s, t)


# -- attention -----------------------------------------------------------------------------


@LOSSES.register("attention_mse")
class AttentionMSE(FeaturePairLoss):
    """TinyBERT's attention-based loss (Jiao et al. 2020): regress the teacher's unnormalised
    attention scores, head by head.

    L = (1/h) sum_{i=1..h} MSE(A_i^S, A_i^T), A_i = Q_i K_i^T / sqrt(d) the scaled dot products
    of head i (TinyBERT found these better than the softmax probabilities), averaged over the
    real (query, key) pairs: sum over heads and real pairs of (A^S - A^T)^2 / (h * sum_b n_b^2),
    n_b the real tokens of sample b. Capture '<self-attention module>:scores' on both sides.
    Head counts must be equal; there is no adapter.
    """

    reads_mask = True
    example = Example("encoder.layer.1.attention.self:scores", "encoder.layer.3.attention.self:scores",
                      models="transformer")

    def bind(self, student_shapes: Sequence[Shape], teacher_shapes: Sequence[Shape]) -> None:
        for s, t in zip(student_shapes, teacher_shapes):
            _check_attention_pair("attention_mse", tuple(s), tuple(t), "scores", "TinyBERT's attention loss")

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        _check_attention_pair("attention_mse", tuple(student.shape[1:]), tuple(teacher.shape[1:]), "scores",
                              "TinyBERT's attention loss")
        squared = (full_precision(student) - full_precision(teacher.detach())).pow(2)
        keep = _token_mask("attention_mse", mask, student[:, 0])
        if keep is None:
            return squared.mean()
        pairs = (keep[:, :, None] & keep[:, None, :])[:, None].expand_as(squared)
        count = pairs.sum()
        if count == 0:
            return student.sum() * 0.0
        return torch.where(pairs, squared, torch.zeros((), dtype=squared.dtype, device=squared.device)).sum() / count


@LOSSES.register("minilm")
class MiniLM(FeatureSetLoss):
    """MiniLM deep self-attention distillation (Wang et al. 2020): transfer the last layer's
    attention distributions and value relations.

    Features, on each side, of the last Transformer layer: [attention probabilities A
    (B, H, T, T) ('<self-attention module>:attention'), values V (B, T, D) (its `value`
    projection)]. With V split into the H heads (V_h of width d_h = D / H),
    VR_h = softmax(V_h V_h^T / sqrt(d_h)):

    L_AT = (1 / (H |x|)) sum_h sum_t KL(A^T_{h,t} || A^S_{h,t}),
    L_VR = (1 / (H |x|)) sum_h sum_t KL(VR^T_{h,t} || VR^S_{h,t}),

    KLs summed over the real keys, averaged over heads and the real query rows of the batch;
    the parts "attention" and "value_relation" (L = L_AT + L_VR). Student and teacher need equal
    head counts (hidden sizes may differ, d_h on each side being its own).
    """

    reads_mask = True
    example = Example(
        student=["encoder.layer.1.attention.self:attention", "encoder.layer.1.attention.self.value"],
        teacher=["encoder.layer.3.attention.self:attention", "encoder.layer.3.attention.self.value"],
        models="transformer",
    )

    @staticmethod
    def _check(student_shapes: Sequence[Shape], teacher_shapes: Sequence[Shape]) -> int:
        if len(student_shapes) != 2 or len(teacher_shapes) != 2:
            raise ConfigError(
                f"minilm: reads two features of the last layer on each side, [its attention "
                f"('<self-attention module>:attention'), its values (the `value` projection)], got "
                f"{len(student_shapes)} student and {len(teacher_shapes)} teacher features."
            )
        (s_att, s_val), (t_att, t_val) = student_shapes, teacher_shapes
        _check_attention_pair("minilm", tuple(s_att), tuple(t_att), "attention", "MiniLM")
        heads = s_att[0]
        for side, value, attention in (("student", s_val, s_att), ("teacher", t_val, t_att)):
            if len(value) != 2 or value[0] != attention[1]:
                raise ConfigError(
                    f"minilm: the {side}'s second feature must be the values (T, D) of the attention's "
                    f"{attention[1]} tokens, got {tuple(value)}. Capture the self-attention's `value` projection."
                )
            if value[1] % heads:
                raise ConfigError(f"minilm: the {side}'s value width {value[1]} is not divisible by its {heads} heads.")
        return heads

    def bind(self, student_shapes: Sequence[Shape], teacher_shapes: Sequence[Shape]) -> None:
        self._check(student_shapes, teacher_shapes)

    def forward(self, students: Sequence[torch.Tensor], teachers: Sequence[torch.Tensor],
                mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        heads = self._check([tuple(x.shape[1:]) for x in students], [tuple(x.shape[1:]) for x in teachers])
        (a_s, v_s), (a_t, v_t) = students, teachers
        keep = _token_mask("minilm", mask, v_s)
        attention = attention_kl(full_precision(a_t.detach()), full_precision(a_s), keep)
        values = relation_kl(v_t, v_s, heads, keep)
        return {"attention": attention, "value_relation": values}


@LOSSES.register("minilmv2")
class MiniLMv2(FeatureSetLoss):
    """MiniLMv2 multi-head self-attention relation distillation (Wang et al. 2021).

    Features, on each side, of one layer: [queries, keys, values] (B, T, D), the outputs of its
    self-attention's `query`, `key` and `value` projections (heads concatenated). Each is
    split into A_r relation heads (`relation_heads`, independent of either model's head
    count; d_r = D / A_r on each side) and R = softmax(A_{r} A_{r}^T / sqrt(d_r)):

    L = sum over (Q-Q, K-K, V-V) of (1 / (A_r |x|)) sum_r sum_t KL(R^T_{r,t} || R^S_{r,t}),

    KLs summed over the real keys, averaged over relation heads and the real query rows; the
    parts "qq", "kk" and "vv". The paper uses 48 relation heads for base-size teachers (the
    default) and 64 for large-size ones, distilling the last layer of base-size teachers and
    an upper-middle layer of large ones into the student's last layer.
    """

    reads_mask = True
    example = Example(
        student=[f"encoder.layer.1.attention.self.{p}" for p in ("query", "key", "value")],
        teacher=[f"encoder.layer.3.attention.self.{p}" for p in ("query", "key", "value")],
        params={"relation_heads": 4},
        models="transformer",
    )

    def __init__(self, relation_heads: int = 48) -> None:
        super().__init__()
        if relation_heads < 1:
            raise ConfigError(f"minilmv2: relation_heads must be >= 1, got {relation_heads}.")
        self.relation_heads = relation_heads

    def _check(self, student_shapes: Sequence[Shape], teacher_shapes: Sequence[Shape]) -> None:
        if len(student_shapes) != 3 or len(teacher_shapes) != 3:
            raise ConfigError(
                f"minilmv2: reads [queries, keys, values] of one layer on each side (its self-attention's "
                f"`query`, `key` and `value` projections), got {len(student_shapes)} student and "
                f"{len(teacher_shapes)} teacher features."
            )
        for side, shapes in (("student", student_shapes), ("teacher", teacher_shapes)):
            for part, shape in zip(("queries", "keys", "values"), shapes):
                if len(shape) != 2:
                    raise ConfigError(f"minilmv2: the {side}'s {part} must be (T, D) per sample, got {tuple(shape)}.")
                if shape[1] % self.relation_heads:
                    raise ConfigError(
                        f"minilmv2: the {side}'s {part} have width {shape[1]}, not divisible by relation_heads="
                        f"{self.relation_heads}; choose relation_heads dividing both models' widths."
                    )
        lengths = {shape[0] for shape in (*student_shapes, *teacher_shapes)}
        if len(lengths) > 1:
            raise ConfigError(f"minilmv2: the features differ in length: {sorted(lengths)} tokens.")

    def bind(self, student_shapes: Sequence[Shape], teacher_shapes: Sequence[Shape]) -> None:
        self._check(student_shapes, teacher_shapes)

    def forward(self, students: Sequence[torch.Tensor], teachers: Sequence[torch.Tensor],
                mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        self._check([tuple(x.shape[1:]) for x in students], [tuple(x.shape[1:]) for x in teachers])
        keep = _token_mask("minilmv2", mask, students[0])
        return {name: relation_kl(t, s, self.relation_heads, keep)
                for name, s, t in zip(("qq", "kk", "vv"), students, teachers)}

    def extra_repr(self) -> str:
        return f"relation_heads={self.relation_heads}"
