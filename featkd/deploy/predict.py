"""Run an exported student (`featkd export`) on new inputs, with ONNX Runtime or TorchScript and
the tokenizer saved beside it; nothing of featkd's training code is imported.

    featkd predict runs/quickstart-.../export-onnx images.npy
    featkd predict runs/nlp-kd-.../export-onnx reviews.txt --top 2

In Python:

    from featkd.deploy.predict import Predictor
    predictor = Predictor("runs/nlp-kd-.../export-onnx")
    predictor.predict_texts(["the plot was not dull , but the ending was awful ."])

Tensor inputs are a `.npy` file of samples shaped as the model card's input (one sample, or
a batch of them), preprocessed as the card says; text inputs are a `.txt` file of one text
per line, tokenised with the export's tokenizer.
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from featkd.errors import ExportError

CARD, PARITY = "model_card.json", "parity.json"
INSTALL = 'pip install "featkd[deploy]"'


def require(*modules: str) -> None:
    """Fail clearly when an optional dependency of exporting or running exports is missing."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ExportError(f"this needs {', '.join(missing)}, an optional dependency: {INSTALL}.")


class Runner:
    """An exported model run on numpy inputs (a dict by input name); `logits` gives (B, C)."""

    def __init__(self, folder: Path | str, card: Mapping[str, Any], threads: int | None = None) -> None:
        self.folder, self.card = Path(folder), card
        self.names: list[str] = [i["name"] for i in card["inputs"]]
        path = self.folder / card["file"]
        if card["format"] == "onnx":
            require("onnxruntime")
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.log_severity_level = 3
            if threads is not None:
                options.intra_op_num_threads = threads
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            self.module = None
        else:
            import torch

            self.session = None
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated, and still what runs it
                self.module = torch.jit.load(str(path), map_location="cpu").eval()

    def logits(self, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        if self.session is not None:
            return self.session.run(["logits"], {n: inputs[n] for n in self.names})[0]
        import torch

        with torch.inference_mode():
            tensors = {n: torch.from_numpy(np.asarray(inputs[n])) for n in self.names}
            out = self.module(**tensors) if self.card["text"] else self.module(tensors[self.names[0]])
        return out.numpy()


@dataclass
class Prediction:
    """One input's predicted class, its probability, and the `top` classes with theirs."""

    index: int
    label: str
    probability: float
    top: list[tuple[str, float]]


class Predictor:
    """An export folder ready to classify inputs."""

    def __init__(self, folder: str | Path, threads: int | None = None) -> None:
        self.folder = Path(folder).expanduser()
        card_path = self.folder / CARD
        if not card_path.is_file():
            raise ExportError(f"{str(self.folder)!r} is not a featkd export (no {CARD}); make one with "
                              "`featkd export RUN_DIR`.")
        self.card = json.loads(card_path.read_text())
        if not (self.folder / self.card["file"]).is_file():
            raise ExportError(f"the export {str(self.folder)!r} lacks its model file {self.card['file']!r}.")
        self.runner = Runner(self.folder, self.card, threads)
        self.classes: list[str] = list(self.card["classes"])
        self.tokenizer = None
        if self.card["text"]:
            from featkd.text import load_tokenizer

            self.tokenizer = load_tokenizer(str(self.folder / "tokenizer"))

    def predict_file(self, path: str | Path, top: int = 1) -> list[Prediction]:
        """Predictions for a `.txt` file (one text per line) or a `.npy` array of samples."""
        path = Path(path).expanduser()
        if not path.is_file():
            raise ExportError(f"no input file at {str(path)!r}.")
        if self.card["text"]:
            if path.suffix.lower() not in (".txt", ".text"):
                raise ExportError(f"this model reads text: give a .txt file of one text per line, not {path.name!r}.")
            texts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
            if not texts:
                raise ExportError(f"{str(path)!r} holds no text.")
            return self.predict_texts(texts, top)
        if path.suffix.lower() != ".npy":
            raise ExportError(f"this model reads tensors: give a .npy file of samples shaped "
                              f"{self.card['inputs'][0]['shape'][1:]}, not {path.name!r}.")
        return self.predict_array(np.load(path), top)

    def predict_texts(self, texts: Sequence[str], top: int = 1) -> list[Prediction]:
        if self.tokenizer is None:
            raise ExportError("this model reads tensors, not text; use predict_array.")
        max_length = self.card["preprocessing"]["max_length"]
        encoded = self.tokenizer.encode_batch(list(texts), None, max_length)
        longest = max(len(e["input_ids"]) for e in encoded)
        inputs: dict[str, np.ndarray] = {}
        for name in self.runner.names:
            fill = self.card["preprocessing"]["pad_id"] if name == "input_ids" else 0
            rows = np.full((len(encoded), longest), fill, dtype=np.int64)
            for row, e in enumerate(encoded):
                values = [1] * len(e["input_ids"]) if name == "attention_mask" else e.get(name, [0] * len(e["input_ids"]))
                rows[row, : len(values)] = values
            inputs[name] = rows
        return self._predictions(self.runner.logits(inputs), top)

    def predict_array(self, x: np.ndarray, top: int = 1) -> list[Prediction]:
        shape = list(self.card["inputs"][0]["shape"][1:])
        x = np.asarray(x, dtype=np.float32)
        if list(x.shape) == shape:
            x = x[None]
        if list(x.shape[1:]) != shape:
            raise ExportError(f"inputs of shape {list(x.shape)} do not fit the model, which takes samples of shape "
                              f"{shape} (one, or a batch of them).")
        return self._predictions(self.runner.logits({self.runner.names[0]: x}), top)

    def _predictions(self, logits: np.ndarray, top: int) -> list[Prediction]:
        shifted = logits - logits.max(axis=1, keepdims=True)
        probabilities = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
        out = []
        for i, p in enumerate(probabilities):
            order = np.argsort(-p)[: max(1, top)]
            ranked = [(self.classes[c], float(p[c])) for c in order]
            out.append(Prediction(i, ranked[0][0], ranked[0][1], ranked))
        return out
