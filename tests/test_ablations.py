"""Every ablation switch of the TESKD method changes exactly what it claims to."""

import pytest
import torch
import torch.nn.functional as F

from teskd.config import load_config
from teskd.build import build_model
from teskd.errors import TeskdError
from teskd.losses import kd_kl, masked_feature_l2


def make(*overrides, arch="resnet18"):
    torch.manual_seed(0)
    return build_model(load_config(None, [f"model.arch={arch}", "model.width_mult=0.125", *overrides]), 10)


def batch():
    g = torch.Generator().manual_seed(3)
    return torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)


def branches(method, x):
    stages = method.backbone.forward_stages(x)
    z_t, f_t = method.backbone.forward_head(stages[-1])
    return z_t, f_t, method.students(stages)


def test_faithful_configuration_is_the_default():
    p = load_config(None, []).method
    assert (p.name, p.temperature, p.ce_weight, p.kd_weight, p.feat_weight) == ("teskd", 4.0, 0.2, 0.8, 1e-7)
    assert p.detach_teacher is False and p.kd_direction == "teacher_to_student" and p.feature_loss is True
    assert p.levels is None and p.student_width is None and p.branch_ce_weights == {}
    students = make().students  # None: the paper's networks default to all three students at width C
    assert students.levels == (1, 2, 3) and set(students.widths.values()) == {64}


@pytest.mark.parametrize("levels", [[1], [2], [3], [1, 3], [2, 3]])
def test_any_subset_of_student_levels(levels):
    method = make(f"method.levels={levels}")
    x, y = batch()
    out = method.forward_train(x, y)
    assert set(out.logits) == {"teacher", *(f"student{lvl}" for lvl in levels)}
    z_t, f_t, students = branches(method, x)
    kd = sum(kd_kl(z, z_t, 4.0) for z, _ in students.values())
    ce = F.cross_entropy(z_t, y) + sum(F.cross_entropy(z, y) for z, _ in students.values())
    feat = sum(masked_feature_l2(f, f_t) for _, f in students.values())
    assert out.loss.item() == pytest.approx((0.2 * ce + 0.8 * kd + 1e-7 * feat).item(), rel=1e-5)


def test_single_student_width():
    narrow = make("method.student_width=16", "method.feature_loss=false")
    assert narrow.students.widths == {1: 16, 2: 16, 3: 16}
    x, y = batch()
    _, _, students = branches(narrow, x)
    assert all(f.shape == (4, 16) for _, f in students.values())
    assert sum(p.numel() for p in narrow.students.parameters()) < sum(p.numel() for p in make().students.parameters())


def test_per_level_student_width():
    method = make("method.student_width={1: 8, 2: 32, 3: 64}", "method.feature_loss=false")
    assert method.students.widths == {1: 8, 2: 32, 3: 64}
    x, y = batch()
    _, _, students = branches(method, x)
    assert {k: f.shape[1] for k, (_, f) in students.items()} == {"student1": 8, "student2": 32, "student3": 64}
    with pytest.raises(TeskdError, match=r"teacher's 64-d feature, but student widths are \{1: 8, 2: 32\}"):
        make("method.student_width={1: 8, 2: 32, 3: 64}", "method.feature_projection=false")  # 64 = the teacher's feature at width 1/8
    # only the requested levels must match: student 3 alone has the teacher's width
    assert make("method.student_width={1: 8, 2: 32, 3: 64}", "method.levels=[3]").use_feature_loss
    with pytest.raises(TeskdError, match="needs exactly the levels 1, 2, 3"):
        make("method.student_width={1: 8, 2: 32}")


def test_width_mismatch_is_fine_without_the_feature_loss():
    method = make("method.student_width={1: 8, 2: 32, 3: 64}", "method.feature_loss=false")
    x, y = batch()
    assert method.forward_train(x, y).parts["feat"].item() == 0.0


@pytest.mark.parametrize("direction", ["teacher_to_student", "student_to_teacher"])
def test_kd_direction(direction):
    method = make(f"method.kd_direction={direction}", "method.ce_weight=0", "method.feat_weight=0")
    x, y = batch()
    out = method.forward_train(x, y)
    z_t, _, students = branches(method, x)
    if direction == "teacher_to_student":
        kd = sum(kd_kl(z, z_t, 4.0) for z, _ in students.values())
    else:
        kd = sum(kd_kl(z_t, z, 4.0) for z, _ in students.values())
    assert out.loss.item() == pytest.approx(0.8 * kd.item(), rel=1e-5)


@pytest.mark.parametrize("direction", ["teacher_to_student", "student_to_teacher"])
@pytest.mark.parametrize("detach", [False, True])
def test_detach_blocks_kd_gradient_into_the_teacher_in_both_directions(direction, detach):
    method = make(f"method.kd_direction={direction}", f"method.detach_teacher={str(detach).lower()}",
                  "method.ce_weight=0", "method.feat_weight=0")
    x, y = batch()
    method.forward_train(x, y).loss.backward()
    grad = method.backbone.fc.weight.grad
    assert (grad is None or grad.abs().max() == 0) == detach


@pytest.mark.parametrize("t", [1.0, 3.0, 4.0])
def test_temperature(t):
    method = make(f"method.temperature={t}", "method.ce_weight=0", "method.feat_weight=0")
    x, y = batch()
    z_t, _, students = branches(method, x)
    kd = sum(kd_kl(z, z_t, t) for z, _ in students.values())
    assert method.forward_train(x, y).loss.item() == pytest.approx(0.8 * kd.item(), rel=1e-5)


def test_loss_weights_scale_their_parts():
    x, y = batch()
    base = make().forward_train(x, y).parts
    scaled = make("method.ce_weight=0.5", "method.kd_weight=0.1", "method.feat_weight=1e-3").forward_train(x, y)
    assert scaled.parts["ce"].item() == pytest.approx(base["ce"].item() * 0.5 / 0.2, rel=1e-5)
    assert scaled.parts["kd"].item() == pytest.approx(base["kd"].item() * 0.1 / 0.8, rel=1e-5)
    assert scaled.parts["feat"].item() == pytest.approx(base["feat"].item() * 1e-3 / 1e-7, rel=1e-4)
    assert base["feat"].item() > 0


def test_feature_loss_switch():
    x, y = batch()
    on = make().forward_train(x, y)
    off = make("method.feature_loss=false").forward_train(x, y)
    assert off.parts["feat"].item() == 0.0
    assert off.loss.item() == pytest.approx((on.parts["ce"] + on.parts["kd"]).item(), rel=1e-6)


def test_per_branch_ce_weights():
    x, y = batch()
    method = make("method.branch_ce_weights={teacher: 2.0, student1: 0.0}", "method.kd_weight=0",
                  "method.feat_weight=0")
    z_t, _, students = branches(method, x)
    ce = 2.0 * F.cross_entropy(z_t, y) + sum(F.cross_entropy(students[k][0], y) for k in ("student2", "student3"))
    assert method.forward_train(x, y).loss.item() == pytest.approx(0.2 * ce.item(), rel=1e-5)


@pytest.mark.parametrize("override, message", [
    ("method.kd_direction=sideways", "method.kd_direction must be one of teacher_to_student, student_to_teacher"),
    ("method.levels=[0]", "method.levels must be distinct student levels"),
    ("method.levels=[2, 2]", "method.levels must be distinct student levels"),
    ("method.student_width=0", "method.student_width must be >= 1"),
    ("method.temperature=0", "method.temperature must be > 0"),
])
def test_invalid_ablation_values(override, message):
    with pytest.raises(TeskdError, match=message):
        load_config(None, [override])


def test_students_follow_the_official_init_of_their_backbone():
    vgg = make(arch="vgg16")  # official VGG init covers the students: heads N(0, 0.01), zero bias
    assert vgg.students.fc_b1.bias.abs().max() == 0 and vgg.students.fc_b1.weight.std() < 0.02
    resnet = make()  # official ResNet leaves PyTorch's default init (non-zero head bias)
    assert resnet.students.fc_b1.bias.abs().max() > 0
