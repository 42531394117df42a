"""Run under torchrun by test_ddp.py: one epoch of CRD on 2 processes; each rank saves its memory banks."""

import sys
from pathlib import Path

import torch

from featkd import Distiller, Term, build_data, build_model, distributed
from featkd.config import DataConfig, TrainConfig
from featkd.data import make_loaders
from featkd.engine import StageSettings, fit
from featkd.logging import NullLogger
from featkd.runtime import seed_everything

out, gather = Path(sys.argv[1]), sys.argv[2] == "gather"
device = distributed.setup("cpu")
seed_everything(0)
data = build_data("synthetic", {"num_classes": 4, "input_shape": (1, 8, 8), "train_size": 256, "test_size": 32})
teacher, student = build_model("cnn_small", 4, (1, 8, 8)), build_model("cnn_tiny", 4, (1, 8, 8))
terms = [Term("ce"), Term("crd", student="fc:in", teacher="fc:in", num_negatives=64, gather=gather)]
distiller = Distiller(teacher, student, terms, example_input=data.train.inputs[:8])
train_set = distiller.prepare_data(data.train)
initial = {k: v.clone() for k, v in distiller.losses["crd"].state_dict().items() if k.startswith("memory")}
train_loader, test_loader = make_loaders(train_set, data.test, DataConfig(batch_size=32), seed=0)
fit(distiller, train_loader, test_loader, StageSettings("distill", TrainConfig(epochs=1), progress=False), device,
    NullLogger())
final = {k: v.clone() for k, v in distiller.losses["crd"].state_dict().items()}
torch.save({"initial": initial, "final": final}, out / f"rank{distributed.rank()}.pt")
distributed.teardown()
