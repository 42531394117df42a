"""The loss zoo. Importing this package registers every built-in loss in `LOSSES`.

base.py      the kinds a loss subclasses: LogitLoss, FeaturePairLoss, FeatureSetLoss
logit.py     ce, kd, logit_mse, dkd, dist
feature.py   fitnet, at, nst, vid, ft, ab, fsp
relation.py  rkd, sp, cc, pkt
crd.py       crd (with its memory bank and dataset wrapper)
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
    "KDLoss",
    "LogitLoss",
    "LogitMSE",
    "NSTLoss",
    "PretrainStage",
    "ProbabilisticKT",
    "RKDLoss",
    "SimilarityPreserving",
    "TermInputs",
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
