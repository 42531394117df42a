"""Specialists (Hinton et al. 2015, section 5): clusters, training data, the combination, the stage."""

import json
import math

import pytest
import torch
from torch import nn

from featkd import specialists as sp
from featkd.config import load_config
from featkd.errors import ConfigError
from featkd.trainer import train


def objective(q, general, experts, clusters, active):
    value = -(general * q.log()).sum()
    for m, (p, cluster) in enumerate(zip(experts, clusters)):
        if active[m]:
            inside = q[cluster]
            outside = 1 - inside.sum()
            value = value - (p[:-1] * inside.log()).sum() - p[-1] * outside.log()
    return value


def test_the_combination_minimises_the_papers_objective():
    general = torch.tensor([[0.1, 0.05, 0.5, 0.2, 0.1, 0.05]])  # class 2 on top: the {2, 3} specialist
    clusters = [[2, 3], [0, 5]]
    experts = [torch.tensor([[0.1, 0.8, 0.1]]), torch.tensor([[0.3, 0.3, 0.4]])]
    log_q = sp.combine(general, experts, clusters, top_n=1, iterations=2000)
    q = log_q.exp()[0]
    assert q.sum().item() == pytest.approx(1.0, abs=1e-5)
    # a direct minimisation over softmax logits reaches the same distribution
    z = general[0].log().clone().requires_grad_()
    optimizer = torch.optim.LBFGS([z], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14)

    def closure():
        optimizer.zero_grad()
        loss = objective(torch.softmax(z, 0), general[0], [e[0] for e in experts], clusters, [True, False])
        loss.backward()
        return loss

    optimizer.step(closure)
    torch.testing.assert_close(q, torch.softmax(z, 0).detach(), atol=1e-4, rtol=1e-3)
    assert q[3] > general[0, 3]  # the specialist's confidence in class 3 moved q towards it


def test_without_an_active_specialist_the_generalist_decides():
    general = torch.tensor([[0.7, 0.2, 0.1]])
    log_q = sp.combine(general, [torch.tensor([[0.9, 0.05, 0.05]])], [[1, 2]], top_n=1)
    torch.testing.assert_close(log_q.exp(), general)


def test_clusters_group_the_classes_the_generalist_confuses():
    torch.manual_seed(0)
    n = 400
    probs = torch.full((n, 6), 0.02)
    which = torch.randint(0, 3, (n,))
    split = torch.rand(n)
    for pair, (a, b) in enumerate([(0, 1), (2, 3), (4, 5)]):
        rows = which == pair
        probs[rows, a] = 0.9 * split[rows]
        probs[rows, b] = 0.9 * (1 - split[rows])
    clusters = sp.confusion_clusters(probs, 3)
    assert sorted(clusters) == [[0, 1], [2, 3], [4, 5]]


def test_a_specialist_starts_from_the_generalist_with_a_dustbin_output():
    generalist = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 10))
    expert = sp.specialist_from(generalist, [3, 7])
    assert expert[2].out_features == 3
    assert torch.equal(expert[0].weight, generalist[0].weight) and expert[0].weight is not generalist[0].weight
    labels = sp.SpecialistLabels(torch.utils.data.TensorDataset(torch.zeros(5, 4), torch.tensor([3, 7, 1, 9, 3])),
                                 [3, 7], 10)
    assert labels.targets.tolist() == [0, 1, 2, 2, 0] and int(labels[1][1]) == 1
    sampler = sp.SpecialtySampler(labels.targets < 2, fraction=0.5)
    drawn = torch.tensor(list(sampler))
    assert len(drawn) == 5 and (labels.targets[drawn] < 2).sum() in (2, 3)


SPECIALISTS = """
name: specialists
data: {name: mnist1d, args: {num_samples: 1500}}
models:
  generalist: {model: mlp, args: {hidden: [32]}}
  student: {model: mlp, args: {hidden: [32]}}
stages:
  - {name: generalist, model: generalist, train: {epochs: 3}}
  - name: specialists
    specialists: {generalist: generalist, clusters: 2}
    train: {epochs: 2}
  - {name: distill, model: student, teacher: specialists, loss: {ce: {weight: 0.1}, kd: {weight: 0.9}},
     train: {epochs: 2}}
logger: none
progress: false
"""


def test_a_specialists_stage_builds_an_ensemble_that_teaches(tmp_path):
    path = tmp_path / "specialists.yaml"
    path.write_text(SPECIALISTS)
    result = train(load_config(path, [f"output_dir={tmp_path}"]))
    state = json.loads((result.run_dir / "state.json").read_text())["stages"]
    assert state["specialists"]["status"] == "done" and 1 <= len(state["specialists"]["clusters"]) <= 2
    assert 0 < state["specialists"]["generalist_acc"] <= 100
    assert result.teacher_models == ["specialists"]
    assert result.teacher_acc == [pytest.approx(result.stages["specialists"].last_acc)]
    assert list(result.stages) == ["generalist", "specialists", "distill"]


@pytest.mark.parametrize("override,message", [
    ("stages.1.specialists.generalist=nobody", "no model 'nobody'"),
    ("stages.1.model=student", "give exactly one"),
    ("stages.1.teacher=[generalist]", "takes no `teacher` or `loss`"),
])
def test_specialist_stages_are_validated(tmp_path, override, message):
    path = tmp_path / "specialists.yaml"
    path.write_text(SPECIALISTS)
    with pytest.raises(ConfigError, match=message):
        load_config(path, [override])


def test_clusters_follow_confusions_not_how_sure_the_generalist_is():
    # ten classes: 1, 4 and 9 confused with each other, 2 with 5, 3 with 8; 0, 6 and 7 easy. With the
    # variances on the diagonal, the easy classes would stand apart and the confusions merge.
    torch.manual_seed(0)
    groups = [[1, 4, 9], [2, 5], [3, 8], [0], [6], [7]]
    rows = []
    for _ in range(2000):
        group = groups[int(torch.randint(len(groups), ()))]
        p = torch.full((10,), 0.002)
        share = torch.distributions.Dirichlet(torch.ones(len(group))).sample() if len(group) > 1 else torch.ones(1)
        p[group] = 0.98 * share
        rows.append(p / p.sum())
    clusters = sp.confusion_clusters(torch.stack(rows), 3)
    for group in groups[:3]:
        assert any(set(group) <= set(c) for c in clusters), (group, clusters)
    assert all(len(c) >= 2 for c in clusters)
    with pytest.raises(ConfigError, match="between 1 and 5"):
        sp.confusion_clusters(torch.stack(rows), 6)


def test_the_dustbin_correction_gives_the_posterior_under_the_data_frequencies():
    # a specialist trained where its classes are half the data, though they are 30% of it
    logits = torch.tensor([1.0, 0.3, 0.5])  # two specialty classes, then the dustbin
    trained = torch.softmax(logits, 0)
    shift = sp.dustbin_correction(share_in_data=0.3, share_in_training=0.5)
    assert shift == pytest.approx(math.log(7 / 3))
    corrected = torch.softmax(logits + torch.tensor([0.0, 0.0, shift]), 0)
    reweighted = trained * torch.tensor([0.3 / 0.5, 0.3 / 0.5, 0.7 / 0.5])  # Bayes: the data's priors
    torch.testing.assert_close(corrected, reweighted / reweighted.sum())
    expert = nn.Sequential(nn.Linear(4, 3))
    before = expert[0].bias.clone()
    sp.correct_dustbin(expert, 0.3, 0.5)
    torch.testing.assert_close(expert[0].bias - before, torch.tensor([0.0, 0.0, shift]))
