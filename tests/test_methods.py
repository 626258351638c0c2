"""The CE and TESKD methods: the total loss is the documented formula of the model's own outputs."""

import torch
import torch.nn.functional as F
import pytest

from teskd.config import load_config
from teskd.build import build_model
from teskd.losses import kd_kl, masked_feature_l2


def make(*overrides):
    torch.manual_seed(0)
    return build_model(load_config(None, ["model.width_mult=0.125", *overrides]), 10)


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(6, 3, 32, 32, generator=g), torch.randint(0, 10, (6,), generator=g)


def test_teskd_loss_is_the_official_formula():
    method = make("method.branch_ce_weights={teacher: 1.0, student2: 0.5}")
    x, y = batch()
    out = method.forward_train(x, y)
    # recompute from the branches with plain formulas
    stages = method.backbone.forward_stages(x)
    z_t, f_t = method.backbone.forward_head(stages[-1])
    students = method.students(stages)
    ce = F.cross_entropy(z_t, y) + sum(
        (0.5 if k == "student2" else 1.0) * F.cross_entropy(z, y) for k, (z, _) in students.items())
    kd = sum(kd_kl(z, z_t, 4.0) for z, _ in students.values())
    feat = sum(masked_feature_l2(f, f_t) for _, f in students.values())
    expected = 0.2 * ce + 0.8 * kd + 1e-7 * feat
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert out.parts["ce"].item() == pytest.approx(0.2 * ce.item(), rel=1e-5)
    assert out.parts["kd"].item() == pytest.approx(0.8 * kd.item(), rel=1e-5)
    assert sum(v.item() for v in out.parts.values()) == pytest.approx(out.loss.item(), rel=1e-5)
    assert set(out.logits) == {"teacher", "student1", "student2", "student3"}


@pytest.mark.parametrize("detach", [False, True])
def test_kd_gradient_reaches_teacher_head_only_when_not_detached(detach):
    # only the KD term: with CE and feature weights 0, the teacher's fc gets gradient from the KL alone
    method = make("method.ce_weight=0", "method.feat_weight=0", f"method.detach_teacher={str(detach).lower()}")
    x, y = batch()
    method.forward_train(x, y).loss.backward()
    grad = method.backbone.fc.weight.grad
    if detach:
        assert grad is None or grad.abs().max() == 0
    else:
        assert grad is not None and grad.abs().max() > 0
    # the students always learn from the KL
    assert method.students.fc_b1.weight.grad.abs().max() > 0


def test_levels_subset_and_ensemble():
    method = make("method.levels=[3]")
    x, y = batch()
    assert set(method.forward_train(x, y).logits) == {"teacher", "student3"}
    assert set(method.forward_eval(x)) == {"teacher", "student3"}  # no ensemble of one
    full = make()
    full.eval()
    scores = full.forward_eval(x)
    probs = torch.stack([scores[f"student{k}"].softmax(1) for k in (1, 2, 3)]).mean(0)
    assert torch.allclose(scores["students_ensemble"], probs, atol=1e-6)


def test_ce_method_is_the_plain_backbone():
    method = make("method.name=ce")
    x, y = batch()
    out = method.forward_train(x, y)
    assert out.loss.item() == pytest.approx(F.cross_entropy(method.backbone(x), y).item(), rel=1e-6)
    assert list(out.logits) == ["deployed"]
    assert method.deploy_module is method.backbone
    assert sum(p.numel() for p in method.parameters()) == sum(p.numel() for p in method.backbone.parameters())
