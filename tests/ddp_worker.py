"""Run under torchrun by test_ddp.py: DDP-train a student with featkd's API, save each rank's weights."""

import sys
from pathlib import Path

import torch

from featkd import Distiller, Term, build_data, build_model, distributed
from featkd.config import load_config
from featkd.engine import StageSettings, fit
from featkd.logging import NullLogger
from featkd.runtime import seed_everything
from featkd.data import make_loaders

out = Path(sys.argv[1])
device = distributed.setup("cpu")
seed_everything(0)
config = load_config("configs/quickstart.yaml", ["data.args.augment=false", "data.batch_size=32", "train.epochs=2"])
data = build_data("digits", {"augment": False})
teacher = build_model("cnn_small", 10, (1, 8, 8))
student = build_model("cnn_tiny", 10, (1, 8, 8))  # with BatchNorm: each rank's own statistics
distiller = Distiller(teacher, student, [Term("ce", 0.1), Term("kd", 0.9), Term("rkd", student="fc:in", teacher="fc:in")],
                      example_input=data.train.inputs[:8])
train_loader, test_loader = make_loaders(distiller.prepare_data(data.train), data.test, config.data, seed=0)
fit(distiller, train_loader, test_loader, StageSettings("distill", config.train, progress=False), device, NullLogger())
torch.save({k: v.clone() for k, v in distiller.state_dict().items()}, out / f"rank{distributed.rank()}.pt")
distributed.teardown()
