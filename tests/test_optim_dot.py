"""DOT (Zhao et al. 2023): the optimizer against its update rule written out, its reduction to
SGD, the training step that feeds it the two gradients apart, and what it refuses."""

import pytest
import torch
from torch import nn

from featkd.checkpoint import load_checkpoint
from featkd.config import load_config
from featkd.errors import ConfigError
from featkd.optim import OPTIMIZERS, DistillationOrientedSGD
from featkd.trainer import train

QUICK = ["logger=none", "progress=false", "measure=false", "teacher.train.epochs=1", "train.epochs=2",
         "data.args.augment=false"]


def quick(tmp_path, *extra):
    return load_config("configs/quickstart.yaml", [f"output_dir={tmp_path}", *QUICK, *extra])


def reference_dot(params, steps, lr, mu, delta, wd):
    """The update written out: per parameter a task buffer (mu - delta, with weight decay) and a
    distillation buffer (mu + delta); one buffer with mu where only one gradient came."""
    params = [p.detach().clone() for p in params]
    buffers = [{} for _ in params]
    for grads in steps:  # grads: per parameter (task gradient or None, distillation gradient or None)
        for i, (task, distill) in enumerate(grads):
            both = task is not None and distill is not None
            update = torch.zeros_like(params[i])
            for key, grad, momentum, decays in (("t", task, mu - delta if both else mu, True),
                                                ("d", distill, mu + delta if both else mu, not both)):
                if grad is None:
                    continue
                grad = grad + wd * params[i] if decays else grad
                buffers[i][key] = grad.clone() if key not in buffers[i] else momentum * buffers[i][key] + grad
                update = update + buffers[i][key]
            params[i] = params[i] - lr * update
    return params


def test_dot_follows_its_update_rule_with_two_buffers_and_one_for_a_single_gradient():
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(3, 2, dtype=torch.float64)) for _ in range(3)]
    optimizer = DistillationOrientedSGD(params, lr=0.1, momentum=0.9, delta=0.075, weight_decay=0.01)
    steps = []
    for step in range(4):
        # parameter 0 gets both gradients, 1 only the distillation one (an adapter), 2 only the task one
        task = [torch.randn(3, 2, dtype=torch.float64), None, torch.randn(3, 2, dtype=torch.float64)]
        distill = [torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64), None]
        for p, g in zip(params, distill):
            p.grad = g
        optimizer.set_aside_distillation_gradient()
        assert all(p.grad is None for p in params)
        for p, g in zip(params, task):
            p.grad = g
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        steps.append(list(zip(task, distill)))
    for got, want in zip(params, reference_dot([nn.Parameter(p) for p in reference_start()], steps, 0.1, 0.9,
                                               0.075, 0.01)):
        torch.testing.assert_close(got.detach(), want, rtol=1e-12, atol=1e-12)


def reference_start():
    torch.manual_seed(0)
    return [torch.randn(3, 2, dtype=torch.float64) for _ in range(3)]


def test_dot_with_no_delta_is_sgd_on_the_summed_gradient():
    torch.manual_seed(1)
    start = torch.randn(5, dtype=torch.float64)
    dot_param, sgd_param = nn.Parameter(start.clone()), nn.Parameter(start.clone())
    dot = DistillationOrientedSGD([dot_param], lr=0.05, momentum=0.9, delta=0.0, weight_decay=5e-4)
    sgd = torch.optim.SGD([sgd_param], lr=0.05, momentum=0.9, weight_decay=5e-4)
    for _ in range(5):
        task, distill = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
        dot_param.grad = distill
        dot.set_aside_distillation_gradient()
        dot_param.grad = task
        dot.step()
        sgd_param.grad = task + distill
        sgd.step()
    torch.testing.assert_close(dot_param.detach(), sgd_param.detach(), rtol=1e-12, atol=1e-12)
    # and with delta, the same gradients go elsewhere
    moved = nn.Parameter(start.clone())
    other = DistillationOrientedSGD([moved], lr=0.05, momentum=0.9, delta=0.075)
    for _ in range(3):
        moved.grad = torch.ones(5, dtype=torch.float64)
        other.set_aside_distillation_gradient()
        moved.grad = -torch.ones(5, dtype=torch.float64)
        other.step()
    assert not torch.allclose(moved.detach(), start)  # opposite gradients, different momenta: not a standstill


def test_accumulated_distillation_gradients_add_up():
    p = nn.Parameter(torch.zeros(2))
    optimizer = DistillationOrientedSGD([p], lr=1.0, momentum=0.9, delta=0.075, weight_decay=0.0)
    for g in (torch.tensor([1.0, 2.0]), torch.tensor([3.0, -1.0])):
        p.grad = g
        optimizer.set_aside_distillation_gradient()
    optimizer.step()  # only the distillation gradient: p -= lr * (g1 + g2)
    torch.testing.assert_close(p.detach(), torch.tensor([-4.0, -1.0]))


def test_dot_refuses_momenta_outside_zero_one():
    p = [nn.Parameter(torch.zeros(1))]
    with pytest.raises(ConfigError, match="momentum - delta and momentum \\+ delta must lie in"):
        OPTIMIZERS.build("dot", params=p, momentum=0.95, delta=0.075)
    with pytest.raises(ConfigError, match="lr must be > 0"):
        OPTIMIZERS.build("dot", params=p, lr=0.0)


def test_a_run_with_dot_and_no_delta_trains_the_student_as_sgd_does(tmp_path):
    """End to end: the step backpropagates the distillation terms, sets their gradient aside,
    then the task term; with delta 0 that is SGD on the sum, so the weights agree."""
    sgd = train(quick(tmp_path / "sgd"))
    dot = train(quick(tmp_path / "dot", "train.optimizer={name: dot, lr: 0.05, momentum: 0.9, delta: 0.0, "
                                        "weight_decay: 5.0e-4}"))
    a = load_checkpoint(sgd.run_dir / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(dot.run_dir / "checkpoints" / "last.pt")["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    moved = train(quick(tmp_path / "delta", "train.optimizer={name: dot, delta: 0.075}"))
    c = load_checkpoint(moved.run_dir / "checkpoints" / "last.pt")["model"]
    assert any(not torch.allclose(a[k], c[k], atol=1e-4) for k in a if a[k].is_floating_point())


def test_the_distiller_names_its_task_terms_and_splits_the_loss():
    from featkd import Distiller, Term
    from featkd.models import build_model

    teacher, student = build_model("cnn_small", 10, (1, 8, 8)), build_model("cnn_tiny", 10, (1, 8, 8))
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    out = Distiller(teacher, student, [Term("ce", 0.1), Term("kd", 0.9), Term("at", 10.0, student="layer2",
                                                                              teacher="layer2")])(x, y)
    assert out.task_terms == ("ce",)
    task, distill = out.split()
    torch.testing.assert_close(task, out.losses["ce"])
    torch.testing.assert_close(distill, out.losses["kd"] + out.losses["at"])


@pytest.mark.parametrize("override,message", [
    ("precision=fp16", "use precision bf16 or fp32"),
    ("train.grad_clip=1.0", "remove train.grad_clip"),
])
def test_dot_refuses_what_it_cannot_combine_with_before_anything_trains(tmp_path, override, message):
    with pytest.raises(ConfigError, match=f"stage 'distill': optimizer 'dot' .*{message}"):
        train(quick(tmp_path, "train.optimizer.name=dot", override))
    assert not list(tmp_path.rglob("*.pt"))  # not even the teacher was trained
