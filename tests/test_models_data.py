import numpy as np
import pytest
import random
import torch

from featkd.data import DATASETS, RandomShift, build_data
from featkd.errors import CheckpointError, DataError, ModelError
from featkd.models import MODELS, build_model, count_parameters, load_weights


@pytest.mark.parametrize("name", ["cnn", "cnn_tiny", "cnn_small", "cnn_large", "mlp"])
def test_builtin_models_on_images(name):
    model = build_model(name, 10, (1, 8, 8))
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_builtin_cnn_on_1d_signals_and_stage_names():
    model = build_model("cnn", 10, (1, 40), {"widths": (8, 16), "blocks": (1, 2)})
    assert model(torch.randn(2, 1, 40)).shape == (2, 10)
    names = [n for n, _ in model.named_modules()]
    assert {"layer1", "layer2", "layer2.1.bn", "pool", "fc"} <= set(names)


def test_sizes_match_their_descriptions():
    assert 1_500 < count_parameters(build_model("cnn_tiny", 10, (1, 8, 8))) < 2_000
    assert 20_000 < count_parameters(build_model("cnn_small", 10, (1, 8, 8))) < 30_000
    assert 1_000_000 < count_parameters(build_model("cnn_large", 10, (1, 8, 8))) < 1_300_000


def test_timm_and_torchvision_models_build_without_downloading():
    timm_model = build_model("timm:resnet18", 7, (1, 32, 32))
    assert timm_model(torch.randn(2, 1, 32, 32)).shape == (2, 7)
    tv_model = build_model("torchvision:resnet18", 7, (3, 32, 32))
    assert tv_model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_asking_for_a_download_is_a_clear_error():
    with pytest.raises(ModelError, match="never downloads"):
        build_model("timm:resnet18", 10, (3, 32, 32), {"pretrained": True})
    with pytest.raises(ModelError, match="never downloads"):
        build_model("torchvision:resnet18", 10, (3, 32, 32), {"weights": "IMAGENET1K_V1"})
    with pytest.raises(ModelError, match="Did you mean 'resnet18'"):
        build_model("timm:resnet181", 10, (3, 32, 32))
    with pytest.raises(ModelError, match="3-channel"):
        build_model("torchvision:resnet18", 10, (1, 32, 32))
    with pytest.raises(ModelError, match="unknown model source"):
        build_model("hub:resnet18", 10, (3, 32, 32))


def test_pretrained_weights_come_from_a_local_file(tmp_path):
    source = build_model("cnn_tiny", 10, (1, 8, 8))
    path = tmp_path / "w.pt"
    torch.save(source.state_dict(), path)
    loaded = build_model("cnn_tiny", 10, (1, 8, 8), pretrained=path)
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), loaded.state_dict().values()))
    with pytest.raises(CheckpointError, match=r"do not fit.*shape mismatch"):
        load_weights(build_model("cnn_tiny", 5, (1, 8, 8)), path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_weights(source, tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="cannot read weights"):
        load_weights(source, tmp_path / "junk.pt")


def test_digits_split_is_fixed_stratified_and_standardized():
    a, b = build_data("digits"), build_data("digits")
    assert (len(a.train), len(a.test)) == (1437, 360)
    assert torch.equal(a.test.inputs, b.test.inputs) and torch.equal(a.train.targets, b.train.targets)
    assert torch.bincount(a.test.targets).min() >= 35
    assert abs(a.train.inputs.mean().item()) < 1e-5 and abs(a.train.inputs.std().item() - 1) < 1e-3
    assert a.input_shape == (1, 8, 8) and a.num_classes == 10


def test_digits_subsets_shrink_only_the_training_set():
    data = build_data("digits", {"train_fraction": 0.1, "exclude_classes": [3]})
    assert 3 not in data.train.targets.tolist()
    assert 120 < len(data.train) < 135
    assert len(data.test) == 360 and 3 in data.test.targets.tolist()
    with pytest.raises(DataError, match="train_fraction"):
        build_data("digits", {"train_fraction": 0})


def test_random_shift_moves_the_image_by_at_most_one_pixel():
    torch.manual_seed(0)
    image = torch.zeros(1, 8, 8)
    image[0, 4, 4] = 1.0
    for _ in range(20):
        shifted = RandomShift(1)(image)
        (row, col), = (shifted[0] == 1).nonzero().tolist()
        assert abs(row - 4) <= 1 and abs(col - 4) <= 1 and shifted.sum() == 1


def test_mnist1d_is_generated_and_leaves_global_random_state_alone():
    np.random.seed(123)
    random.seed(123)
    expected_np, expected_py = np.random.rand(), random.random()
    np.random.seed(123)
    random.seed(123)
    data = build_data("mnist1d")
    assert (len(data.train), len(data.test), data.input_shape) == (4000, 1000, (1, 40))
    assert np.random.rand() == expected_np and random.random() == expected_py


def test_synthetic_data_and_missing_cifar_folder(tmp_path):
    data = build_data("synthetic", {"num_classes": 3, "input_shape": (2, 4, 4), "train_size": 30})
    x, y = data.train[0]
    assert x.shape == (2, 4, 4) and 0 <= int(y) < 3 and len(data.train) == 30
    with pytest.raises(DataError, match="does not download data"):
        build_data("cifar100", {"root": str(tmp_path)})


def test_registries_hold_the_documented_entries():
    assert {"digits", "mnist1d", "synthetic", "cifar10", "cifar100"} <= set(DATASETS.names())
    assert {"cnn", "cnn_tiny", "cnn_small", "cnn_large", "mlp"} <= set(MODELS.names())


def test_a_validation_split_is_held_out_of_the_training_images_only():
    whole = build_data("digits", {"augment": False})
    split = build_data("digits", {"augment": False, "validation_fraction": 0.2})
    assert (len(split.train), len(split.val), len(split.test)) == (1149, 288, 360)
    assert torch.equal(split.test.targets, whole.test.targets)
    assert (torch.bincount(split.val.targets) - torch.bincount(whole.train.targets) * 0.2).abs().max() <= 1  # stratified
    small = build_data("digits", {"augment": True, "validation_fraction": 0.2, "train_fraction": 0.05})
    assert len(small.train) == 57 and small.val.augment is None and small.train.augment is not None
    assert build_data("digits").val is None
    with pytest.raises(DataError, match="validation_fraction"):
        build_data("digits", {"validation_fraction": 1.0})
