"""The TESKD loss terms against values computed by hand."""

import math

import pytest
import torch

from teskd.losses import kd_kl, masked_feature_l2


def _softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def _kl_by_hand(student, teacher, t, eps=1e-7):
    total = 0.0
    for zs, zt in zip(student, teacher):
        p = [v + eps for v in _softmax([z / t for z in zt])]
        q = _softmax([z / t for z in zs])
        total += sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))
    return t * t * total / len(student)


def test_kl_literal_value():
    # teacher probabilities [1/4, 3/4], student [1/2, 1/2], T = 1:
    # KL = 1/4 ln(1/2) + 3/4 ln(3/2) = 0.130812...
    teacher = torch.tensor([[0.0, math.log(3.0)]])
    student = torch.zeros(1, 2)
    assert kd_kl(student, teacher, temperature=1.0, eps=0.0).item() == pytest.approx(0.1308120, abs=1e-6)


@pytest.mark.parametrize("t", [1.0, 3.0, 4.0])
def test_kl_matches_hand_computation(t):
    student = [[1.0, -2.0, 0.5, 3.0], [0.0, 0.1, 0.2, -0.3]]
    teacher = [[2.0, 0.0, -1.0, 1.0], [1.5, -0.5, 0.0, 0.25]]
    got = kd_kl(torch.tensor(student), torch.tensor(teacher), temperature=t)
    assert got.item() == pytest.approx(_kl_by_hand(student, teacher, t), rel=1e-5)


def test_kl_eps_is_added_to_teacher_probabilities_unnormalised():
    student = torch.tensor([[0.3, -0.1, 0.0]])
    teacher = torch.tensor([[5.0, -5.0, 0.0]])
    with_eps = kd_kl(student, teacher, 1.0, eps=1e-3).item()
    assert with_eps == pytest.approx(_kl_by_hand(student.tolist(), teacher.tolist(), 1.0, eps=1e-3), rel=1e-6)
    assert with_eps != pytest.approx(kd_kl(student, teacher, 1.0, eps=0.0).item(), rel=1e-4)


def test_kl_is_zero_for_identical_logits_without_eps():
    z = torch.randn(5, 10)
    assert kd_kl(z, z.clone(), 4.0, eps=0.0).item() == pytest.approx(0.0, abs=1e-6)


def test_kl_gradient_reaches_the_teacher_too():
    """kd_kl does not detach its target (official); the method detaches it when asked."""
    teacher = torch.tensor([[2.0, 0.0, -1.0]], requires_grad=True)
    student = torch.tensor([[0.0, 1.0, 0.5]], requires_grad=True)
    kd_kl(student, teacher, 4.0).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is not None and teacher.grad.abs().sum() > 1e-6


def test_kl_teacher_gradient_matches_finite_difference():
    teacher = torch.tensor([[2.0, 0.0, -1.0]], dtype=torch.float64, requires_grad=True)
    student = torch.tensor([[0.0, 1.0, 0.5]], dtype=torch.float64)
    kd_kl(student, teacher, 4.0).backward()
    h = 1e-6
    for j in range(3):
        up, down = teacher.detach().clone(), teacher.detach().clone()
        up[0, j] += h
        down[0, j] -= h
        fd = (_kl_by_hand(student.tolist(), up.tolist(), 4.0) - _kl_by_hand(student.tolist(), down.tolist(), 4.0)) / (2 * h)
        assert teacher.grad[0, j].item() == pytest.approx(fd, rel=1e-4, abs=1e-8)


def test_feature_loss_is_masked_sum():
    f_s = torch.tensor([[1.0, -1.0, 0.0, 2.0]])
    f_t = torch.tensor([[0.5, -2.0, 0.0, -1.0]])
    # mask: (1>0) yes, (-1,-2) no, (0,0) no, (2>0) yes -> 0.25 + 9
    assert masked_feature_l2(f_s, f_t).item() == pytest.approx(9.25)
    # a sum over the batch, not a mean: two copies double it
    assert masked_feature_l2(f_s.repeat(2, 1), f_t.repeat(2, 1)).item() == pytest.approx(18.5)


def test_feature_loss_flattens_pooled_maps_and_detaches_teacher():
    f_s = torch.tensor([[[[1.0]], [[3.0]]]], requires_grad=True)  # (1, 2, 1, 1)
    f_t = torch.tensor([[[[0.0]], [[1.0]]]], requires_grad=True)
    loss = masked_feature_l2(f_s, f_t.flatten(1))
    assert loss.item() == pytest.approx(1.0 + 4.0)
    loss.backward()
    assert f_t.grad is None
    assert f_s.grad.flatten().tolist() == pytest.approx([2.0, 4.0])
