import pytest
import torch
from torch import nn

from featkd.adapters import (
    ADAPTERS, ConvAdapter, LinearAdapter, MapToTokens, PoolLinear, Resize, TokensToMap, TokensToTokens,
    build_adapter, infer_layout,
)
from featkd.errors import AdapterError

# (student shape, teacher shape, layouts, adapter type auto should pick)
CASES = [
    ((8, 4, 4), (8, 4, 4), None, nn.Identity),
    ((8, 4, 4), (32, 4, 4), None, ConvAdapter),
    ((8, 8, 8), (32, 4, 4), None, ConvAdapter),        # channels and spatial size
    ((8, 2, 2), (32, 4, 4), None, ConvAdapter),        # upsampling
    ((8, 8, 8), (8, 4, 4), None, Resize),
    ((16,), (64,), None, LinearAdapter),
    ((8, 40), (32, 20), ("sequence", "sequence"), ConvAdapter),   # 1-D conv maps
    ((16, 4, 4), (64,), None, PoolLinear),
    ((17, 12), (65, 24), ("tokens", "tokens"), TokensToTokens),   # 4x4 + cls -> 8x8 + cls
    ((16, 12), (16, 24), ("tokens", "tokens"), LinearAdapter),
    ((17, 12), (32, 4, 4), ("tokens", "map"), TokensToMap),       # class token dropped
    ((8, 4, 4), (50, 24), ("map", "tokens"), MapToTokens),        # 7x7 + cls
]


@pytest.mark.parametrize("student,teacher,layouts,kind", CASES)
def test_auto_maps_each_shape_pair_to_the_teacher_shape(student, teacher, layouts, kind):
    s_layout, t_layout = layouts or (None, None)
    adapter = build_adapter("auto", student, teacher, s_layout, t_layout)
    assert type(adapter) is kind
    out = adapter(torch.randn(3, *student))
    assert out.shape == (3, *teacher)


@pytest.mark.parametrize("student,teacher,layouts,kind", [c for c in CASES if c[3] is not nn.Identity])
def test_trainable_adapters_receive_gradients(student, teacher, layouts, kind):
    s_layout, t_layout = layouts or (None, None)
    adapter = build_adapter("auto", student, teacher, s_layout, t_layout)
    x = torch.randn(3, *student, requires_grad=True)
    adapter(x).pow(2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for p in adapter.parameters():
        assert p.grad is not None


def test_tokens_to_map_keeps_patch_positions():
    adapter = TokensToMap((5, 3), (3, 2, 2))
    with torch.no_grad():  # make the projection an identity to see where tokens land
        adapter.project.conv.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
    adapter.project.norm.eval()
    tokens = torch.arange(15.0).view(1, 5, 3)
    out = adapter(tokens)
    scale = 1 / (1 + adapter.project.norm.eps) ** 0.5
    # token 1 (first patch, after the class token) is position (0, 0); token 4 is (1, 1)
    torch.testing.assert_close(out[0, :, 0, 0], tokens[0, 1] * scale)
    torch.testing.assert_close(out[0, :, 1, 1], tokens[0, 4] * scale)


def test_map_to_tokens_prepends_a_pooled_class_token():
    adapter = MapToTokens((4, 2, 2), (5, 6))
    out = adapter(torch.randn(2, 4, 2, 2))
    torch.testing.assert_close(out[:, 0], out[:, 1:].mean(1))


def test_named_adapters_and_their_errors():
    assert isinstance(build_adapter("conv", (8, 4, 4), (16, 4, 4)), ConvAdapter)
    assert isinstance(build_adapter("linear", (8,), (16,)), LinearAdapter)
    assert isinstance(build_adapter("resize", (8, 8, 8), (8, 4, 4)), Resize)
    with pytest.raises(AdapterError, match="equal shapes"):
        build_adapter("identity", (8,), (16,))
    with pytest.raises(AdapterError, match="cannot map"):
        build_adapter("linear", (8, 4, 4), (16, 4, 4))
    with pytest.raises(AdapterError, match="no adapter maps a student vector"):
        build_adapter("auto", (16,), (8, 4, 4))
    with pytest.raises(AdapterError, match="square grid"):
        build_adapter("auto", (7, 4), (16, 4), "tokens", "tokens")


def test_layout_inference():
    assert infer_layout((16,)) == "vector"
    assert infer_layout((8, 4, 4)) == "map"
    assert infer_layout((8, 40), nn.Sequential(nn.Conv1d(1, 8, 3))) == "sequence"
    assert infer_layout((197, 768), nn.Sequential(nn.Linear(2, 2))) == "tokens"
    with pytest.raises(AdapterError):
        infer_layout((1, 2, 3, 4))


def test_registry_lists_every_adapter():
    assert {"identity", "conv", "linear", "resize", "pool_linear", "tokens", "tokens_to_map", "map_to_tokens",
            "auto"} <= set(ADAPTERS.names())
