"""Feature capture on Hugging Face transformers, checked against the model's own
`output_hidden_states=True` and `output_attentions=True` on a tiny BERT with padding."""

import pytest
import torch

from featkd.capture import FeatureCapture, resolve
from featkd.errors import CaptureError

transformers = pytest.importorskip("transformers")


def tiny_bert(implementation: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32,
                                     attn_implementation=implementation)
    return transformers.BertForSequenceClassification(config).eval()


def padded_batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(5, 50, (3, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # padding of different lengths
    mask[2, 3:] = 0
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask}


LAYERS = [f"bert.encoder.layer.{i}" for i in range(3)]
ATTENTION = [f"bert.encoder.layer.{i}.attention.self" for i in range(3)]


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_layer_outputs_are_the_hidden_states(implementation):
    model, x = tiny_bert(implementation), padded_batch()
    with torch.no_grad(), FeatureCapture(model, ["bert.embeddings", *LAYERS]) as capture:
        output, features = capture.run(model, x)
        reference = model(**x, output_hidden_states=True)
    assert torch.equal(output.logits, reference.logits)
    for i, name in enumerate(["bert.embeddings", *LAYERS]):
        torch.testing.assert_close(features[name], reference.hidden_states[i])


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_attention_port_equals_the_models_attention_probabilities(implementation):
    """Computed from the captured queries and keys, so it holds whatever kernel the model runs."""
    model, x = tiny_bert(implementation), padded_batch()
    names = [f"{a}:attention" for a in ATTENTION]
    with torch.no_grad(), FeatureCapture(model, names) as capture:
        _, features = capture.run(model, x)
    eager = tiny_bert("eager")
    with torch.no_grad():
        reference = eager(**x, output_attentions=True).attentions
    for name, expected in zip(names, reference):
        assert features[name].shape == (3, 4, 10, 10)
        torch.testing.assert_close(features[name], expected, atol=1e-6, rtol=1e-5)
    real = x["attention_mask"].bool()
    assert torch.all(features[names[0]][~real[:, None, None, :].expand(-1, 4, 10, -1)] == 0)


def test_scores_port_is_scaled_dot_products_zero_at_padded_keys():
    model, x = tiny_bert("eager"), padded_batch()
    attention = ATTENTION[1]
    with torch.no_grad(), FeatureCapture(model, [f"{attention}:scores", f"{attention}.query", f"{attention}.key"]) as capture:
        _, features = capture.run(model, x)
    q = features[f"{attention}.query"].reshape(3, 10, 4, 8).transpose(1, 2)
    k = features[f"{attention}.key"].reshape(3, 10, 4, 8).transpose(1, 2)
    expected = q @ k.transpose(-1, -2) / 8 ** 0.5
    padded_keys = ~x["attention_mask"].bool()[:, None, None, :].expand_as(expected)
    expected = expected.masked_fill(padded_keys, 0.0)
    torch.testing.assert_close(features[f"{attention}:scores"], expected)


def test_an_element_of_a_tuple_output_by_index():
    """BertSelfAttention returns (context, attention weights): `#1` picks the weights (eager)."""
    model, x = tiny_bert("eager"), padded_batch()
    with torch.no_grad(), FeatureCapture(model, [f"{ATTENTION[0]}#0", f"{ATTENTION[0]}#1"]) as capture:
        _, features = capture.run(model, x)
        reference = model(**x, output_attentions=True).attentions[0]
    torch.testing.assert_close(features[f"{ATTENTION[0]}#1"], reference)
    assert features[f"{ATTENTION[0]}#0"].shape == (3, 10, 32)
    with pytest.raises(CaptureError, match="has no element '7'"):
        with FeatureCapture(model, [f"{ATTENTION[0]}#7"]) as capture:
            capture.run(model, x)


def test_attention_gradients_flow_to_the_projections():
    model, x = tiny_bert("sdpa"), padded_batch()
    model.train()
    with FeatureCapture(model, [f"{ATTENTION[2]}:attention"]) as capture:
        _, features = capture.run(model, x)
    features[f"{ATTENTION[2]}:attention"].square().sum().backward()
    layer = model.bert.encoder.layer[2].attention.self
    assert layer.query.weight.grad.abs().sum() > 0 and layer.key.weight.grad.abs().sum() > 0


def test_a_module_without_projections_has_no_attention_port():
    model = tiny_bert("eager")
    with pytest.raises(CaptureError, match="no query and key projections"):
        resolve(model, "bert.encoder.layer.0:attention")
    assert [s.name for s in resolve(model, "bert.encoder.layer.*.attention.self:scores")] == [
        f"{a}:scores" for a in ATTENTION]
