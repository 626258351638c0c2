"""Backbones, hierarchical students, the model as built for training, parameter and MAC counts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from teskd.build import build_model
from teskd.config import load_config
from teskd.errors import TeskdError
from teskd.models import HierarchicalStudents, StageInfo, build_backbone, count_macs, count_params, list_backbones
from teskd.models.registry import register_backbone
from teskd.models.students import branch_stage

from conftest import randomize_bn

ARCHS = ("resnet18", "resnet34", "resnet50")
# official counts, 100 classes: (teacher alone, teacher + students)
OFFICIAL_PARAMS = {
    "resnet18": (11_220_132, 37_050_832),
    "resnet34": (21_328_292, 47_158_992),
    "resnet50": (23_705_252, 434_915_280),
}


def make_method(arch="resnet18", width_mult=1.0, levels=(1, 2, 3), device="cpu", classes=100, *extra):
    """The TESKD model exactly as training builds it."""
    overrides = [f"model.arch={arch}", f"model.width_mult={width_mult}", f"method.levels={list(levels)}", *extra]
    with torch.device(device):
        return build_model(load_config(None, overrides), classes)


def branches(method, x):
    """``{branch: (logits, pooled feature)}``, the teacher first."""
    stages = method.backbone.forward_stages(x)
    return {"teacher": method.backbone.forward_head(stages[-1]), **method.students(stages)}


def stage_info(chs, reductions=(1, 2, 4, 8)):
    return tuple(StageInfo(c, r, f"layer{i}") for i, (c, r) in enumerate(zip(chs, reductions), 1))


# ---------------------------------------------------------------- parameter counts


def basic_resnet_params(chs, blocks, classes):
    """Parameter count of a BasicBlock CIFAR ResNet with stage channels ``chs`` (stem = chs[0])."""
    total = 3 * 9 * chs[0] + 2 * chs[0]
    in_ch = chs[0]
    for out_ch, n in zip(chs, blocks):
        for b in range(n):
            total += 9 * in_ch * out_ch + 2 * out_ch + 9 * out_ch * out_ch + 2 * out_ch
            if in_ch != out_ch or (b == 0 and out_ch != chs[0]):
                total += in_ch * out_ch + 2 * out_ch
            in_ch = out_ch
    return total + in_ch * classes + classes


def student_params(stage_chs, width, classes, kernels=(8, 4, 2), levels=(1, 2, 3)):
    """Closed form; ``width`` is C or {level: C_L} (S4 has the level-3 width: C_4 = C_3)."""
    w = {1: width, 2: width, 3: width} if isinstance(width, int) else dict(width)
    w[4] = w[3]
    lo = min(levels)
    total = sum(stage_chs[i - 1] * w[i] + 2 * w[i] for i in range(lo, 5))  # laterals on T_lo..T4
    total += sum(w[L + 1] * w[L] + 2 * w[L] for L in range(lo, 4))  # upsample S(L+1) -> level L
    total += sum(2 * w[L] * w[L] + 2 * w[L] for L in range(lo, 4))  # fuse
    for level in levels:
        k, c = kernels[level - 1], w[level]
        total += k * k * c * c + c + 2 * c + c * c + c + 2 * c  # auxiliary branch
        total += c * classes + classes  # head
    return total


@pytest.mark.parametrize("arch", ARCHS)
def test_official_param_counts(arch):
    method = make_method(arch, device="meta")
    teacher, total = OFFICIAL_PARAMS[arch]
    assert count_params(method.backbone) == teacher
    assert count_params(method) == total


def test_derived_param_formulas_match_official():
    assert basic_resnet_params((64, 128, 256, 512), (2, 2, 2, 2), 100) == 11_220_132
    assert student_params((64, 128, 256, 512), 512, 100) == 25_830_700
    assert student_params((256, 512, 1024, 2048), 2048, 100) == 434_915_280 - 23_705_252


def test_width_mult_scales_every_channel():
    b = build_backbone("resnet18", 100, width_mult=0.25)
    assert b.stage_info == stage_info((16, 32, 64, 128))
    assert b.num_features == 128 and b.conv1.out_channels == 16
    assert count_params(b) == basic_resnet_params((16, 32, 64, 128), (2, 2, 2, 2), 100)
    s = HierarchicalStudents(b.stage_info, 100)  # the faithful width: the last stage's channels
    assert s.widths == {1: 128, 2: 128, 3: 128}
    assert count_params(s) == student_params((16, 32, 64, 128), 128, 100)
    b50 = build_backbone("resnet50", 10, width_mult=0.25)
    assert [i.channels for i in b50.stage_info] == [64, 128, 256, 512]
    assert b50.layer1[0].conv1.out_channels == 16
    assert all(m.out_channels < 2048 for m in b50.modules() if isinstance(m, nn.Conv2d))


# ---------------------------------------------------------------- shapes and naming


@pytest.mark.parametrize("arch", ARCHS)
def test_stage_reductions_and_spatial_sizes(arch):
    b = build_backbone(arch, 10, width_mult=0.25).eval()
    assert [i.reduction for i in b.stage_info] == [1, 2, 4, 8]
    with torch.no_grad():
        stages = b.forward_stages(torch.randn(2, 3, 32, 32))
    assert [t.shape[-1] for t in stages] == [32, 16, 8, 4]
    assert [t.shape[1] for t in stages] == [i.channels for i in b.stage_info]


@pytest.mark.parametrize("width_mult", [0.25, 1.0])
def test_output_shapes_every_branch(width_mult):
    method = make_method("resnet18", width_mult, classes=10)
    c = int(512 * width_mult)
    assert method.students.widths == {1: c, 2: c, 3: c}
    with torch.no_grad():
        out = branches(method, torch.randn(2, 3, 32, 32))
    assert list(out) == ["teacher", "student1", "student2", "student3"]
    for logits, feature in out.values():
        assert logits.shape == (2, 10) and feature.shape == (2, c)


def test_module_names_match_official():
    backbone_keys = set(build_backbone("resnet18", 100).state_dict())
    for key in ("conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer2.0.downsample.0.weight",
                "layer2.0.downsample.1.running_var", "layer4.1.bn2.bias", "fc.weight", "fc.bias"):
        assert key in backbone_keys
    assert not any(k.startswith("layer1.0.downsample") for k in backbone_keys)
    assert "layer1.0.conv3.weight" in build_backbone("resnet50", 100, 0.25).state_dict()
    s = HierarchicalStudents(build_backbone("resnet18", 100, 0.25).stage_info, 100, 128)
    keys = set(s.state_dict())
    for key in ("laterals.0.0.weight", "laterals.3.1.running_mean", "upsample.0.1.weight", "upsample.2.2.bias",
                "fuse_1.0.weight", "fuse_3.1.weight", "downsample1.0.weight", "downsample1.0.bias",
                "downsample3.3.bias", "downsample2.4.running_var", "fc_b1.weight", "fc_b3.bias"):
        assert key in keys
    assert s.downsample1[0].kernel_size == (8, 8) and s.downsample1[0].stride == (8, 8)
    assert s.downsample2[0].kernel_size == (4, 4) and s.downsample3[0].kernel_size == (2, 2)
    assert all(s.upsample[j][0].scale_factor == 2 for j in "012")


def test_levels_subset():
    bb = build_backbone("resnet18", 10, 0.25)
    s3 = HierarchicalStudents(bb.stage_info, 10, 128, levels=(3,))
    assert set(s3.laterals) == {"2", "3"} and set(s3.upsample) == {"2"}
    names = {n for n, _ in s3.named_children()}
    assert names == {"laterals", "upsample", "fuse_3", "downsample3", "fc_b3"}
    assert count_params(s3) == student_params((16, 32, 64, 128), 128, 10, levels=(3,))
    s1 = HierarchicalStudents(bb.stage_info, 10, 128, levels=(1,))
    names = {n for n, _ in s1.named_children()}
    assert names == {"laterals", "upsample", "fuse_1", "fuse_2", "fuse_3", "downsample1", "fc_b1"}
    assert count_params(s1) == student_params((16, 32, 64, 128), 128, 10, levels=(1,))
    x = torch.randn(2, 3, 32, 32)
    for levels, keys in (((3,), ["student3"]), ((1,), ["student1"]), ((3, 1), ["student1", "student3"])):
        out = branches(make_method("resnet18", 0.25, levels=levels, classes=10), x)
        assert list(out) == ["teacher", *keys]
        assert all(out[k][0].shape == (2, 10) and out[k][1].shape == (2, 128) for k in keys)
    for bad in ((), (0,), (4,)):  # user input is validated by the config; these are programming errors
        with pytest.raises(ValueError):
            HierarchicalStudents(bb.stage_info, 10, 128, levels=bad)
    with pytest.raises(ValueError):
        HierarchicalStudents(bb.stage_info[:3], 10, 128)


def test_input_size_picks_the_branch_stage():
    """The deepest stage whose map is at least 2x2: T4 for ResNets at 32 px, T3 for VGG (T4 is 1x1 there)."""
    info = build_backbone("resnet18", 10, 0.25).stage_info  # reductions 1, 2, 4, 8
    vgg = build_backbone("vgg16", 10, 0.25).stage_info  # reductions 4, 8, 16, 32
    assert [branch_stage(info, size) for size in (32, 16, 15, 8, 4, 2)] == [4, 4, 3, 3, 2, 1]
    assert [branch_stage(vgg, size) for size in (32, 64, 224)] == [3, 4, 4]
    with pytest.raises(ValueError, match="input size 1"):
        branch_stage(info, 1)
    assert HierarchicalStudents(info, 10, 32).branch_stage == 4  # input size 32 by default
    for size, stage, kernels in ((8, 3, (4, 2, 1)), (32, 4, (8, 4, 2))):
        s = HierarchicalStudents(info, 10, 32, input_size=size).eval()
        assert s.branch_stage == stage
        assert [s.branch(level)[0].kernel_size for level in (1, 2, 3)] == [(k, k) for k in kernels]
        assert [s.branch(level)[0].stride for level in (1, 2, 3)] == [(k, k) for k in kernels]
        assert count_params(s) == student_params((16, 32, 64, 128), 32, 10, kernels=kernels)
        stages = [torch.randn(2, i.channels, size // i.reduction, size // i.reduction) for i in info]
        with torch.no_grad():
            fused = s.top_down(stages)
            end = size // info[stage - 1].reduction  # every branch reaches the T_branch_stage size, >= 2x2
            assert all(s.branch(level)(fused[level]).shape == (2, 32, end, end) for level in (1, 2, 3))
            assert all(f.shape == (2, 32) for _, f in s(stages).values())
    # at 4 px the branch stage is T2: fine for levels 1 and 2 (kernels 2, 1), level 3 would need kernel 1/2
    s12 = HierarchicalStudents(info, 10, 32, levels=(1, 2), input_size=4)
    assert [s12.branch(level)[0].kernel_size for level in (1, 2)] == [(2, 2), (1, 1)]
    with pytest.raises(ValueError, match="auxiliary branch of level 3"):
        HierarchicalStudents(info, 10, 32, input_size=4)
    # a non-integer ratio: T3 (reduction 3) is not a multiple of T2 (reduction 2)
    odd = stage_info((8, 8, 8, 8), (1, 2, 3, 6))
    assert HierarchicalStudents(odd, 10, 8, levels=(3,)).branch(3)[0].kernel_size == (2, 2)
    with pytest.raises(ValueError, match="top-down upsampling"):
        HierarchicalStudents(odd, 10, 8, levels=(2, 3))


def test_per_level_widths():
    bb = build_backbone("resnet18", 10, 0.25)
    chs = (16, 32, 64, 128)
    widths = {1: 24, 2: 40, 3: 56}
    s = HierarchicalStudents(bb.stage_info, 10, widths).eval()
    assert s.widths == widths
    assert count_params(s) == student_params(chs, widths, 10)
    # structure: S4 has width C3; upsample j maps C_{j+2} -> C_{j+1}; lateral j maps T(j+1) -> C_{j+1}
    assert s.laterals["3"][0].weight.shape == (56, 128, 1, 1)
    assert s.laterals["0"][0].weight.shape == (24, 16, 1, 1)
    assert s.upsample["2"][1].weight.shape == (56, 56, 1, 1)
    assert s.upsample["1"][1].weight.shape == (40, 56, 1, 1)
    assert s.upsample["0"][1].weight.shape == (24, 40, 1, 1)
    assert s.fuse_2[0].weight.shape == (40, 80, 1, 1)
    assert s.downsample1[0].weight.shape == (24, 24, 8, 8) and s.fc_b3.weight.shape == (10, 56)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = s(bb.eval().forward_stages(x))
    for level, c in widths.items():
        logits, feature = out[f"student{level}"]
        assert logits.shape == (2, 10) and feature.shape == (2, c)
    # a subset of levels still needs all three widths (the path's width at S4 is C3)
    s3 = HierarchicalStudents(bb.stage_info, 10, {1: 8, 2: 12, 3: 20}, levels=(3,))
    assert count_params(s3) == student_params(chs, {1: 8, 2: 12, 3: 20}, 10, levels=(3,))
    assert s3.laterals["3"][0].out_channels == 20
    s2 = HierarchicalStudents(bb.stage_info, 10, {1: 8, 2: 12, 3: 20}, levels=(2,), input_size=8)
    assert count_params(s2) == student_params(chs, {1: 8, 2: 12, 3: 20}, 10, kernels=(4, 2, 1), levels=(2,))
    for bad in ({2: 8, 3: 8}, {1: 8, 2: 8, 3: 8, 4: 8}):
        with pytest.raises(ValueError, match="need exactly the levels"):
            HierarchicalStudents(bb.stage_info, 10, bad)


def test_int_width_is_unchanged_official_resnet18():
    with torch.device("meta"):
        bb = build_backbone("resnet18", 100)
        single = HierarchicalStudents(bb.stage_info, 100, 512)
        mapped = HierarchicalStudents(bb.stage_info, 100, {1: 512, 2: 512, 3: 512})
        default = HierarchicalStudents(bb.stage_info, 100)
    assert count_params(bb) + count_params(single) == 37_050_832
    assert single.widths == {1: 512, 2: 512, 3: 512}
    # a uniform mapping and the default width build exactly the same modules (names and shapes)
    shapes = {k: v.shape for k, v in single.state_dict().items()}
    assert {k: v.shape for k, v in mapped.state_dict().items()} == shapes
    assert {k: v.shape for k, v in default.state_dict().items()} == shapes
    assert student_params((64, 128, 256, 512), {1: 512, 2: 512, 3: 512}, 100) == 37_050_832 - 11_220_132


# ---------------------------------------------------------------- values


def _cbr(seq: nn.Sequential, x: torch.Tensor, conv: int = 0) -> torch.Tensor:
    """conv -> BN (eval statistics) -> ReLU, recomputed functionally from seq[conv], seq[conv + 1]."""
    c, bn = seq[conv], seq[conv + 1]
    y = F.conv2d(x, c.weight, c.bias, stride=c.stride, padding=c.padding)
    return F.relu(F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps))


def test_students_match_functional_reference():
    torch.manual_seed(0)
    method = make_method("resnet18", 0.25, classes=10)
    randomize_bn(method)
    method.eval()
    s = method.students
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        t1, t2, t3, t4 = method.backbone.forward_stages(x)
        got = s([t1, t2, t3, t4])

        def up(j, y):
            return _cbr(s.upsample[str(j)], F.interpolate(y, scale_factor=2, mode="bilinear", align_corners=True), 1)

        s4 = _cbr(s.laterals["3"], t4)
        u3 = up(2, s4)
        s3 = _cbr(s.fuse_3, torch.cat([u3 + _cbr(s.laterals["2"], t3), u3], 1))
        u2 = up(1, s3)
        s2 = _cbr(s.fuse_2, torch.cat([u2 + _cbr(s.laterals["1"], t2), u2], 1))
        u1 = up(0, s2)
        s1 = _cbr(s.fuse_1, torch.cat([u1 + _cbr(s.laterals["0"], t1), u1], 1))
        for level, fmap, branch, head, k in ((1, s1, s.downsample1, s.fc_b1, 8), (2, s2, s.downsample2, s.fc_b2, 4),
                                             (3, s3, s.downsample3, s.fc_b3, 2)):
            assert branch[0].kernel_size == (k, k)
            y = _cbr(branch, _cbr(branch, fmap, 0), 3)
            assert y.shape[-1] == 4
            feature = y.mean(dim=(2, 3))
            logits = F.linear(feature, head.weight, head.bias)
            torch.testing.assert_close(got[f"student{level}"][1], feature, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(got[f"student{level}"][0], logits, rtol=1e-4, atol=1e-5)


def test_teacher_forward_equals_the_methods_teacher_logits():
    torch.manual_seed(0)
    method = make_method("resnet18", 0.25, classes=10)
    randomize_bn(method)
    method.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(method.backbone(x), method(x)["teacher"], rtol=0, atol=0)
        pooled = method.backbone.forward_stages(x)[-1].mean(dim=(2, 3))
        torch.testing.assert_close(branches(method, x)["teacher"][1], pooled, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["student1", "student2", "student3"])
def test_student_gradients_reach_shared_backbone(name):
    torch.manual_seed(0)
    method = make_method("resnet18", 0.25, classes=10).train()
    out = branches(method, torch.randn(4, 3, 32, 32))
    F.cross_entropy(out[name][0], torch.tensor([0, 1, 2, 3])).backward()
    g = method.backbone.layer1[0].conv1.weight.grad
    assert g is not None and g.abs().sum() > 0
    assert method.backbone.fc.weight.grad is None  # the teacher head is not on a student's path
    s = method.students
    unused = {"student3": [s.laterals["0"], s.laterals["1"], s.upsample["0"], s.upsample["1"], s.fuse_1, s.fuse_2,
                           s.downsample1, s.downsample2],
              "student2": [s.laterals["0"], s.upsample["0"], s.fuse_1, s.downsample1, s.downsample3],
              "student1": [s.downsample2, s.downsample3, s.fc_b2, s.fc_b3]}[name]
    for module in unused:
        assert all(p.grad is None for p in module.parameters())
    level = name[-1]
    assert s.get_submodule(f"fc_b{level}").weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- cost and registry


def test_macs_resnet18():
    ref = make_method("resnet18", 1.0, (1, 2, 3), "meta", 100, "method.fast_students=false")
    teacher = count_macs(ref.backbone)
    total = count_macs(ref, forward=lambda m, x: m.forward_eval(x))
    with torch.no_grad():  # everything in the forward is counted: the stage maps come from outside
        stages = ref.backbone.forward_stages(torch.zeros(1, 3, 32, 32, device="meta"))
    students = count_macs(ref.students, forward=lambda m, _: m(stages))
    print(f"\nresnet18 CIFAR MACs/image: backbone {teacher:,}  students {students:,}  total {total:,}")
    assert abs(teacher / 0.555e9 - 1) < 0.01
    assert abs(students / 1.49e9 - 1) < 0.01
    assert total == teacher + students
    assert count_macs(ref.deploy_module) == teacher
    # the fast students run the three top-down 1x1 convs (512x512) at a quarter of the pixels
    fast = make_method("resnet18", 1.0, (1, 2, 3), "meta", 100)
    executed = count_macs(fast, forward=lambda m, x: m.forward_eval(x))
    assert total - executed == 512 * 512 * (64 + 256 + 1024) * 3 // 4
    # the count does not depend on the batch size and is the same on a real device
    assert count_macs(ref.backbone, (3, 3, 32, 32)) == teacher
    assert count_macs(build_backbone("resnet18", 100, 0.25)) < teacher / 10


# reference values, captured from the code before students' initialisation moved off the backbones:
# (sum, position-weighted abs-sum) of the sorted state dict in float64, torch.manual_seed(0), width 1/8
INIT_CHECKSUMS = {
    "resnet18": ((1212.3825682008767, 557204.7456727506), (2056.0174247170876, 366105.1958606689)),
    "seresnet18": ((1225.4602473292716, 807133.0620574637), (2041.7664895022108, 366280.773531165)),
    "resnext18": ((1661.171901042445, 1789731.7051803817), (2088.0227654756427, 693109.9783935898)),
    "vgg16": ((1030.806081822711, 876857.457860988), (2051.774760625426, 688321.3906757601)),
}


def _checksum(module: nn.Module) -> tuple[float, float]:
    tensors = [t.double() for _, t in sorted(module.state_dict().items())]
    return float(sum(t.sum() for t in tensors)), float(sum((i + 1) * t.abs().sum() for i, t in enumerate(tensors)))


@pytest.mark.parametrize("arch", sorted(INIT_CHECKSUMS))
def test_initial_values_are_unchanged(arch):
    """The official initialisation, students included (VGG and ResNeXt run their init over the students too)."""
    torch.manual_seed(0)
    method = build_model(load_config(None, [f"model.arch={arch}", "model.width_mult=0.125"]), 10)
    backbone, students = INIT_CHECKSUMS[arch]
    assert _checksum(method.backbone) == pytest.approx(backbone, rel=1e-12)
    assert _checksum(method.students) == pytest.approx(students, rel=1e-12)


def test_registry_and_unknown_arch():
    assert {"resnet18", "resnet34", "resnet50"} <= set(list_backbones())
    with pytest.raises(TeskdError) as err:
        build_backbone("resnet9", 10)
    message = str(err.value)
    assert "resnet9" in message and f"known: {', '.join(list_backbones())}" in message and "\n" not in message
    with pytest.raises(ValueError, match="registered twice"):
        register_backbone("resnet18")(lambda num_classes, width_mult: None)
