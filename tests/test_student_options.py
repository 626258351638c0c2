"""Affordable TESKD students: branch types, width presets and the feature projection (method.student_branch,
method.student_width presets, method.feature_projection), and their cost line in ``teskd info``."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from teskd.build import build_model
from teskd.config import load_config
from teskd.errors import TeskdError
from teskd.methods.teskd import TESKD
from teskd.models import build_backbone
from teskd.models.student_branches import BottleneckBranch, DepthwiseBranch
from teskd.models.students import AuxiliaryBranch, HierarchicalStudents, resolve_student_width

TINY = ["model.arch=resnet18", "model.width_mult=0.125"]  # stages 8, 16, 32, 64 channels; 64-d teacher feature


def make(*overrides, num_classes=10):
    torch.manual_seed(0)
    return build_model(load_config(None, [*TINY, *overrides]), num_classes)


def batch(n=4, num_classes=10, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(n, 3, 32, 32, generator=g, dtype=dtype),
            torch.randint(0, num_classes, (n,), generator=g))


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --- branch types ---------------------------------------------------------------------------------


@pytest.mark.parametrize("c, k", [(8, 2), (12, 4), (3, 1)])
def test_branch_parameter_counts_follow_the_formulas(c, k):
    bn = 2 * c  # a BN's weight and bias
    assert count(AuxiliaryBranch(c, k)) == (c * c * k * k + c) + bn + (c * c + c) + bn
    assert count(DepthwiseBranch(c, k)) == (c * k * k + c) + bn + (c * c + c) + bn
    m = max(1, c // 4)
    assert count(BottleneckBranch(c, k)) == c * m + 2 * m + m * m * k * k + 2 * m + m * c + 2 * c


def test_branch_layouts():
    dw = DepthwiseBranch(8, 4)
    assert [type(layer) for layer in dw] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU] * 2
    assert dw[0].groups == 8 and dw[0].kernel_size == (4, 4) and dw[0].stride == (4, 4)
    assert dw[0].weight.shape == (8, 1, 4, 4) and dw[0].bias is not None and dw[3].bias is not None
    bt = BottleneckBranch(8, 4)
    assert [type(layer) for layer in bt] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU] * 3
    assert [tuple(bt[i].weight.shape) for i in (0, 3, 6)] == [(2, 8, 1, 1), (2, 2, 4, 4), (8, 2, 1, 1)]
    assert bt[3].stride == (4, 4) and all(bt[i].bias is None for i in (0, 3, 6))
    assert BottleneckBranch(3, 2)[0].out_channels == 1  # m = max(1, C // 4)
    x = torch.randn(2, 8, 16, 16)
    assert dw(x).shape == bt(x).shape == (2, 8, 4, 4)  # width kept, k-fold reduction


@pytest.mark.parametrize("branch, kind", [("conv", AuxiliaryBranch), ("depthwise", DepthwiseBranch),
                                          ("bottleneck", BottleneckBranch)])
def test_students_use_the_configured_branch_under_the_same_names(branch, kind):
    method = make(f"method.student_branch={branch}")
    students = method.students
    assert students.branch_type == branch
    assert all(type(students.get_submodule(f"downsample{lvl}")) is kind for lvl in (1, 2, 3))
    assert students.kernels == {1: 8, 2: 4, 3: 2}
    faithful = make()
    # the rest of the students is unchanged: same keys outside the branches, same heads
    other = lambda m: {k for k in m.state_dict() if ".downsample" not in k}  # noqa: E731
    assert other(method) == other(faithful)
    assert method.students.fc_b1.weight.shape == (10, 64)


def test_faithful_default_is_unchanged():
    default, explicit = make(), make("method.student_width=faithful", "method.student_branch=conv")
    assert default.students.branch_type == "conv" and default.projections is None
    assert count(default) == count(explicit) == 581_680  # resnet18 x 1/8 with its three students
    assert count(default.students) == 405_278  # (both numbers as before the branch options existed)
    assert list(default.state_dict()) == list(explicit.state_dict())
    assert not any(k.startswith("projections") for k in default.state_dict())


def test_unknown_branch_type_is_refused_by_the_students():
    info = build_backbone("resnet18", 10, 0.125).stage_info
    with pytest.raises(ValueError, match="unknown student branch type 'dense'; choose one of conv, depthwise"):
        HierarchicalStudents(info, 10, branch="dense")


# --- fast = reference for the new branches (float64: outputs and every gradient) ------------------


def _pair(overrides):
    ref = make(*overrides, "method.fast_students=false")
    with torch.random.fork_rng(devices=[]):
        fast = make(*overrides, "method.fast_students=true")
    fast.load_state_dict(ref.state_dict())
    assert ref.students.fast is False and fast.students.fast is True
    return ref.double(), fast.double()


def _step(method, x, y):
    out = method.forward_train(x, y)
    out.loss.backward()
    return out, {n: p.grad for n, p in method.named_parameters()}


@pytest.mark.parametrize("extra", [
    ["method.student_branch=depthwise"],
    ["method.student_branch=bottleneck"],
    ["method.student_branch=depthwise", "method.student_width=stage"],  # with projections
    ["method.student_branch=bottleneck", "method.student_width={1: 8, 2: 12, 3: 4}", "method.levels=[1, 3]"],
    ["method.student_branch=bottleneck", "model.arch=vgg16"],  # kernels 4, 2, 1
])
def test_fast_equals_reference_for_the_new_branches(extra):
    ref, fast = _pair(extra)
    x, y = batch(4, dtype=torch.float64)
    out_ref, g_ref = _step(ref, x, y)
    out_fast, g_fast = _step(fast, x, y)
    assert out_fast.loss.item() == pytest.approx(out_ref.loss.item(), rel=1e-10)
    assert out_ref.logits.keys() == out_fast.logits.keys()
    for k in out_ref.logits:
        torch.testing.assert_close(out_fast.logits[k], out_ref.logits[k], rtol=1e-9, atol=1e-12)
    assert g_ref.keys() == g_fast.keys()
    for name, g in g_ref.items():
        assert g is not None and g_fast[name] is not None, name
        err = (g_fast[name] - g).norm().item()
        assert err <= 1e-9 * g.norm().item() + 1e-12, (name, err)
    for (name, b_ref), b_fast in zip(ref.named_buffers(), fast.buffers()):
        torch.testing.assert_close(b_fast, b_ref, rtol=1e-9, atol=1e-12, msg=name)


# --- width presets --------------------------------------------------------------------------------


def test_width_presets_resolve_on_a_paper_backbone():
    info = build_backbone("resnet18", 10, 0.125).stage_info
    assert [s.channels for s in info] == [8, 16, 32, 64]
    assert resolve_student_width("stage", info) == {1: 8, 2: 16, 3: 32}
    assert resolve_student_width("faithful", info) == 64
    assert resolve_student_width(None, info) == 64
    assert resolve_student_width(None, info, default="stage") == {1: 8, 2: 16, 3: 32}
    assert resolve_student_width("faithful", info, default="stage") == 64  # explicit beats the default
    assert resolve_student_width(24, info) == 24
    assert resolve_student_width({1: 4, 2: 5, 3: 6}, info) == {1: 4, 2: 5, 3: 6}
    with pytest.raises(ValueError, match="unknown student width 'narrow'"):
        resolve_student_width("narrow", info)
    stage = make("method.student_width=stage")
    assert stage.students.widths == {1: 8, 2: 16, 3: 32}
    assert {k: f.shape[1] for k, (_, f) in stage.students(stage.backbone.forward_stages(batch()[0])).items()} \
        == {"student1": 8, "student2": 16, "student3": 32}
    assert make("method.student_width=faithful").students.widths == {1: 64, 2: 64, 3: 64}


def test_none_follows_the_backbones_default_student_width():
    params = load_config(None, [*TINY]).method
    assert params.student_width is None
    backbone = build_backbone("resnet18", 10, 0.125)
    assert backbone.default_student_width == "faithful"  # paper backbones (Backbone's default)
    assert TESKD(copy.deepcopy(backbone), 10, params).students.widths == {1: 64, 2: 64, 3: 64}
    backbone.default_student_width = "stage"
    method = TESKD(copy.deepcopy(backbone), 10, params)
    assert method.students.widths == {1: 8, 2: 16, 3: 32}
    assert set(method.projections) == {"student1", "student2", "student3"}
    backbone.default_student_width = 12
    assert TESKD(copy.deepcopy(backbone), 10, params).students.widths == {1: 12, 2: 12, 3: 12}
    explicit = load_config(None, [*TINY, "method.student_width=faithful"]).method
    assert TESKD(copy.deepcopy(backbone), 10, explicit).students.widths == {1: 64, 2: 64, 3: 64}


# --- feature projection ---------------------------------------------------------------------------


def test_projections_exist_only_for_mismatched_requested_levels():
    method = make("method.student_width={1: 8, 2: 32, 3: 64}")  # 64 = the teacher's feature size
    assert list(method.projections) == ["student1", "student2"]
    for name, width in (("student1", 8), ("student2", 32)):
        proj = method.projections[name]
        assert isinstance(proj, nn.Linear) and proj.bias is None and proj.weight.shape == (64, width)
    keys = [k for k in method.state_dict() if k.startswith("projections")]
    assert keys == ["projections.student1.weight", "projections.student2.weight"]
    assert make("method.student_width={1: 8, 2: 32, 3: 64}", "method.levels=[2, 3]").projections.keys() \
        == {"student2"}
    assert make("method.student_width={1: 8, 2: 32, 3: 64}", "method.levels=[3]").projections is None
    # no feature loss, nothing to project
    assert make("method.student_width=stage", "method.feature_loss=false").projections is None
    assert make("method.student_width=stage", "method.feat_weight=0").projections is None
    # the projections train but are not deployed
    trained = {id(p) for g in method.param_groups() for p in g["params"]}
    assert all(id(p) in trained for p in method.projections.parameters())
    assert not any("projection" in k for k in method.deploy_module.state_dict())


def test_projected_feature_loss_is_the_hand_computed_value():
    method = make("method.student_width={1: 8, 2: 32, 3: 64}", "method.feat_weight=0.5").double()
    with torch.no_grad():  # a non-trivial projection, so a wrong mask or a missing projection shows
        for proj in method.projections.values():
            proj.weight.normal_(0, 0.3)
    x, y = batch(3, dtype=torch.float64)
    out = method.forward_train(x, y)
    # by hand: the same branches (training-mode BN: the batch statistics are the same on a second pass)
    stages = method.backbone.forward_stages(x)
    _, f_t = method.backbone.forward_head(stages[-1])
    students = method.students(stages)
    expected = 0.0
    for name, (_, f) in students.items():
        if name in ("student1", "student2"):
            f = f @ method.projections[name].weight.t()
        assert f.shape == f_t.shape
        mask = (f > 0) | (f_t > 0)
        expected += ((f - f_t) ** 2 * mask).sum().item()
    assert expected > 0
    assert out.parts["feat"].item() == pytest.approx(0.5 * expected, rel=1e-6)  # the loss sums in float32
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in method.projections.parameters())


def test_mismatch_without_projection_is_a_one_line_error():
    message = (r"teacher's 64-d feature, but student widths are \{1: 8, 2: 16, 3: 32\}; "
               r"set method.feature_projection=true")
    with pytest.raises(TeskdError, match=message) as err:
        make("method.student_width=stage", "method.feature_projection=false")
    assert "\n" not in str(err.value)
    assert make("method.student_width=stage", "method.feature_projection=false",
                "method.feature_loss=false").projections is None


# --- one training step of each branch type at the "stage" widths ----------------------------------


@pytest.mark.parametrize("branch", ["conv", "depthwise", "bottleneck"])
def test_training_step_with_stage_widths(branch):
    method = make("method.student_width=stage", f"method.student_branch={branch}", num_classes=100)
    opt = torch.optim.SGD(method.param_groups(), lr=0.1, momentum=0.9)
    x, y = batch(4, num_classes=100)
    before = {n: p.detach().clone() for n, p in method.named_parameters()}
    out = method(x, y)
    assert math.isfinite(out.loss.item()) and out.parts["feat"].item() > 0
    opt.zero_grad()
    out.loss.backward()
    for lvl in (1, 2, 3):
        proj = method.projections[f"student{lvl}"].weight
        conv = method.students.get_submodule(f"downsample{lvl}")[0].weight
        assert proj.grad is not None and proj.grad.abs().max() > 0, lvl
        assert conv.grad is not None and conv.grad.abs().max() > 0, lvl
    opt.step()
    params = dict(method.named_parameters())
    assert not torch.equal(params["projections.student1.weight"], before["projections.student1.weight"])
    assert not torch.equal(params["students.downsample1.0.weight"], before["students.downsample1.0.weight"])


# --- validation and the cost line -----------------------------------------------------------------


@pytest.mark.parametrize("override, message", [
    ("method.student_branch=dense", r"method.student_branch must be one of conv, depthwise, bottleneck, got 'dense'"),
    ("method.student_width=narrow", r"method.student_width must be an int, .* one of faithful, stage, got 'narrow'"),
    ("method.student_width='8'", r"method.student_width must be .* got '8'"),
    # a mapping's levels are integers; quoted keys get the config's type error
    ('method.student_width={"1": 8, "2": 8, "3": 8}',
     r"'method.student_width': expected int \| str \| dict\[int, int\] \| None, got \{'1': 8"),
    ("method.student_width={1: 8, 2: 8}", r"needs exactly the levels 1, 2, 3"),
    ("method.student_width=0", r"method.student_width must be >= 1"),
])
def test_invalid_student_options(override, message):
    with pytest.raises(TeskdError, match=message) as err:
        load_config(None, [override])
    assert "\n" not in str(err.value)


def test_valid_student_options_load():
    p = load_config(None, ["method.student_width=stage", "method.student_branch=bottleneck",
                           "method.feature_projection=false"]).method
    assert (p.student_width, p.student_branch, p.feature_projection) == ("stage", "bottleneck", False)
    widths = load_config(None, ["method.student_width={1: 8, 2: 16, 3: 4}"]).method.student_width
    assert widths == {1: 8, 2: 16, 3: 4}
    defaults = load_config(None, []).method
    assert (defaults.student_width, defaults.student_branch, defaults.feature_projection) == (None, "conv", True)


def test_describe_students_and_model_info():
    from teskd.evaluation import model_info

    method = make("method.student_width=stage", "method.student_branch=depthwise", num_classes=100)  # cifar100
    text = method.describe_students()
    assert text.startswith("levels 1,2,3 · widths 8/16/32")
    assert "depthwise branches (k 8/4/2)" in text and "branch at stage 4" in text
    assert "projection to 64-d for student1,student2,student3" in text
    n = count(method.students) + count(method.projections)
    assert method.student_param_count() == n and f"{n:,} parameters" in text
    assert "no projection" in make().describe_students()
    info = model_info(load_config(None, [*TINY, "method.student_width=stage", "method.student_branch=depthwise"]))
    assert info["students"] == text and info["params_students"] == n
    assert info["params_train"] == info["params_deploy"] + n
    assert "students" not in model_info(load_config(None, [*TINY, "method.name=ce"]))
