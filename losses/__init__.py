"""The loss zoo. Importing this package registers every built-in loss in `LOSSES`.

base.py      the kinds a loss subclasses: LogitLoss, FeaturePairLoss, FeatureSetLoss
logit.py     ce, kd, logit_mse, dkd, dist
feature.py   fitnet, at, nst, vid, ft, ab, fsp
relation.py  rkd, sp, cc, pkt
crd.py       crd (with its memory bank and dataset wrapper)
language.py  token_kd, soft_ce, hidden_cosine, hidden_mse, attention_mse, minilm, minilmv2
"""

from featkd.losses.base import (
    LOSSES,
    DistillLoss,
    Example,
    FeaturePairLoss,
    FeatureSetLoss,
    LogitLoss,
    PretrainStage,
    TermInputs,
    as_ensemble,
    ensemble_log_probs,
    ensemble_mean_logits,
)
from featkd.losses.crd import CRDLoss, WithIndex
from featkd.losses.deit import DeiTHardDistillation, DeiTSoftDistillation, DistillationTokenLoss
from featkd.losses.feature import (
    ActivationBoundaries,
    AttentionTransfer,
    FactorTransfer,
    FitNetHint,
    FSPLoss,
    NSTLoss,
    VIDLoss,
    attention_map,
    fsp_matrix,
)
from featkd.losses.language import (
    AttentionMSE,
    HiddenCosine,
    HiddenMSE,
    MiniLM,
    MiniLMv2,
    SoftCrossEntropy,
    TokenKD,
)
from featkd.losses.logit import CrossEntropy, DISTLoss, DKDLoss, KDLoss, LogitMSE
from featkd.losses.relation import (
    CorrelationCongruence,
    ProbabilisticKT,
    RKDLoss,
    SimilarityPreserving,
    rkd_angle,
    rkd_distance,
)

__all__ = [
    "LOSSES",
    "ActivationBoundaries",
    "AttentionMSE",
    "AttentionTransfer",
    "CRDLoss",
    "CorrelationCongruence",
    "CrossEntropy",
    "DISTLoss",
    "DKDLoss",
    "DistillLoss",
    "Example",
    "FSPLoss",
    "FactorTransfer",
    "FeaturePairLoss",
    "FeatureSetLoss",
    "FitNetHint",
    "HiddenCosine",
    "HiddenMSE",
    "KDLoss",
    "LogitLoss",
    "LogitMSE",
    "MiniLM",
    "MiniLMv2",
    "NSTLoss",
    "PretrainStage",
    "ProbabilisticKT",
    "RKDLoss",
    "SimilarityPreserving",
    "SoftCrossEntropy",
    "TermInputs",
    "TokenKD",
    "VIDLoss",
    "WithIndex",
    "as_ensemble",
    "attention_map",
    "ensemble_log_probs",
    "ensemble_mean_logits",
    "fsp_matrix",
    "rkd_angle",
    "rkd_distance",
]
