"""Backbones, hierarchical students, the joint network, parameter and MAC counts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from teskd.errors import TeskdError
from teskd.models import (
    HierarchicalStudents,
    NetworkOutput,
    StageInfo,
    TeskdNetwork,
    build_backbone,
    count_macs,
    count_params,
    list_backbones,
)
from teskd.models.network import default_student_width

ARCHS = ("resnet18", "resnet34", "resnet50")
# official counts, 100 classes: (teacher alone, teacher + students)
OFFICIAL_PARAMS = {
    "resnet18": (11_220_132, 37_050_832),
    "resnet34": (21_328_292, 47_158_992),
    "resnet50": (23_705_252, 434_915_280),
}


def make_network(arch: str = "resnet18", width_mult: float = 1.0, levels=(1, 2, 3), device=None, classes=100):
    with torch.device(device or "cpu"):
        backbone = build_backbone(arch, classes, width_mult)
        students = HierarchicalStudents(backbone.stage_info, classes, default_student_width(backbone), levels=levels,
                                        branch_stage=backbone.branch_stage)
    return TeskdNetwork(backbone, students)


def randomize_bn(module: nn.Module, seed: int = 0) -> None:
    """Give every BN non-trivial affine parameters and running statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)


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
    net = make_network(arch, device="meta")
    teacher, total = OFFICIAL_PARAMS[arch]
    assert count_params(net.backbone) == teacher
    assert count_params(net) == total


def test_derived_param_formulas_match_official():
    assert basic_resnet_params((64, 128, 256, 512), (2, 2, 2, 2), 100) == 11_220_132
    assert student_params((64, 128, 256, 512), 512, 100) == 25_830_700
    assert student_params((256, 512, 1024, 2048), 2048, 100) == 434_915_280 - 23_705_252


def test_width_mult_scales_every_channel():
    b = build_backbone("resnet18", 100, width_mult=0.25)
    assert b.stage_info == tuple(StageInfo(c, r) for c, r in ((16, 1), (32, 2), (64, 4), (128, 8)))
    assert b.num_features == 128 and b.conv1.out_channels == 16
    assert count_params(b) == basic_resnet_params((16, 32, 64, 128), (2, 2, 2, 2), 100)
    s = HierarchicalStudents(b.stage_info, 100, default_student_width(b))
    assert s.width == 128
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
    net = make_network("resnet18", width_mult, classes=10)
    c = default_student_width(net.backbone)
    assert c == int(512 * width_mult)
    with torch.no_grad():
        out = net(torch.randn(2, 3, 32, 32))
    assert isinstance(out, NetworkOutput)
    names = ["teacher", "student1", "student2", "student3"]
    assert list(out.logits) == names and list(out.features) == names
    for name in names:
        assert out.logits[name].shape == (2, 10)
        assert out.features[name].shape == (2, c)


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
        net = make_network("resnet18", 0.25, levels=levels, classes=10)
        out = net(x)
        assert list(out.logits) == ["teacher", *keys]
        assert all(out.logits[k].shape == (2, 10) and out.features[k].shape == (2, 128) for k in keys)
    for bad in ((), (0,), (4,), (1, 1)):
        with pytest.raises(TeskdError):
            HierarchicalStudents(bb.stage_info, 10, 128, levels=bad)
    with pytest.raises(TeskdError):
        HierarchicalStudents(bb.stage_info[:3], 10, 128)


def test_branch_stage_sets_branch_kernels():
    info = build_backbone("resnet18", 10, 0.25).stage_info  # reductions 1, 2, 4, 8
    assert build_backbone("resnet18", 10).branch_stage == 4  # the Backbone default
    default = HierarchicalStudents(info, 10, 32)
    assert default.branch_stage == 4
    assert [default.branch(level)[0].kernel_size for level in (1, 2, 3)] == [(8, 8), (4, 4), (2, 2)]
    for stage, kernels in ((3, (4, 2, 1)), (4, (8, 4, 2))):
        s = HierarchicalStudents(info, 10, 32, branch_stage=stage).eval()
        assert s.branch_stage == stage
        assert [s.branch(level)[0].kernel_size for level in (1, 2, 3)] == [(k, k) for k in kernels]
        assert [s.branch(level)[0].stride for level in (1, 2, 3)] == [(k, k) for k in kernels]
        assert count_params(s) == student_params((16, 32, 64, 128), 32, 10, kernels=kernels)
        stages = [torch.randn(2, c, 32 // r, 32 // r) for c, r in ((16, 1), (32, 2), (64, 4), (128, 8))]
        with torch.no_grad():
            fused = s.top_down(stages)
            size = 32 // info[stage - 1].reduction  # every branch reaches the T_branch_stage size
            assert all(s.branch(level)(fused[level]).shape == (2, 32, size, size) for level in (1, 2, 3))
            assert all(f.shape == (2, 32) for _, f in s(stages).values())
    # branch_stage 2 is fine for levels 1 and 2 (kernels 2, 1) but level 3 would need kernel 1/2
    s12 = HierarchicalStudents(info, 10, 32, levels=(1, 2), branch_stage=2)
    assert [s12.branch(level)[0].kernel_size for level in (1, 2)] == [(2, 2), (1, 1)]
    with pytest.raises(TeskdError, match="auxiliary branch"):
        HierarchicalStudents(info, 10, 32, branch_stage=2)
    # a non-integer ratio: T2 (reduction 3) is not a multiple of T3 (reduction 2)
    odd = tuple(StageInfo(8, r) for r in (1, 3, 2, 4))
    assert HierarchicalStudents(odd, 10, 8, levels=(3,)).branch(3)[0].kernel_size == (2, 2)
    with pytest.raises(TeskdError, match="auxiliary branch"):
        HierarchicalStudents(odd, 10, 8, levels=(3,), branch_stage=2)
    for bad in (0, 5, True, 3.0, "3"):
        with pytest.raises(TeskdError):
            HierarchicalStudents(info, 10, 32, branch_stage=bad)


def test_per_level_widths():
    bb = build_backbone("resnet18", 10, 0.25)
    chs = (16, 32, 64, 128)
    widths = {1: 24, 2: 40, 3: 56}
    s = HierarchicalStudents(bb.stage_info, 10, widths).eval()
    assert s.widths == widths and s.width is None
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
    s2 = HierarchicalStudents(bb.stage_info, 10, {1: 8, 2: 12, 3: 20}, levels=(2,), branch_stage=3)
    assert count_params(s2) == student_params(chs, {1: 8, 2: 12, 3: 20}, 10, kernels=(4, 2, 1), levels=(2,))
    for bad in ({2: 8, 3: 8}, {1: 8, 2: 8, 3: 8, 4: 8}, {1: 8, 2: 0, 3: 8}, {1: 8, 2: 8.0, 3: 8}, 0, 8.0, True):
        with pytest.raises(TeskdError):
            HierarchicalStudents(bb.stage_info, 10, bad)


def test_int_width_is_unchanged_official_resnet18():
    with torch.device("meta"):
        bb = build_backbone("resnet18", 100)
        single = HierarchicalStudents(bb.stage_info, 100, 512, branch_stage=bb.branch_stage)
        mapped = HierarchicalStudents(bb.stage_info, 100, {1: 512, 2: 512, 3: 512})
    assert count_params(bb) + count_params(single) == 37_050_832
    assert single.width == 512 and single.widths == {1: 512, 2: 512, 3: 512}
    # a uniform mapping builds exactly the same modules (names and shapes)
    assert mapped.width == 512
    assert {k: v.shape for k, v in mapped.state_dict().items()} == {k: v.shape for k, v in single.state_dict().items()}
    assert student_params((64, 128, 256, 512), {1: 512, 2: 512, 3: 512}, 100) == 37_050_832 - 11_220_132


def test_teacher_only_network():
    net = TeskdNetwork(build_backbone("resnet18", 10, 0.25))
    out = net(torch.randn(2, 3, 32, 32))
    assert list(out.logits) == ["teacher"] and out.features["teacher"].shape == (2, 128)


# ---------------------------------------------------------------- values


def _cbr(seq: nn.Sequential, x: torch.Tensor, conv: int = 0) -> torch.Tensor:
    """conv -> BN (eval statistics) -> ReLU, recomputed functionally from seq[conv], seq[conv + 1]."""
    c, bn = seq[conv], seq[conv + 1]
    y = F.conv2d(x, c.weight, c.bias, stride=c.stride, padding=c.padding)
    return F.relu(F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps))


def test_students_match_functional_reference():
    torch.manual_seed(0)
    net = make_network("resnet18", 0.25, classes=10)
    randomize_bn(net)
    net.eval()
    s = net.students
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        t1, t2, t3, t4 = net.backbone.forward_stages(x)
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


def test_teacher_forward_equals_network_teacher_logits():
    torch.manual_seed(0)
    net = make_network("resnet18", 0.25, classes=10)
    randomize_bn(net)
    net.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = net(x)
        torch.testing.assert_close(net.backbone(x), out.logits["teacher"], rtol=0, atol=0)
        pooled = net.backbone.forward_stages(x)[-1].mean(dim=(2, 3))
        torch.testing.assert_close(out.features["teacher"], pooled, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["student1", "student2", "student3"])
def test_student_gradients_reach_shared_backbone(name):
    torch.manual_seed(0)
    net = make_network("resnet18", 0.25, classes=10).train()
    out = net(torch.randn(4, 3, 32, 32))
    F.cross_entropy(out.logits[name], torch.tensor([0, 1, 2, 3])).backward()
    g = net.backbone.layer1[0].conv1.weight.grad
    assert g is not None and g.abs().sum() > 0
    assert net.backbone.fc.weight.grad is None  # the teacher head is not on a student's path
    s = net.students
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
    net = make_network("resnet18", device="meta")
    teacher = count_macs(net.backbone)
    total = count_macs(net, forward=lambda m, x: m(x))
    students = count_macs(net.students, forward=lambda m, x: m(net.backbone.forward_stages(x)))
    print(f"\nresnet18 CIFAR MACs/image: backbone {teacher:,}  students {students:,}  total {total:,}")
    assert abs(teacher / 0.555e9 - 1) < 0.01
    assert abs(students / 1.49e9 - 1) < 0.01
    assert total == teacher + students
    # the count does not depend on the batch size and is the same on a real device
    assert count_macs(net.backbone, (3, 3, 32, 32)) == teacher
    assert count_macs(build_backbone("resnet18", 100, 0.25)) < teacher / 10


def test_registry_and_unknown_arch():
    assert {"resnet18", "resnet34", "resnet50"} <= set(list_backbones())
    with pytest.raises(TeskdError) as err:
        build_backbone("resnet9", 10)
    message = str(err.value)
    assert "resnet9" in message and "resnet18, resnet34, resnet50" in message and "\n" not in message
    with pytest.raises(TeskdError):
        build_backbone("resnet18", 0)
    with pytest.raises(TeskdError):
        build_backbone("resnet18", 10, width_mult=0)
