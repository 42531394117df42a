"""The loss zoo. Importing this package registers every built-in loss in `LOSSES`."""

from featkd.losses.base import LOSSES, DistillLoss, as_ensemble, ensemble_log_probs, ensemble_mean_logits
from featkd.losses.feature import AttentionTransfer, FitNetHint, attention_map
from featkd.losses.logit import CrossEntropy, KDLoss
from featkd.losses.relation import RKDLoss, rkd_angle, rkd_distance

__all__ = [
    "LOSSES",
    "AttentionTransfer",
    "CrossEntropy",
    "DistillLoss",
    "FitNetHint",
    "KDLoss",
    "RKDLoss",
    "as_ensemble",
    "attention_map",
    "ensemble_log_probs",
    "ensemble_mean_logits",
    "rkd_angle",
    "rkd_distance",
]
