"""Compression with the teacher in the loop: quantization-aware training that rounds as ONNX
Runtime's int8 will, magnitude pruning that keeps pruned weights at zero, channel pruning that
really shrinks the student, each in a run distilled by an fp32 teacher."""

import pytest
import torch
from torch import nn

from featkd.capture import FeatureCapture
from featkd.config import load_config, validate
from featkd.errors import ConfigError
from featkd.deploy.qat import conv_norm_pairs, fake_quantize_input, fake_quantize_weight, quantization_aware
from featkd.models import build_model
from featkd.trainer import train


def test_weights_round_per_output_channel_to_symmetric_int8():
    torch.manual_seed(0)
    w = torch.randn(6, 3, 3, 3)
    scale = w.reshape(6, -1).abs().amax(1) / 127
    expected = torch.clamp(torch.round(w / scale[:, None, None, None]), -127, 127) * scale[:, None, None, None]
    torch.testing.assert_close(fake_quantize_weight(w), expected, rtol=0, atol=1e-6)
    assert fake_quantize_weight(w).reshape(6, -1).div(scale[:, None]).round().abs().max() == 127


def test_inputs_round_to_uint8_over_a_range_holding_zero():
    x = torch.linspace(0.5, 2.0, 50)
    y = fake_quantize_input(x, torch.tensor(0.5), torch.tensor(2.0))  # range widened to [0, 2]
    step = 2.0 / 255
    torch.testing.assert_close(y, torch.round(x / step) * step, rtol=0, atol=1e-6)


def test_the_context_keeps_names_and_state_and_gradients_pass_straight_through():
    model = build_model("cnn_small", 10, (1, 8, 8))
    keys = list(model.state_dict())
    x = torch.randn(8, 1, 8, 8)
    capture = FeatureCapture(model, ["layer2.0.conv", "fc:in"])
    with quantization_aware(model) as quantized:
        assert quantized.names == [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        assert list(model.state_dict()) == keys
        model.train()
        with capture.recording():
            out = model(x)
        assert {k: v.shape[0] for k, v in capture.collect().items()} == {"layer2.0.conv": 8, "fc:in": 8}
        capture.clear()
        out.sum().backward()
        assert all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0
                   for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
        ranges = [m.qat_range.clone() for m in model.modules() if hasattr(m, "qat_range")]
        assert all(torch.isfinite(r).all() and r[0] <= r[1] for r in ranges)
        model.eval()
        with torch.no_grad():
            rounded = model(x)
            with quantized.suspended():
                suspended = model(x)
            assert torch.equal(model(x), rounded)  # back on after the suspension
    capture.close()
    assert all(type(m) in (nn.Conv2d, nn.Linear) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert not any(hasattr(m, "qat_range") or "qat_norm" in m.__dict__ for m in model.modules())
    with torch.no_grad():
        plain = model(x)
    assert 0 < (rounded - plain).abs().max() < 0.5 * plain.abs().max()
    assert torch.equal(suspended, plain)


def test_convolutions_followed_by_a_batch_norm_round_the_weight_the_export_folds():
    model = build_model("cnn_small", 10, (1, 8, 8))
    pairs = conv_norm_pairs(model)
    assert pairs and all(n.endswith(".bn") for n in pairs.values())
    modules = dict(model.named_modules())
    conv_name, bn_name = next(iter(pairs.items()))
    conv, bn = modules[conv_name], modules[bn_name]
    with torch.no_grad():  # statistics of its own
        bn.running_var.uniform_(0.5, 2.0), bn.running_mean.uniform_(-1, 1), bn.weight.uniform_(0.5, 1.5)
    x = torch.randn(4, conv.in_channels, 8, 8)
    with quantization_aware(model), torch.no_grad():
        conv.train()
        conv(x)  # observes the input range
        conv.eval(), bn.eval()
        simulated = bn(conv(x))
        low, high = conv.qat_range
    # the export's folded convolution, with its weight and input rounded
    factor = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    folded_w = fake_quantize_weight(conv.weight * factor[:, None, None, None])
    folded_b = bn.bias - bn.running_mean * factor + (conv.bias * factor if conv.bias is not None else 0)
    expected = nn.functional.conv2d(fake_quantize_input(x, low, high), folded_w, folded_b, conv.stride, conv.padding)
    torch.testing.assert_close(simulated, expected, rtol=1e-4, atol=1e-4)


def test_a_qat_stage_fine_tunes_the_distilled_student_and_exports_to_int8(tmp_path):
    pytest.importorskip("onnxruntime")
    from featkd.deploy.export import export

    sgd = {"name": "sgd", "lr": 0.05, "momentum": 0.9}
    config = load_config("configs/quickstart.yaml", [
        f"output_dir={tmp_path}", "logger=none", "progress=false", "measure=false"])
    data = {k: v for k, v in config.to_dict().items() if k not in ("teacher", "student", "loss", "train")}
    staged = validate({**data, "models": {"teacher": {"model": "cnn_large"}, "student": {"model": "cnn_tiny"}},
                       "stages": [
                           {"name": "teacher", "model": "teacher", "train": {"epochs": 1, "optimizer": sgd}},
                           {"name": "distill", "model": "student", "teacher": "teacher",
                            "loss": {"ce": {"weight": 0.1}, "kd": {"weight": 0.9}},
                            "train": {"epochs": 2, "optimizer": sgd}},
                           {"name": "qat", "model": "student", "teacher": "teacher",
                            "loss": {"ce": {"weight": 0.1}, "kd": {"weight": 0.9}},
                            "train": {"epochs": 1, "quantization_aware": True,
                                      "optimizer": {"name": "sgd", "lr": 0.005, "momentum": 0.9}}}]})
    result = train(staged)
    assert set(result.stages) == {"teacher", "distill", "qat"}
    exported = export(result.run_dir, "onnx", "int8", measure=False)
    # the QAT stage's test accuracy was measured with int8 rounding; ONNX Runtime's int8 agrees
    assert abs(exported.parity["exported_top1"] - result.student.last_acc) < 5
    assert exported.card["distillation"]["stage"] == "qat"


def test_quantization_aware_is_a_validated_train_setting():
    from featkd.errors import ConfigError

    config = load_config("configs/quickstart.yaml", ["train.quantization_aware=true"])
    assert config.train.quantization_aware is True
    with pytest.raises(ConfigError):
        load_config("configs/quickstart.yaml", ["train.quantization_awre=true"])


# -- pruning ----------------------------------------------------------------------------------


def test_global_magnitude_pruning_follows_the_cubic_schedule_and_keeps_pruned_weights_at_zero():
    from featkd.deploy.prune import magnitude_pruning, scheduled_sparsity, weight_sparsity

    assert [round(scheduled_sparsity(0.8, 3, e), 4) for e in (1, 2, 3, 4)] == [0.5630, 0.7704, 0.8, 0.8]
    assert scheduled_sparsity(0.5, 1, 1) == 0.5
    torch.manual_seed(0)
    model = build_model("cnn_small", 10, (1, 8, 8))
    keys = list(model.state_dict())
    everything = torch.cat([m.weight.detach().abs().flatten() for m in model.modules()
                            if isinstance(m, (nn.Conv2d, nn.Linear)) and m is not model.fc])
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.05)
    with magnitude_pruning(model, 0.8, epochs=3, keep=["fc"]) as pruner:
        pruner.set_epoch(1)
        kept = model.fc.weight.detach().clone()
        layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and m is not model.fc]
        zeros = sum(int((m.weight == 0).sum()) for m in layers) / sum(m.weight.numel() for m in layers)
        assert zeros == pytest.approx(0.5630, abs=0.002)
        # the smallest magnitudes went, across layers (global, not per layer)
        threshold = torch.kthvalue(everything, int(round(scheduled_sparsity(0.8, 3, 1) * everything.numel()))).values
        assert all(bool((m.weight[m.weight != 0].abs() > threshold).all()) for m in layers)
        pruned = [m.weight == 0 for m in layers]
        for _ in range(3):
            optimizer.zero_grad()
            model(torch.randn(8, 1, 8, 8)).sum().backward()
            optimizer.step()
        assert all(bool((m.weight[p] == 0).all()) for m, p in zip(layers, pruned))
        assert not torch.equal(model.fc.weight, kept) and bool((model.fc.weight != 0).all())
        pruner.set_epoch(3)
        pruner.set_epoch(3)  # idempotent: a resumed epoch prunes nothing more
        for _ in range(3):  # the optimizer's momentum for the newly pruned weights does not revive them
            optimizer.zero_grad()
            model(torch.randn(8, 1, 8, 8)).sum().backward()
            optimizer.step()
        zeros = sum(int((m.weight == 0).sum()) for m in layers) / sum(m.weight.numel() for m in layers)
        assert zeros == pytest.approx(0.8, abs=0.002)
    assert list(model.state_dict()) == keys and 0.7 < weight_sparsity(model) < 0.8


def test_a_pruned_and_distilled_stage_reports_its_sparsity_and_exports(tmp_path):
    pytest.importorskip("onnxruntime")
    from featkd.deploy.export import export

    config = load_config("configs/quickstart.yaml", [
        f"output_dir={tmp_path}", "logger=none", "progress=false", "measure={latency: false}",
        "teacher.train.epochs=1", "train.epochs=2", "train.prune={sparsity: 0.6, epochs: 2, keep: [fc]}"])
    result = train(config)
    assert 0.5 < result.student_footprint.weight_sparsity < 0.6  # the classifier stays dense
    assert result.values()["student/weight_sparsity"] == result.student_footprint.weight_sparsity
    exported = export(result.run_dir, "onnx", measure=False)
    assert exported.passed


def test_channel_pruning_shrinks_the_student_and_every_loader_rebuilds_it(tmp_path):
    pytest.importorskip("torch_pruning")
    pytest.importorskip("onnxruntime")
    from featkd.deploy.export import export
    from featkd.evaluation import evaluate_checkpoint

    overrides = [f"output_dir={tmp_path}", "logger=none", "progress=false", "measure={latency: false}",
                 "teacher.train.epochs=1", "train.epochs=2", "student.model=cnn_small",
                 "train.prune={channels: 0.5}"]
    pruned = train(load_config("configs/quickstart.yaml", overrides))
    dense = build_model("cnn_small", 10, (1, 8, 8))
    full = sum(p.numel() for p in dense.parameters())
    assert pruned.student_params < 0.4 * full  # half the channels: about a quarter of the weights
    assert pruned.student.last_acc > 0
    # eval, export and resume rebuild the pruned shapes from the checkpoint alone
    assert evaluate_checkpoint(pruned.run_dir / "checkpoints" / "last.pt", "cpu")["acc"] == pytest.approx(
        pruned.student.last_acc)
    resumed = train(load_config("configs/quickstart.yaml", overrides), pruned.run_dir, resume=True)
    assert resumed.student_params == pruned.student_params and resumed.student.last_acc == pruned.student.last_acc
    exported = export(pruned.run_dir, "onnx", measure=False)
    assert exported.passed and exported.card["architecture"]["parameters"] == pruned.student_params
    with pytest.raises(ConfigError, match="`sparsity`.*`channels`"):
        load_config("configs/quickstart.yaml", ["train.prune={sparsity: 0.5, channels: 0.5}"])


def test_a_model_channel_pruning_would_break_is_refused_before_anything_trains(tmp_path):
    """torch-pruning cuts the built-in transformer's hidden width but not the embedding rows
    it adds directly: the pre-flight check prunes a copy, sees it no longer runs, and stops."""
    pytest.importorskip("torch_pruning")
    config = load_config("configs/nlp/kd.yaml", [f"output_dir={tmp_path}", "logger=none", "progress=false",
                                                 "train.prune={channels: 0.5}", "data.args.train_size=64"])
    with pytest.raises(ConfigError, match="prune.channels: with its channels removed, Transformer no longer runs "
                                          r"\(.*\).*prune.keep, or prune by magnitude instead"):
        train(config)
    assert not list(tmp_path.rglob("*.pt"))  # not even the teacher was trained
