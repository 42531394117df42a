"""Export a trained student to ONNX or TorchScript, optionally quantized to int8, with a model
card and a parity report.

    featkd export RUN_DIR --format onnx --quantize int8

An export folder holds the model file, `model_card.md` and `model_card.json` (architecture,
inputs and preprocessing, classes, measured size and latency, how the student was distilled,
the config's hash), `parity.json` (the exported model against the PyTorch student on every
test sample) and, for text, the tokenizer. Only the student is exported: adapters, loss state
and teachers never are. `featkd.deploy.predict` runs an export with ONNX Runtime (or
TorchScript) and the tokenizer, without featkd's training code.

int8 comes from ONNX Runtime's quantizer, on the exported ONNX graph: dynamic quantization
(weights int8, activations quantized on the fly) for models of linear, recurrent and
attention layers, and static quantization in QDQ form with per-channel weights, calibrated on
training inputs, for models with convolutions (dynamic quantization does not cover them).
ONNX Runtime is the runtime the export is deployed with, so what is measured is what runs;
PyTorch's eager quantization (`torch.ao.quantization`) is deprecated in favour of torchao,
whose CPU int8 paths target `torch.compile` rather than a portable file.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from featkd.capture import call_model, eval_mode
from featkd.checkpoint import load_checkpoint
from featkd.config import Config, validate
from featkd.data import DataBundle, build_data, collate_of
from featkd.errors import CheckpointError, ExportError
from featkd.heads import HeadedStudent
from featkd.deploy.predict import CARD, PARITY, Runner, require
from featkd.models import count_parameters, model_from_checkpoint

FORMATS = ("onnx", "torchscript")
QUANTIZATIONS = ("int8",)
#: the largest |logit| difference an fp32 export may show against the PyTorch student
FP32_TOLERANCE = 1e-4
#: training inputs that calibrate static int8 activations
CALIBRATION_SAMPLES = 256
MODEL_FILES = {"onnx": "model.onnx", "torchscript": "model.pt"}


# -- what is exported -------------------------------------------------------------------------


@dataclass
class Student:
    """A trained student ready to export: the model (CPU, eval mode), its checkpoint, the run's
    config and data, and the run folder when it came from one."""

    model: nn.Module
    payload: dict[str, Any]
    checkpoint: Path
    config: Config
    bundle: DataBundle
    run_dir: Path | None = None

    @property
    def input_names(self) -> list[str]:
        x = self.example(2)
        return list(x) if isinstance(x, dict) else ["input"]

    def example(self, batch: int) -> Any:
        """The first `batch` test inputs (CPU), batched as the loader batches them."""
        from featkd.deploy.footprint import first_inputs

        return first_inputs(self.bundle.test, batch)


def load_student(source: str | Path) -> Student:
    """The student of a finished run folder (its final stage's last checkpoint), or of a featkd
    checkpoint file."""
    path = Path(source).expanduser()
    run_dir = None
    if path.is_dir():
        run_dir = path
        path = _final_checkpoint(run_dir)
    elif not path.is_file():
        raise ExportError(f"{str(source)!r} does not exist; give a run folder (runs/<name>-<time>) or a checkpoint "
                          "file (runs/<name>-<time>/checkpoints/last.pt).")
    try:
        payload = load_checkpoint(path)
    except CheckpointError as exc:
        raise ExportError(str(exc)) from None
    if "config" not in payload or "model_name" not in payload:
        raise ExportError(f"{str(path)!r} holds no model record and config: it was not written by a featkd run, or it "
                          "is a stage's state rather than a model.")
    config = validate(payload["config"])
    model = model_from_checkpoint(payload).eval()
    bundle = build_data(config.data.name, config.data.args)
    return Student(model, payload, path, config, bundle, run_dir)


def _final_checkpoint(run_dir: Path) -> Path:
    """The final stage's last checkpoint of a run folder whose final stage is done."""
    from featkd.config import load_config
    from featkd.stages import plan_stages

    if not (run_dir / "config.yaml").is_file() or not (run_dir / "state.json").is_file():
        raise ExportError(f"{str(run_dir)!r} is not a featkd run folder (no config.yaml and state.json); give a run "
                          "folder or a checkpoint file.")
    final = plan_stages(load_config(run_dir / "config.yaml")).final.name
    stage = json.loads((run_dir / "state.json").read_text())["stages"].get(final, {})
    if stage.get("status") not in ("done", "cached"):
        epochs = ""
        if (run_dir / "checkpoints" / "last.pt").is_file():
            epoch = load_checkpoint(run_dir / "checkpoints" / "last.pt").get("epoch")
            epochs = f" (its last checkpoint is from epoch {epoch})" if epoch is not None else ""
        raise ExportError(
            f"the run {str(run_dir)!r} has not finished: its final stage {final!r} is "
            f"{stage.get('status', 'not started')}{epochs}. Finish it with `featkd train --resume {run_dir}`, or "
            f"export a checkpoint explicitly: `featkd export {run_dir / 'checkpoints' / 'last.pt'}`.")
    checkpoint = run_dir / "checkpoints" / "last.pt"
    if not checkpoint.is_file():
        raise ExportError(f"{str(checkpoint)!r} is missing, although the run finished; was the folder pruned?")
    return checkpoint


# -- exporting ---------------------------------------------------------------------------------


def export_onnx(model: nn.Module, example: Any, path: Path) -> str:
    """`_export_onnx` on the model in eval mode, which the exporters may leave in training mode."""
    with eval_mode(model):
        return _export_onnx(model, example, path)


def export_torchscript(model: nn.Module, example: Any, path: Path) -> str:
    """`_export_torchscript` on the model in eval mode."""
    with eval_mode(model):
        return _export_torchscript(model, example, path)


def _export_onnx(model: nn.Module, example: Any, path: Path) -> str:
    """Write `model` as ONNX with a dynamic batch (and sequence, for text) axis; returns which
    exporter succeeded. torch.export's exporter is tried first; models it cannot capture
    (data-dependent shapes, such as packed LSTM sequences) go through the TorchScript-based
    one. When neither can, the error names the smallest module that fails."""
    require("onnx", "onnxscript")
    names = list(example) if isinstance(example, dict) else ["input"]
    args, kwargs = ((), dict(example)) if isinstance(example, dict) else ((example,), {})
    batch = torch.export.Dim("batch")
    if isinstance(example, dict):
        sequence = torch.export.Dim("sequence")
        shapes: Any = {k: {0: batch, 1: sequence} if v.dim() > 1 else {0: batch} for k, v in example.items()}
    else:
        shapes = ({0: batch},)
    failures = []
    with warnings.catch_warnings(), _quiet_exporter():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model, args, str(path), kwargs=kwargs, dynamo=True, dynamic_shapes=shapes,
                              input_names=names, output_names=["logits"], verbose=False, external_data=False)
            return "torch.export"
        except Exception as exc:  # the exporters raise many kinds
            failures.append(f"torch.export: {_first_line(exc)}")
        axes = {n: ({0: "batch", 1: "sequence"} if isinstance(example, dict) and example[n].dim() > 1 else {0: "batch"})
                for n in names}
        axes["logits"] = {0: "batch"}
        ordered = tuple(example[n] for n in names) if isinstance(example, dict) else args
        try:
            torch.onnx.export(_Positional(model, names) if kwargs else model, ordered, str(path), dynamo=False,
                              input_names=names, output_names=["logits"], dynamic_axes=axes)
            return "torchscript"
        except Exception as exc:
            failures.append(f"TorchScript-based: {_first_line(exc)}")
    culprit = _failing_module(model, example)
    where = f" The smallest module that does not export is {culprit}." if culprit else ""
    raise ExportError(f"ONNX cannot export this model.{where} " + " ".join(failures)
                      + " Replace that operation, or export with --format torchscript.")


def _export_torchscript(model: nn.Module, example: Any, path: Path) -> str:
    """Write `model` traced to TorchScript (inputs by keyword for text)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if isinstance(example, dict):
                traced = torch.jit.trace(model, example_kwarg_inputs=dict(example), strict=False)
            else:
                traced = torch.jit.trace(model, example, strict=False)
            torch.jit.save(traced, str(path))
        except Exception as exc:
            raise ExportError(f"TorchScript cannot trace this model: {_first_line(exc)}. Try --format onnx.") from None
    return "torch.jit.trace"


class _Positional(nn.Module):
    """A text model called with positional inputs (the TorchScript-based ONNX exporter passes
    inputs by position; the model takes them by keyword)."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.model(**dict(zip(self.names, inputs)))


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporters print progress and native warnings; keep them out of featkd's output
    (errors still come as exceptions, whose messages featkd reports)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    try:
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            os.dup2(null.fileno(), 1)
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = next((line for line in lines if "not supported" in line or "Unsupported" in line), lines[0] if lines else "")
    return f"{type(exc).__name__}: {text[:300]}"


def _failing_module(model: nn.Module, example: Any, limit: int = 300) -> str | None:
    """The deepest module whose own export fails (`name` (Type)), trying each module on the
    inputs it received in one forward of `example`, deepest first."""
    recorded: dict[str, tuple] = {}
    handles = []
    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_pre_hook(
                lambda m, args, name=name: recorded.setdefault(name, args)))
    try:
        with torch.no_grad():
            call_model(model, example)
    except Exception:
        return None
    finally:
        for handle in handles:
            handle.remove()
    modules = dict(model.named_modules())
    order = sorted(recorded, key=lambda n: -n.count("."))[:limit]
    with warnings.catch_warnings(), _quiet_exporter(), tempfile.TemporaryDirectory() as tmp:
        warnings.simplefilter("ignore")
        for name in order:
            args = recorded[name]
            if not args or not all(isinstance(a, torch.Tensor) for a in args):
                continue
            try:
                torch.onnx.export(modules[name], args, os.path.join(tmp, "m.onnx"), dynamo=False)
            except Exception:
                return f"{name!r} ({type(modules[name]).__name__})"
    return None




# -- int8 -----------------------------------------------------------------------------------------

#: compute operators whose int8 form the report counts
_COMPUTE_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm", "LSTM", "GRU", "Attention")
_INT8_OPS = {"ConvInteger": "Conv", "MatMulInteger": "MatMul", "QLinearConv": "Conv", "QLinearMatMul": "MatMul",
             "DynamicQuantizeLSTM": "LSTM", "QAttention": "Attention", "QGemm": "Gemm"}


@dataclass
class Quantization:
    """What int8 quantization did: the method, and per operator type how many nodes run in int8
    and how many stayed in fp32 (operators ONNX Runtime's quantizer does not cover)."""

    method: str
    int8: dict[str, int] = field(default_factory=dict)
    fp32: dict[str, int] = field(default_factory=dict)

    def describe(self) -> str:
        done = ", ".join(f"{op} x{n}" for op, n in sorted(self.int8.items())) or "nothing"
        text = f"{self.method}: int8 {done}"
        if self.fp32:
            text += "; left in fp32 (not covered by the quantizer): " + ", ".join(
                f"{op} x{n}" for op, n in sorted(self.fp32.items()))
        return text


def quantize_onnx(fp32_path: Path, out_path: Path, student: Student, calibration: int = CALIBRATION_SAMPLES
                  ) -> Quantization:
    """int8 with ONNX Runtime's quantizer: static QDQ, per-channel, calibrated on the first
    `calibration` training inputs, where the model has convolutions; dynamic otherwise."""
    require("onnxruntime")
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, \
        quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    has_conv = any(isinstance(m, nn.modules.conv._ConvNd) for m in student.model.modules())
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(), _quiet_exporter():
        warnings.simplefilter("ignore")
        source = Path(tmp) / "prepared.onnx"
        try:
            quant_pre_process(str(fp32_path), str(source), skip_symbolic_shape=True)
        except Exception:  # the optional graph clean-up failed: quantize the graph as exported
            source = fp32_path
        try:
            if has_conv:
                inputs = _calibration_batches(student, calibration)

                class Reader(CalibrationDataReader):
                    def __init__(self) -> None:
                        self.batches = iter(inputs)

                    def get_next(self) -> dict[str, np.ndarray] | None:
                        return next(self.batches, None)

                quantize_static(str(source), str(out_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
                method = f"static int8 (QDQ, per-channel weights, calibrated on {calibration} training inputs)"
            else:
                quantize_dynamic(str(source), str(out_path), weight_type=QuantType.QInt8)
                method = "dynamic int8 (int8 weights, activations quantized per call)"
        except Exception as exc:
            raise ExportError(f"ONNX Runtime's quantizer failed on this model: {_first_line(exc)}. The fp32 export "
                              "works: export without --quantize.") from None
    return _quantized_ops(out_path, method)


def _calibration_batches(student: Student, samples: int, batch: int = 32) -> list[dict[str, np.ndarray]]:
    """The first `samples` training inputs in batches; a training augmentation draws from a
    fixed seed, so that the same run always calibrates (and quantizes) the same way."""
    train = student.bundle.train
    collate = collate_of(train) or torch.utils.data.default_collate
    count = min(samples, len(train))
    out = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for start in range(0, count, batch):
            x = collate([train[i] for i in range(start, min(count, start + batch))])[0]
            out.append(numpy_inputs(x, student.input_names))
    return out


def _quantized_ops(path: Path, method: str) -> Quantization:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    report = Quantization(method)
    for node in graph.node:
        if node.op_type in _INT8_OPS:
            op = _INT8_OPS[node.op_type]
            report.int8[op] = report.int8.get(op, 0) + 1
        elif node.op_type in _COMPUTE_OPS:
            where = report.int8 if any(i in dequantized for i in node.input) else report.fp32
            where[node.op_type] = where.get(node.op_type, 0) + 1
    return report


# -- running an export -------------------------------------------------------------------------


def numpy_inputs(x: Any, names: list[str]) -> dict[str, np.ndarray]:
    if isinstance(x, dict):
        return {n: x[n].cpu().numpy().astype(np.int64) for n in names}
    return {names[0]: x.cpu().numpy().astype(np.float32)}


@dataclass
class TestOutputs:
    """The PyTorch student and an export on every test sample, in the test set's order."""

    reference: np.ndarray  # (N, C) the PyTorch student's logits
    exported: np.ndarray  # (N, C) the export's logits
    labels: np.ndarray  # (N,)

    def correct(self) -> np.ndarray:
        """(N,) 1 where the export's top-1 is the label (what `featkd.stats` resamples)."""
        return (self.exported.argmax(1) == self.labels).astype(np.float64)


def test_outputs(student: Student, runner: Runner) -> TestOutputs:
    """Run the PyTorch student and the export over the test set."""
    from featkd.data import eval_loader

    loader = eval_loader(student.bundle.test, student.config.data)
    reference, exported, labels = [], [], []
    with eval_mode(student.model), torch.inference_mode():
        for batch in loader:
            x = batch[0]
            logits = call_model(student.model, x)
            if logits.dim() != 2:
                raise ExportError("only classifiers (one logit vector per sample) are exported for now; this model "
                                  f"gives outputs of shape {tuple(logits.shape)}.")
            reference.append(logits.float().numpy())
            exported.append(runner.logits(numpy_inputs(x, runner.names)))
            labels.append(batch[1].numpy())
    return TestOutputs(np.concatenate(reference), np.concatenate(exported), np.concatenate(labels))


def parity(out: TestOutputs, quantized: bool) -> dict[str, Any]:
    """The export against the PyTorch student on every test sample: the largest |logit|
    difference, how often their top-1 agree, and each one's top-1."""
    torch_top1, export_top1 = out.reference.argmax(1), out.exported.argmax(1)
    report = {"samples": len(out.labels),
              "max_abs_logit_difference": float(np.abs(out.reference - out.exported).max(initial=0.0)),
              "top1_agreement": 100.0 * float((torch_top1 == export_top1).mean()),
              "pytorch_top1": 100.0 * float((torch_top1 == out.labels).mean()),
              "exported_top1": 100.0 * float(out.correct().mean()), "quantized": quantized}
    if not quantized:
        report.update(tolerance=FP32_TOLERANCE, passed=report["max_abs_logit_difference"] < FP32_TOLERANCE)
    return report


# -- the export folder ---------------------------------------------------------------------------


@dataclass
class ExportResult:
    folder: Path
    card: dict[str, Any]
    parity: dict[str, Any]
    #: the PyTorch student and the export on every test sample (what the parity report sums up)
    outputs: TestOutputs

    @property
    def passed(self) -> bool:
        return bool(self.parity.get("passed", True))


def export(source: str | Path, format: str = "onnx", quantize: str | None = None, out: str | Path | None = None,
           overwrite: bool = False, measure: bool = True, threads: int | None = None) -> ExportResult:
    """Export the student of a run folder or checkpoint (see the module docstring). The folder
    is built aside and moved into place whole; an existing one is replaced only with
    `overwrite`."""
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; use one of {', '.join(FORMATS)}.")
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise ExportError(f"unknown quantization {quantize!r}; use one of {', '.join(QUANTIZATIONS)}.")
    if quantize is not None and format != "onnx":
        raise ExportError("int8 exports are made by ONNX Runtime's quantizer: use --format onnx with --quantize int8.")
    student = load_student(source)
    base = student.run_dir if student.run_dir is not None else student.checkpoint.parent
    folder = Path(out).expanduser() if out is not None else base / f"export-{format}{'-' + quantize if quantize else ''}"
    if folder.exists() and not overwrite:
        raise ExportError(f"{str(folder)!r} already exists; pass --overwrite to replace it, or --out for another "
                          "folder.")
    folder.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        result = _build(student, format, quantize, building, measure, threads)
        if folder.exists():
            shutil.rmtree(folder)
        building.rename(folder)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    return ExportResult(folder, *result)


def _build(student: Student, format: str, quantize: str | None, folder: Path, measure: bool,
           threads: int | None) -> tuple[dict[str, Any], dict[str, Any], TestOutputs]:
    example = student.example(2)
    model_file = folder / MODEL_FILES[format]
    quantization = None
    if format == "onnx":
        exporter = export_onnx(student.model, example, model_file)
        if quantize == "int8":
            fp32 = folder / "model-fp32.onnx"
            model_file.rename(fp32)
            quantization = quantize_onnx(fp32, model_file, student)
            fp32.unlink()
    else:
        exporter = export_torchscript(student.model, example, model_file)
    text = student.bundle.text
    if text is not None:
        if student.bundle.tokenizer is None:
            raise ExportError("the data's tokenizer is not available to save with the export.")
        student.bundle.tokenizer.save(folder / "tokenizer")
    card = model_card(student, format, exporter, model_file, quantization)
    (folder / CARD).write_text(json.dumps(card, indent=2) + "\n")
    runner = Runner(folder, card, threads)
    outputs = test_outputs(student, runner)
    checked = parity(outputs, quantized=quantize is not None)
    (folder / PARITY).write_text(json.dumps(checked, indent=2) + "\n")
    card["test_top1"] = checked["exported_top1"]
    if measure:
        card["measured"] = measure_export(student, runner, model_file, threads)
    (folder / CARD).write_text(json.dumps(card, indent=2) + "\n")
    (folder / "model_card.md").write_text(card_markdown(card, checked))
    return card, checked, outputs


def measure_export(student: Student, runner: Runner, model_file: Path, threads: int | None,
                   batch_sizes: tuple[int, ...] = (1, 32), repeats: int = 30) -> dict[str, Any]:
    """The export's file size and latency in its runtime, beside the PyTorch student's
    footprint, timed in turns on the first test inputs."""
    from featkd.deploy.footprint import Footprint, busy_note, measure_models, time_calls

    inputs = {b: student.example(b) for b in batch_sizes}
    numpy = {b: numpy_inputs(x, runner.names) for b, x in inputs.items()}
    timed = time_calls({"export": {b: (lambda x=x: runner.logits(x)) for b, x in numpy.items()}}, repeats,
                       threads=threads)["export"]
    pytorch = measure_models({"student": student.model}, inputs, student.example(1), repeats=repeats,
                             threads=threads)["student"]
    exported = Footprint(pytorch.parameters, pytorch.multiply_adds, model_file.stat().st_size, timed,
                         [n for n in [busy_note(timed)] if n])
    return {"export": exported.values(), "pytorch_fp32": pytorch.values(),
            "notes": sorted(set(exported.notes + pytorch.notes))}


def config_hash(config: Config) -> str:
    """sha256 of the resolved config (what identifies the recipe that made the student)."""
    return hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()


def model_card(student: Student, format: str, exporter: str, model_file: Path,
               quantization: Quantization | None) -> dict[str, Any]:
    """What a user of the exported file needs to know, as plain data."""
    from featkd import __version__
    from featkd.stages import plan_stages

    config, payload, bundle = student.config, student.payload, student.bundle
    plan = plan_stages(config)
    final = plan.final
    x = student.example(1)
    text = bundle.text
    if isinstance(x, dict):
        inputs = [{"name": n, "dtype": "int64", "shape": ["batch", "sequence"]} for n in x]
        preprocessing = {"kind": "text", "tokenizer": "tokenizer/", "max_length": text.max_length,
                         "pad_id": text.pad_id, "how": "featkd.text.load_tokenizer('tokenizer') encodes each text; "
                                                     "pad to the longest, attention_mask 1 on real tokens"}
    else:
        inputs = [{"name": "input", "dtype": "float32", "shape": ["batch", *list(bundle.input_shape)]}]
        preprocessing = {"kind": "tensor", "how": f"inputs as featkd's {config.data.name!r} dataset gives them "
                                                  f"(its test transform), shape {list(bundle.input_shape)}"}
    teachers = {k: plan.models[k].model if k in plan.models else k for k in final.teachers}
    result = (payload.get("result") or {})
    return {
        "name": config.name,
        "format": format,
        "file": model_file.name,
        "exporter": exporter,
        "quantization": None if quantization is None else {"method": quantization.method, "int8": quantization.int8,
                                                           "fp32": quantization.fp32},
        "architecture": {"model": payload["model_name"], "args": payload.get("model_args") or {},
                         "parameters": count_parameters(student.model),
                         "head": student.model.describe() if isinstance(student.model, HeadedStudent) else None},
        "inputs": inputs,
        "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", bundle.num_classes]}],
        "preprocessing": preprocessing,
        "classes": bundle.class_names or [str(i) for i in range(bundle.num_classes)],
        "text": text is not None,
        "distillation": {"stage": final.name, "teachers": teachers,
                         "terms": {name: {k: v for k, v in term.model_dump(mode="json").items()
                                          if v is not None and k not in ("pretrain", "adapter", "teacher_index",
                                                                         "gather", "layer_map")}
                                   for name, term in final.terms.items()},
                         "epochs": final.train.epochs, "data": {"name": config.data.name, "args": config.data.args},
                         "pytorch_test_top1": result.get("last_acc")},
        "checkpoint": str(student.checkpoint),
        "config_sha256": config_hash(config),
        "featkd_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def card_markdown(card: Mapping[str, Any], checked: Mapping[str, Any]) -> str:
    """The model card as a page a person reads."""
    arch, dist = card["architecture"], card["distillation"]
    lines = [f"# {card['name']}: {arch['model']} ({card['format']}"
             f"{', int8' if card['quantization'] else ''})", "",
             f"- **File**: `{card['file']}` (exported with {card['exporter']})",
             f"- **Architecture**: `{arch['model']}` {json.dumps(arch['args'])}, {arch['parameters']:,} parameters"
             + (f"; the network {arch['head']}" if arch.get("head") else ""),
             "- **Inputs**: " + ", ".join(f"`{i['name']}` {i['dtype']} {i['shape']}" for i in card["inputs"]),
             f"- **Preprocessing**: {card['preprocessing']['how']}",
             f"- **Classes** ({len(card['classes'])}): " + ", ".join(card["classes"][:20])
             + (" ..." if len(card["classes"]) > 20 else ""),
             f"- **Distilled** in stage `{dist['stage']}` from {', '.join(dist['teachers'].values()) or 'no teacher'} "
             f"with " + ", ".join(f"`{k}` (weight {v.get('weight', 'default')})" for k, v in dist["terms"].items())
             + f", {dist['epochs']} epochs on `{dist['data']['name']}`",
             f"- **Config** sha256 `{card['config_sha256'][:16]}...`, featkd {card['featkd_version']}"]
    if card["quantization"]:
        q = card["quantization"]
        lines.append(f"- **Quantization**: {Quantization(q['method'], q['int8'], q['fp32']).describe()}")
    lines += ["", "## Parity with the PyTorch student", "",
              f"On {checked['samples']} test samples: top-1 {checked['exported_top1']:.2f}% exported against "
              f"{checked['pytorch_top1']:.2f}% in PyTorch, the same top-1 on {checked['top1_agreement']:.2f}%, "
              f"largest |logit| difference {checked['max_abs_logit_difference']:.2e}"
              + (f" ({'within' if checked['passed'] else 'NOT within'} the fp32 tolerance {checked['tolerance']:.0e})."
                 if "passed" in checked else ".")]
    measured = card.get("measured")
    if measured:
        e, p = measured["export"], measured["pytorch_fp32"]
        lines += ["", "## Measured on the CPU", "", "| | file | batch 1 median (p90) | batch 32 median (p90) |",
                  "|---|---|---|---|"]
        for label, m in (("exported", e), ("PyTorch fp32", p)):
            lat = " | ".join(f"{m.get(f'latency_b{b}_median_ms', float('nan')):.3f} "
                             f"({m.get(f'latency_b{b}_p90_ms', float('nan')):.3f}) ms" for b in (1, 32))
            lines.append(f"| {label} | {m['file_mb']:.3f} MB | {lat} |")
        lines.append(f"\n{e.get('threads', '?')} CPU thread(s), {', '.join(measured['notes']) or 'quiet machine'}.")
    lines += ["", "## Use", "", "```bash", "featkd predict EXPORT_FOLDER INPUTS   # .npy tensors, or a .txt of one text per line", "```", ""]
    return "\n".join(lines)


def run_teachers(student: Student) -> list[tuple[str, nn.Module]]:
    """The final stage's teachers of the run the student came from, rebuilt from the run's
    checkpoints (or the files its config loads them from), as (label, model) pairs. Specialist
    ensembles are left out (they are not one model)."""
    from featkd.models import build_model, load_weights
    from featkd.stages import plan_stages

    if student.run_dir is None:
        return []
    plan = plan_stages(student.config)
    state = json.loads((student.run_dir / "state.json").read_text())["stages"]
    teachers = []
    for key in plan.final.teachers:
        spec = plan.models.get(key)
        producer = next((s for s in reversed(plan.stages[:-1]) if s.model == key and s.specialists is None), None)
        if spec is None or any(s.model == key and s.specialists is not None for s in plan.stages):
            continue
        label = f"{key} ({spec.model})"
        if producer is not None and state.get(producer.name, {}).get("checkpoint"):
            path = student.run_dir / state[producer.name]["checkpoint"]
            teachers.append((label, model_from_checkpoint(load_checkpoint(path)).eval()))
        elif spec.checkpoint:
            teachers.append((label, model_from_checkpoint(load_checkpoint(spec.checkpoint)).eval()))
        else:
            model = build_model(spec.model, student.bundle.num_classes, student.bundle.input_shape, spec.args,
                                text=student.bundle.text)
            if spec.pretrained:
                load_weights(model, spec.pretrained, what=spec.model)
            teachers.append((label, model.eval()))
    return teachers
