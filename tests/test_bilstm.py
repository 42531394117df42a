"""The BiLSTM student of Tang et al. 2019, and `ce` on batches whose labels are partly or all -100."""

import pytest
import torch
from torch import nn

from featkd.data import TextInfo
from featkd.errors import ModelError
from featkd.losses import LOSSES
from featkd.models import build_model
from featkd.text_models import BiLSTMClassifier

INFO = TextInfo(vocab_size=50, max_length=12, pad_id=0)


def small(pooling="max", **args):
    torch.manual_seed(0)
    model = build_model("bilstm", 3, (12,), text=INFO,
                        args={"embedding": 8, "hidden": 6, "fc_hidden": 5, "pooling": pooling, **args})
    return model.eval()


def batch():
    """Three sequences of lengths 7, 4 and 1, right-padded to 9 with id 0."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 50, (3, 9), generator=g)
    mask = torch.zeros(3, 9, dtype=torch.long)
    for row, n in enumerate((7, 4, 1)):
        mask[row, :n] = 1
    return ids.masked_fill(mask == 0, 0), mask


def test_shapes_names_and_sizes():
    model = small()
    ids, mask = batch()
    assert model(ids, mask).shape == (3, 3)
    assert model(ids).shape == (3, 3)  # no mask: every position is real
    assert isinstance(model.embeddings, nn.Embedding) and model.embeddings.padding_idx == 0
    assert model.lstm.bidirectional and model.lstm.num_layers == 1 and model.lstm.hidden_size == 6
    assert (model.fc1.in_features, model.fc1.out_features, model.classifier.out_features) == (12, 5, 3)
    padded = build_model("bilstm", 2, (12,), text=TextInfo(50, 12, pad_id=7))
    assert padded.embeddings.padding_idx == 7
    defaults = build_model("bilstm", 2, (12,), text=INFO)  # Tang et al.'s larger setting
    assert (defaults.embeddings.embedding_dim, defaults.lstm.hidden_size, defaults.fc1.out_features) == (300, 300, 400)
    assert build_model("bilstm", 2, (12,), args={"vocab_size": 20, "embedding": 4, "hidden": 4}).vocab_size == 20


@pytest.mark.parametrize("pooling", ["max", "last"])
def test_padding_never_changes_the_logits(pooling):
    model = small(pooling)
    ids, mask = batch()
    reference = model(ids, mask)
    other_ids = ids.masked_fill(mask == 0, 17)  # other ids at the padded positions
    assert torch.equal(model(other_ids, mask), reference)
    more = torch.cat([ids, torch.full((3, 5), 23)], dim=1)  # five more padded positions
    assert torch.equal(model(more, torch.cat([mask, torch.zeros(3, 5, dtype=torch.long)], dim=1)), reference)
    left = torch.stack([torch.roll(r, int((m == 0).sum())) for r, m in zip(ids, mask)])  # padding on the left
    left_mask = torch.stack([torch.roll(m, int((m == 0).sum())) for m in mask])
    assert torch.allclose(model(left, left_mask), reference, atol=1e-6)
    token_types = torch.ones_like(ids)
    assert torch.equal(model(ids, mask, token_types), reference)  # token types are ignored


def test_max_and_last_pooling_match_a_plain_lstm_run_on_each_sequence_alone():
    ids, mask = batch()
    outputs = {}
    for pooling in ("max", "last"):
        model = small(pooling)
        outputs[pooling] = model(ids, mask)
        for row in range(3):
            real = ids[row, : int(mask[row].sum())][None]  # (1, n): no padding at all
            states, _ = model.lstm(model.embeddings(real))  # (1, n, 2H), forward then backward halves
            hidden = model.lstm.hidden_size
            if pooling == "max":
                pooled = states[0].max(dim=0).values
            else:  # forward state at the last token, backward state at the first
                pooled = torch.cat([states[0, -1, :hidden], states[0, 0, hidden:]])
            expected = model.classifier(torch.relu(model.fc1(pooled)))
            assert torch.allclose(outputs[pooling][row], expected, atol=1e-6)
    assert not torch.allclose(outputs["max"], outputs["last"])


def test_gradients_reach_every_weight_but_the_padding_embedding():
    model = small().train()
    ids, mask = batch()
    model(ids, mask).sum().backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert torch.equal(model.embeddings.weight.grad[0], torch.zeros(8))  # padding_idx


def test_a_row_without_real_tokens_is_read_as_its_first_token():
    model = small()
    ids, mask = batch()
    mask[2] = 0
    out = model(ids, mask)
    assert torch.isfinite(out).all()


def test_bad_settings_and_data_are_refused():
    with pytest.raises(ModelError, match="needs text data"):
        build_model("bilstm", 2, (12,))
    with pytest.raises(ModelError, match="task is 'masked_lm'"):
        build_model("bilstm", 50, (12,), text=TextInfo(50, 12, task="masked_lm"))
    with pytest.raises(ModelError, match="task is 'causal_lm'"):
        build_model("bilstm", 50, (12,), text=TextInfo(50, 12, task="causal_lm"))
    with pytest.raises(ModelError, match="Did you mean 'max'"):
        build_model("bilstm", 2, (12,), text=INFO, args={"pooling": "mx"})
    with pytest.raises(ModelError, match="smaller than the tokenizer"):
        build_model("bilstm", 2, (12,), text=INFO, args={"vocab_size": 10})
    with pytest.raises(ModelError, match="hidden must be at least 1"):
        BiLSTMClassifier(2, 50, hidden=0)
    with pytest.raises(ModelError, match="image model"):
        build_model("cnn_small", 2, (12,), text=INFO)


def test_ce_leaves_out_unlabelled_samples_and_gives_zero_when_none_is_labelled():
    ce = LOSSES.get("ce")()
    logits = torch.randn(4, 3, requires_grad=True)
    labels = torch.tensor([2, -100, 0, -100])
    expected = nn.functional.cross_entropy(logits[[0, 2]], labels[[0, 2]])
    assert torch.allclose(ce(logits, None, labels), expected)
    nothing = ce(logits, None, torch.full((4,), -100))
    assert nothing.item() == 0.0 and not torch.isnan(nothing)
    nothing.backward()
    assert torch.equal(logits.grad, torch.zeros(4, 3))
    smoothed = LOSSES.get("ce")(label_smoothing=0.1)(logits, None, torch.full((4,), -100))
    assert smoothed.item() == 0.0
