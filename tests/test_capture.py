import copy

import pytest
import torch
from conftest import TinyNet, no_hooks
from torch import nn

from featkd.capture import FeatureCapture, list_modules, resolve
from featkd.errors import CaptureError
from featkd.models import build_model


def hand_forward(net: TinyNet, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The features computed step by step, without hooks."""
    conv1 = net.conv1(x)
    bn1 = net.bn1(conv1)
    relu1 = torch.relu(bn1)
    conv2 = net.conv2(relu1)
    bn2 = net.bn2(conv2)
    relu2 = torch.relu(bn2)
    pooled = relu2.mean((2, 3))
    return {"conv1": conv1, "bn1": bn1, "bn2": bn2, "fc:in": pooled, "fc": net.fc(pooled)}


def test_captured_values_equal_a_hand_written_forward(tiny_net, image_batch):
    tiny_net.eval()
    expected = hand_forward(tiny_net, image_batch)
    with FeatureCapture(tiny_net, ["conv1", "bn1", "bn2", "fc:in", "fc"], "student") as capture:
        capture.probe(tiny_net, image_batch)
        with capture.recording():
            out = tiny_net(image_batch)
        feats = capture.collect()
    assert set(feats) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(feats[name], value, msg=name)
    torch.testing.assert_close(out, expected["fc"])


def test_inplace_relu_after_hooked_bn_still_yields_pre_relu_values(tiny_net, image_batch):
    tiny_net.eval()
    expected = hand_forward(tiny_net, image_batch)["bn1"]
    assert (expected < 0).any(), "the check needs negative BN outputs that the ReLU would zero"
    with FeatureCapture(tiny_net, ["bn1"]) as capture:
        capture.probe(tiny_net, image_batch)  # finds the in-place write
        assert capture.cloned == ["bn1"]
        with capture.recording():
            tiny_net(image_batch)
        torch.testing.assert_close(capture.collect()["bn1"], expected)


def test_inplace_write_without_probe_is_reported_not_silently_wrong(tiny_net, image_batch):
    from featkd.capture import StaleFeatureError

    with FeatureCapture(tiny_net, ["bn1"]) as capture:
        with capture.recording():
            tiny_net(image_batch)
        with pytest.raises(StaleFeatureError, match="bn1"):
            capture.collect()
        with capture.recording():  # from now on it is cloned
            tiny_net(image_batch)
        assert (capture.collect()["bn1"] < 0).any()


def test_close_removes_every_hook_and_leaves_the_model_unchanged(tiny_net, image_batch):
    tiny_net.eval()
    before_state = copy.deepcopy(tiny_net.state_dict())
    before_out = tiny_net(image_batch)
    capture = FeatureCapture(tiny_net, ["conv1", "bn1:in", "relu@0", "relu@1", "fc:in"])
    assert not no_hooks(tiny_net)
    capture.probe(tiny_net, image_batch)
    capture.close()
    assert no_hooks(tiny_net)
    assert all(torch.equal(before_state[k], v) for k, v in tiny_net.state_dict().items())
    torch.testing.assert_close(tiny_net(image_batch), before_out)


def test_probe_does_not_touch_batchnorm_statistics_or_training_flags(tiny_net, image_batch):
    tiny_net.train()
    stats = copy.deepcopy(tiny_net.bn1.state_dict())
    with FeatureCapture(tiny_net, ["bn1", "fc:in"]) as capture:
        shapes = capture.probe(tiny_net, image_batch)
    assert shapes == {"bn1": torch.Size([5, 4, 8, 8]), "fc:in": torch.Size([5, 8])}
    assert all(m.training for m in tiny_net.modules())
    assert all(torch.equal(stats[k], v) for k, v in tiny_net.bn1.state_dict().items())


def test_module_called_twice_needs_a_call_index(tiny_net, image_batch):
    capture = FeatureCapture(tiny_net, ["relu"])
    with pytest.raises(CaptureError, match=r"ran 2 times.*relu@0"):
        capture.probe(tiny_net, image_batch)
    capture.close()
    tiny_net.eval()
    expected = hand_forward(tiny_net, image_batch)
    with FeatureCapture(tiny_net, ["relu@0", "relu@1", "relu@-1"]) as capture:
        capture.probe(tiny_net, image_batch)
        with capture.recording():
            tiny_net(image_batch)
        feats = capture.collect()
    torch.testing.assert_close(feats["relu@0"], torch.relu(expected["bn1"]))
    torch.testing.assert_close(feats["relu@1"], torch.relu(expected["bn2"]))
    torch.testing.assert_close(feats["relu@-1"], feats["relu@1"])


def test_call_index_beyond_the_calls_made_is_an_error(tiny_net, image_batch):
    with FeatureCapture(tiny_net, ["relu@2"]) as capture, pytest.raises(CaptureError, match="ran 2 time"):
        capture.probe(tiny_net, image_batch)


def test_unknown_names_suggest_the_closest(tiny_net):
    with pytest.raises(CaptureError, match=r"no module 'bn3'.*Did you mean 'bn2' or 'bn1'"):
        resolve(tiny_net, "bn3", "student")
    with pytest.raises(CaptureError, match="matches no module"):
        resolve(tiny_net, "layer*")
    with pytest.raises(CaptureError, match="unknown port 'inn'; a port is one of out, in"):
        resolve(tiny_net, "fc:inn")
    with pytest.raises(CaptureError, match="cannot read feature name"):
        resolve(tiny_net, "fc:in:out")
    with pytest.raises(CaptureError, match="no query and key projections"):
        resolve(tiny_net, "fc:attention")


def test_globs_stay_within_one_path_segment():
    model = build_model("cnn", 10, (1, 8, 8), {"widths": (4, 8), "blocks": 2})
    assert [s.name for s in resolve(model, "layer*")] == ["layer1", "layer2"]
    assert [s.name for s in resolve(model, "layer*.*.bn")] == [
        "layer1.0.bn", "layer1.1.bn", "layer2.0.bn", "layer2.1.bn"]
    assert [s.name for s in resolve(model, "layer2.**.conv")] == ["layer2.0.conv", "layer2.1.conv"]
    assert [s.name for s in resolve(model, ["layer[12]:in"])] == ["layer1:in", "layer2:in"]


def test_input_port_sees_the_value_before_the_module_runs(image_batch):
    relu = nn.Sequential(nn.Identity(), nn.ReLU(inplace=True))
    with FeatureCapture(relu, ["1:in", "1"]) as capture:
        capture.probe(relu, image_batch)
        with capture.recording():
            relu(image_batch.clone())
        feats = capture.collect()
    torch.testing.assert_close(feats["1:in"], image_batch)
    torch.testing.assert_close(feats["1"], torch.relu(image_batch))


def test_dataparallel_prefix_resolves_like_the_bare_model(tiny_net, image_batch):
    wrapped = nn.DataParallel(tiny_net)  # on CPU it simply calls the module
    tiny_net.eval()
    expected = hand_forward(tiny_net, image_batch)["bn2"]
    with FeatureCapture(wrapped, ["module.bn2", "bn2:in"]) as capture:
        assert capture.names == ["bn2", "bn2:in"]
        capture.probe(wrapped, image_batch)
        with capture.recording():
            wrapped(image_batch)
        torch.testing.assert_close(capture.collect()["bn2"], expected)
    assert no_hooks(tiny_net)


def test_ddp_wrapped_model(tiny_net, image_batch, tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(tiny_net)
        with FeatureCapture(ddp, ["module.fc:in"]) as capture:
            capture.probe(ddp, image_batch)
            with capture.recording():
                out = ddp(image_batch)
            assert capture.collect()["fc:in"].shape == (5, 8)
            out.sum().backward()
        assert no_hooks(tiny_net)
    finally:
        dist.destroy_process_group()


def test_channels_last_features(tiny_net, image_batch):
    tiny_net.eval()
    expected = hand_forward(tiny_net, image_batch)["bn2"]
    model = tiny_net.to(memory_format=torch.channels_last)
    x = image_batch.to(memory_format=torch.channels_last)
    with FeatureCapture(model, ["bn2"]) as capture:
        capture.probe(model, x)
        with capture.recording():
            model(x)
        feat = capture.collect()["bn2"]
    assert feat.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(feat, expected)


def test_features_keep_gradients_to_the_model(tiny_net, image_batch):
    with FeatureCapture(tiny_net, ["bn2"]) as capture:
        capture.probe(tiny_net, image_batch)
        with capture.recording():
            tiny_net(image_batch)
        capture.collect()["bn2"].pow(2).sum().backward()
    assert tiny_net.conv2.weight.grad is not None and tiny_net.conv2.weight.grad.abs().sum() > 0
    assert tiny_net.fc.weight.grad is None


def test_hooks_store_nothing_outside_recording(tiny_net, image_batch):
    with FeatureCapture(tiny_net, ["bn2"]) as capture:
        tiny_net(image_batch)
        assert capture._stored == {}


def test_list_modules_reports_shapes_and_repeated_calls(tiny_net, image_batch):
    rows = {r.name: r for r in list_modules(tiny_net, image_batch)}
    assert rows["conv2"].output_shape == (5, 8, 4, 4)
    assert rows["fc"].input_shape == (5, 8)
    assert rows["relu"].calls == 2
    assert rows["fc"].params == 8 * 3 + 3
    assert no_hooks(tiny_net)
