"""featkd: feature-based and relation-based knowledge distillation for PyTorch."""

from featkd import losses  # registers the loss zoo
from featkd.adapters import ADAPTERS, build_adapter
from featkd.capture import FeatureCapture, list_modules
from featkd.config import Config, load_config
from featkd.data import DATASETS, DataBundle, build_data
from featkd.distiller import Distiller, DistillOutput, Term
from featkd.errors import FeatkdError
from featkd.losses import LOSSES, DistillLoss
from featkd.models import MODELS, build_model
from featkd.optim import OPTIMIZERS, SCHEDULERS
from featkd.registry import Registry
from featkd.trainer import RunResult, evaluate, train

__version__ = "0.1.0"

__all__ = [
    "ADAPTERS",
    "DATASETS",
    "LOSSES",
    "MODELS",
    "OPTIMIZERS",
    "SCHEDULERS",
    "Config",
    "DataBundle",
    "DistillLoss",
    "DistillOutput",
    "Distiller",
    "FeatkdError",
    "FeatureCapture",
    "Registry",
    "RunResult",
    "Term",
    "build_adapter",
    "build_data",
    "build_model",
    "evaluate",
    "list_modules",
    "load_config",
    "losses",
    "train",
]
