"""featkd: feature-based and relation-based knowledge distillation for PyTorch."""

import importlib.util

try:
    from featkd import losses  # registers the loss zoo
except ImportError:
    if importlib.util.find_spec("featkd.losses") is not None:
        raise
    # the loss zoo is the top-level losses/ folder, which only the install maps to featkd.losses
    raise ImportError("featkd is not installed: run `pip install -e .` in the repository root (its loss zoo, "
                      "losses/, becomes featkd.losses only when installed).") from None
from featkd.adapters import ADAPTERS, build_adapter
from featkd.capture import FeatureCapture, list_modules
from featkd.config import Config, load_config
from featkd.data import DATASETS, DataBundle, build_data
from featkd.distiller import Distiller, DistillOutput, Term
from featkd.errors import FeatkdError
from featkd.evaluation import evaluate
from featkd.losses import LOSSES, DistillLoss
from featkd.models import MODELS, build_model
from featkd.optim import OPTIMIZERS, SCHEDULERS
from featkd.registry import Registry
from featkd.summary import RunResult
from featkd.trainer import train

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
