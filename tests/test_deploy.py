"""The student as a deliverable: exports that match the PyTorch student, int8 that says what it
quantized, a model card, predict without the training code, and every bad input."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from featkd.cli import main
from featkd.config import load_config
from featkd.deploy.export import export, export_onnx, load_student
from featkd.deploy.footprint import Footprint, Latency, busy_note, ratios
from featkd.deploy.predict import Predictor, Runner
from featkd.errors import ExportError
from featkd.trainer import train

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

TINY = ["logger=none", "progress=false", "measure=false"]


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("image")
    return train(load_config("configs/quickstart.yaml", [f"output_dir={out}", *TINY, "teacher.train.epochs=1",
                                                         "train.epochs=3", "loss={ce: {weight: 0.1}, kd: {weight: 0.9}}"]))


@pytest.fixture(scope="module")
def bilstm_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("text")
    return train(load_config("configs/nlp/bilstm.yaml", [f"output_dir={out}", *TINY, "teacher.train.epochs=1",
                                                         "train.epochs=2", "data.args.train_size=300",
                                                         "data.args.train_subset=200", "data.args.validation_size=0",
                                                         "teacher.0.data.args.train_size=300",
                                                         "teacher.0.data.args.validation_size=0"]))


def copy_run(run, tmp_path) -> Path:
    target = tmp_path / run.run_dir.name
    shutil.copytree(run.run_dir, target)
    return target


def test_onnx_export_matches_the_student_on_the_test_set_and_on_new_batch_sizes(image_run, tmp_path):
    result = export(copy_run(image_run, tmp_path), "onnx")
    assert result.passed and result.parity["max_abs_logit_difference"] < 1e-4
    assert result.parity["top1_agreement"] == 100.0 and result.parity["samples"] == 360
    assert result.parity["exported_top1"] == pytest.approx(image_run.student.last_acc)
    # an independent run of the file: any batch size, the student's logits
    import onnxruntime as ort

    session = ort.InferenceSession(str(result.folder / "model.onnx"))
    student = load_student(result.folder.parent)
    for batch in (1, 7):
        x = torch.randn(batch, 1, 8, 8)
        with torch.no_grad():
            expected = student.model(x).numpy()
        np.testing.assert_allclose(session.run(None, {"input": x.numpy()})[0], expected, atol=1e-4)
    card = json.loads((result.folder / "model_card.json").read_text())
    assert card["architecture"]["model"] == "cnn_tiny" and card["classes"] == [str(i) for i in range(10)]
    assert card["inputs"] == [{"name": "input", "dtype": "float32", "shape": ["batch", 1, 8, 8]}]
    assert card["distillation"]["teachers"] == {"teacher": "cnn_large"}
    assert set(card["distillation"]["terms"]) == {"ce", "kd"} and len(card["config_sha256"]) == 64
    assert card["measured"]["export"]["file_mb"] > 0 and card["measured"]["export"]["latency_b32_median_ms"] > 0
    assert "Parity with the PyTorch student" in (result.folder / "model_card.md").read_text()


def test_only_the_student_is_exported(image_run, tmp_path):
    import onnx

    result = export(copy_run(image_run, tmp_path), "onnx", measure=False)
    graph = onnx.load(str(result.folder / "model.onnx")).graph
    stored = sum(int(np.prod(t.dims)) for t in graph.initializer)
    student = load_student(result.folder.parent).model
    tensors = sum(t.numel() for t in student.state_dict().values())
    assert stored <= tensors < 10_000  # the teacher alone holds 1.1M parameters


def test_torchscript_export_is_exact_and_int8_reports_what_it_quantized(image_run, tmp_path):
    run = copy_run(image_run, tmp_path)
    traced = export(run, "torchscript", measure=False)
    assert traced.parity["max_abs_logit_difference"] == 0.0 and (traced.folder / "model.pt").is_file()
    quantized = export(run, "onnx", "int8", measure=False)
    q = quantized.card["quantization"]
    assert q["method"].startswith("static int8") and q["int8"] == {"Conv": 3, "Gemm": 1} and q["fp32"] == {}
    assert quantized.parity["quantized"] and "passed" not in quantized.parity
    assert quantized.parity["top1_agreement"] > 80
    # the per-sample outcomes the parity report sums up (what a comparison of int8 arms resamples)
    correct = quantized.outputs.correct()
    assert correct.shape == (360,) and 100 * correct.mean() == pytest.approx(quantized.parity["exported_top1"])
    test_set = load_student(run).bundle.test
    assert quantized.outputs.labels.tolist() == [int(test_set[i][1]) for i in range(len(test_set))]
    again = export(run, "onnx", "int8", out=tmp_path / "again", measure=False)  # calibration is deterministic
    assert (again.folder / "model.onnx").read_bytes() == (quantized.folder / "model.onnx").read_bytes()


def test_text_students_export_through_either_exporter_and_predict_reads_raw_text(bilstm_run, tmp_path):
    run = copy_run(bilstm_run, tmp_path)
    result = export(run, "onnx", measure=False)
    assert result.card["exporter"] == "torchscript"  # packed sequences: torch.export cannot capture them
    assert result.passed and result.card["inputs"][0]["shape"] == ["batch", "sequence"]
    int8 = export(run, "onnx", "int8", measure=False)
    assert int8.card["quantization"]["int8"].get("LSTM") == 1 and int8.card["quantization"]["method"].startswith(
        "dynamic")
    student = load_student(run)
    texts = ["the plot was not dull , but the ending was awful .", "honestly , the cast was superb .",
             "although the music was weak , the story was moving ."]
    predicted = Predictor(result.folder).predict_texts(texts, top=2)
    encoded = [student.bundle.tokenizer.encode(t, None, 32) for t in texts]
    with torch.no_grad():
        logits = torch.stack([student.model(input_ids=torch.tensor([e["input_ids"]]))[0] for e in encoded])
    assert [p.label for p in predicted] == [student.bundle.class_names[i] for i in logits.argmax(1).tolist()]
    assert all(len(p.top) == 2 and p.top[0][1] >= p.top[1][1] for p in predicted)


def test_a_transformer_exports_with_torch_export_and_dynamic_sequence_length(tmp_path):
    from featkd.data import build_data, collate_of
    from featkd.models import build_model

    bundle = build_data("generated_sentiment", {"train_size": 40, "test_size": 8})
    model = build_model("transformer", 2, bundle.input_shape, {"layers": 2, "hidden": 32, "heads": 2},
                        text=bundle.text).eval()
    example, _ = collate_of(bundle.test)([bundle.test[i] for i in range(2)])
    assert export_onnx(model, example, tmp_path / "m.onnx") == "torch.export"
    card = {"file": "m.onnx", "format": "onnx", "text": True,
            "inputs": [{"name": "input_ids"}, {"name": "attention_mask"}]}
    runner = Runner(tmp_path, card)
    other, _ = collate_of(bundle.test)([bundle.test[i] for i in range(2, 8)])  # other batch and length
    with torch.no_grad():
        expected = model(**other).numpy()
    got = runner.logits({k: v.numpy() for k, v in other.items()})
    np.testing.assert_allclose(got, expected, atol=1e-4)


class Zeta(nn.Module):
    def forward(self, x):
        return torch.special.zeta(x, x + 1.0)


def test_an_operation_onnx_cannot_export_is_named_with_its_module(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.ReLU(), Zeta()))
    with pytest.raises(ExportError, match=r"smallest module that does not export is '1\.1' \(Zeta\).*torchscript"):
        export_onnx(model, torch.randn(2, 4), tmp_path / "m.onnx")
    assert model.training  # the exporters' mode changes do not leak


def test_a_run_whose_student_came_from_the_stage_cache_exports_like_one_that_trained_it(tmp_path):
    chain = {"name": "cached", "output_dir": str(tmp_path), "logger": "none", "progress": False, "measure": False,
             "data": {"name": "digits", "args": {"augment": False}},
             "models": {"teacher": {"model": "cnn_tiny"}, "student": {"model": "cnn_tiny"}},
             "stages": [{"name": "teacher", "model": "teacher", "cache": True, "train": {"epochs": 1}},
                        {"name": "student", "model": "student", "teacher": "teacher", "cache": True,
                         "loss": {"ce": {"weight": 0.1}, "kd": {"weight": 0.9}}, "train": {"epochs": 1}}]}
    trained, cached = train(load_config(data=chain)), train(load_config(data=chain))
    assert json.loads((cached.run_dir / "state.json").read_text())["stages"]["student"]["status"] == "cached"
    exports = [export(run.run_dir, "onnx", measure=False, out=tmp_path / f"export-{i}")
               for i, run in enumerate((trained, cached))]
    assert all(e.passed for e in exports)
    assert exports[0].parity["exported_top1"] == exports[1].parity["exported_top1"] == cached.student.last_acc


def test_bad_exports_are_clear_errors_and_never_leave_half_a_folder(image_run, tmp_path, capsys):
    run = copy_run(image_run, tmp_path)
    assert main(["export", str(run), "--format", "torchscript", "--quantize", "int8"]) == 2
    assert "use --format onnx" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["export", str(tmp_path)]) == 2
    assert "not a featkd run folder" in capsys.readouterr().err
    assert main(["export", str(run), "--format", "torchscript"]) == 0
    capsys.readouterr()
    before = (run / "export-torchscript" / "model_card.json").read_text()
    assert main(["export", str(run), "--format", "torchscript"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (run / "export-torchscript" / "model_card.json").read_text() == before
    assert main(["export", str(run), "--format", "torchscript", "--overwrite"]) == 0
    # an unfinished run: its final stage is still running
    state = json.loads((run / "state.json").read_text())
    state["stages"]["distill"]["status"] = "running"
    (run / "state.json").write_text(json.dumps(state))
    assert main(["export", str(run), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "has not finished" in err and "--resume" in err and "checkpoints/last.pt" in err
    assert main(["export", str(run / "checkpoints" / "last.pt"), "--out", str(tmp_path / "x")]) == 0
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] + \
        [p.name for p in run.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_predict_command_on_tensors_and_its_errors(image_run, tmp_path, capsys):
    run = copy_run(image_run, tmp_path)
    folder = export(run, "onnx", measure=False).folder
    student = load_student(run)
    x = torch.stack([student.bundle.test[i][0] for i in range(5)])
    np.save(tmp_path / "five.npy", x.numpy())
    assert main(["predict", str(folder), str(tmp_path / "five.npy"), "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    with torch.no_grad():
        assert [int(line["label"]) for line in lines] == student.model(x).argmax(1).tolist()
    np.save(tmp_path / "one.npy", x[0].numpy())
    assert main(["predict", str(folder), str(tmp_path / "one.npy")]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1
    np.save(tmp_path / "bad.npy", np.zeros((2, 3, 8, 8), dtype=np.float32))
    assert main(["predict", str(folder), str(tmp_path / "bad.npy")]) == 2
    assert "do not fit the model" in capsys.readouterr().err
    (tmp_path / "texts.txt").write_text("a review\n")
    assert main(["predict", str(folder), str(tmp_path / "texts.txt")]) == 2
    assert "reads tensors" in capsys.readouterr().err
    assert main(["predict", str(tmp_path), str(tmp_path / "one.npy")]) == 2
    assert "not a featkd export" in capsys.readouterr().err


def test_bench_deploy_puts_teacher_student_and_exports_side_by_side(image_run, tmp_path, capsys):
    run = copy_run(image_run, tmp_path)
    assert main(["bench", "deploy", str(run), "--repeats", "3", "--json", str(tmp_path / "deploy.json")]) == 0
    out = capsys.readouterr().out
    rows = json.loads((tmp_path / "deploy.json").read_text())["results"]
    names = [r["name"] for r in rows]
    assert names == ["teacher (cnn_large)", "student", "student, ONNX fp32", "student, ONNX int8",
                     "student, TorchScript"]
    teacher, student = rows[0], rows[1]
    assert teacher["top1"] > student["top1"] - 50 and student["top1"] == pytest.approx(image_run.student.last_acc)
    assert student["vs_teacher"]["parameters"] == pytest.approx(student["parameters"] / teacher["parameters"])
    assert all(r["latency_b1_median_ms"] > 0 and r["latency_b32_median_ms"] > 0 for r in rows)
    assert "int8 Conv x3" in out and "| student, ONNX int8 | ONNX Runtime |" in out
    assert main(["bench", "deploy"]) == 2
    assert main(["bench", "overhead", str(run)]) == 2


def test_latency_percentiles_ratios_and_the_busy_machine_note():
    lat = Latency.of([0.001 * v for v in range(19, 9, -1)], batch=4, threads=2)  # 10..19 ms, any order
    assert lat.median_ms == pytest.approx(14.5) and lat.p90_ms == pytest.approx(18.0) and lat.repeats == 10
    assert busy_note([lat]) is None
    noisy = Latency.of([0.001] * 8 + [0.01] * 2, batch=1, threads=2)
    assert "busy" in busy_note([lat, noisy]) and "batch 1" in busy_note([lat, noisy])
    small = Footprint(10, 100, 1000, [Latency(1, 1.0, 1.5, 5, 1)])
    large = Footprint(100, 1000, 4000, [Latency(1, 4.0, 5.0, 5, 1)])
    assert ratios(small, large) == pytest.approx({"parameters": 0.1, "multiply_adds": 0.1, "file_mb": 0.25,
                                                  "latency_b1_median_ms": 0.25, "latency_b1_p90_ms": 0.3})
