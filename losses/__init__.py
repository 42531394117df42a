"""The loss zoo. Importing this package registers every built-in loss in `LOSSES`.

base.py      the kinds a loss subclasses: LogitLoss, FeaturePairLoss, FeatureSetLoss
logit.py     ce, kd, logit_mse, dkd, dist (kd, dkd, dist: `standardize` for logit standardization)
logit_normalized.py  skd, nkd
logit_adaptive.py    mlkd, ctkd, wkd (and the Sinkhorn and CKA helpers)
dist_plus.py dist_feature (DIST+'s feature relations)
feature.py   fitnet, at, nst, vid, ft, ab, fsp
relation.py  rkd, sp, cc, pkt
crd.py       crd (with its memory bank and dataset wrapper)
channel.py   cwd, chsim, affinity, ktaad
feature_regression.py  ofd, pad_l2
svd.py       kdsvd
review.py    reviewkd
class_activation.py  catkd
classifier_reuse.py  simkd, srd (through the teacher's classifier)
self_supervised.py   sskd (with RotatedCopies)
heterogeneous.py     ofa
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
    standardize_logits,
)
from featkd.losses.channel import (
    AffinityDistillation,
    ChannelSimilarity,
    ChannelWiseDistillation,
    KnowledgeAdaptation,
)
from featkd.losses.class_activation import ClassAttentionTransfer, class_activation_maps
from featkd.losses.classifier_reuse import ReusedTeacherClassifier, SoftmaxRegression
from featkd.losses.crd import CRDLoss, WithIndex
from featkd.losses.deit import DeiTHardDistillation, DeiTSoftDistillation, DistillationTokenLoss
from featkd.losses.dist_plus import DISTFeatureRelation
from featkd.losses.feature_regression import PADL2, OverhaulDistillation, gaussian_negative_mean
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
from featkd.losses.heterogeneous import OFALoss, ofa_loss
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
from featkd.losses.logit_adaptive import CTKDLoss, MLKDLoss, WKDLoss, cka_distances, sinkhorn_cost
from featkd.losses.logit_normalized import NormalizedKD, SphericalKD
from featkd.losses.review import AttentionBasedFusion, ReviewKD, hierarchical_context_loss
from featkd.losses.self_supervised import RotatedCopies, SSKDLoss
from featkd.losses.svd import KDSVD, top_right_singular_vectors
from featkd.losses.relation import (
    CorrelationCongruence,
    ProbabilisticKT,
    RKDLoss,
    SimilarityPreserving,
    rkd_angle,
    rkd_distance,
)

__all__ = [
    "ActivationBoundaries",
    "AffinityDistillation",
    "AttentionBasedFusion",
    "AttentionMSE",
    "AttentionTransfer",
    "CRDLoss",
    "CTKDLoss",
    "ChannelSimilarity",
    "ChannelWiseDistillation",
    "ClassAttentionTransfer",
    "CorrelationCongruence",
    "CrossEntropy",
    "DISTFeatureRelation",
    "DISTLoss",
    "DKDLoss",
    "DeiTHardDistillation",
    "DeiTSoftDistillation",
    "DistillLoss",
    "DistillationTokenLoss",
    "Example",
    "FSPLoss",
    "FactorTransfer",
    "FeaturePairLoss",
    "FeatureSetLoss",
    "FitNetHint",
    "HiddenCosine",
    "HiddenMSE",
    "KDLoss",
    "KDSVD",
    "KnowledgeAdaptation",
    "LOSSES",
    "LogitLoss",
    "LogitMSE",
    "MLKDLoss",
    "MiniLM",
    "MiniLMv2",
    "NSTLoss",
    "NormalizedKD",
    "OFALoss",
    "OverhaulDistillation",
    "PADL2",
    "PretrainStage",
    "ProbabilisticKT",
    "RKDLoss",
    "ReusedTeacherClassifier",
    "ReviewKD",
    "RotatedCopies",
    "SSKDLoss",
    "SimilarityPreserving",
    "SoftCrossEntropy",
    "SoftmaxRegression",
    "SphericalKD",
    "TermInputs",
    "TokenKD",
    "VIDLoss",
    "WKDLoss",
    "WithIndex",
    "as_ensemble",
    "attention_map",
    "cka_distances",
    "class_activation_maps",
    "ensemble_log_probs",
    "ensemble_mean_logits",
    "fsp_matrix",
    "gaussian_negative_mean",
    "hierarchical_context_loss",
    "ofa_loss",
    "rkd_angle",
    "rkd_distance",
    "sinkhorn_cost",
    "standardize_logits",
    "top_right_singular_vectors",
]
