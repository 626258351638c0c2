"""CIFAR VGG-16/19 backbones and their students (official layout: branches reduce to the T3 size)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from teskd.config import load_config
from teskd.build import build_model
from teskd.models import StageInfo, build_backbone, count_params, list_backbones

ARCHS = ("vgg16", "vgg19")
CONVS = {"vgg16": (2, 3, 3, 3), "vgg19": (2, 4, 4, 4)}  # 3x3 convs per stage layer1..layer4
# official counts, 100 classes: (teacher alone, teacher + students)
OFFICIAL_PARAMS = {"vgg16": (15_299_748, 24_844_752), "vgg19": (20_612_004, 30_157_008)}


def vgg_params(stem, chs, convs, hidden, classes):
    """Closed-form count: convs with bias + BN (2 per channel), then the 3-layer MLP head."""
    total = (27 * stem + stem + 2 * stem) + (9 * stem * stem + stem + 2 * stem)
    in_ch = stem
    for out_ch, n in zip(chs, convs):
        for _ in range(n):
            total += 9 * in_ch * out_ch + out_ch + 2 * out_ch
            in_ch = out_ch
    return total + (in_ch * hidden + hidden) + (hidden * hidden + hidden) + (hidden * classes + classes)


def make_method(arch="vgg16", width_mult=1.0, classes=100, device="cpu"):
    """The TESKD model exactly as training builds it."""
    with torch.device(device):
        return build_model(load_config(None, [f"model.arch={arch}", f"model.width_mult={width_mult}"]), classes)


def official_backbone_keys(convs):
    """The backbone state-dict keys of the official ``vgg_our.VGG`` (students excluded)."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = {"conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias"}
    keys |= {f"bn{i}.{k}" for i in (1, 2) for k in bn}
    for stage, n in enumerate(convs, start=1):
        for i in range(n):
            keys |= {f"layer{stage}.{3 * i}.weight", f"layer{stage}.{3 * i}.bias"}
            keys |= {f"layer{stage}.{3 * i + 1}.{k}" for k in bn}
    keys |= {f"classifier.{i}.{k}" for i in (0, 2, 4) for k in ("weight", "bias")}
    return keys


@pytest.mark.parametrize("arch", ARCHS)
def test_official_param_counts(arch):
    method = make_method(arch, device="meta")
    teacher, total = OFFICIAL_PARAMS[arch]
    assert count_params(method.backbone) == teacher
    assert count_params(method) == total
    assert vgg_params(64, (128, 256, 512, 512), CONVS[arch], 512, 100) == teacher
    s = method.students
    assert s.branch_stage == 3 and s.widths == {1: 512, 2: 512, 3: 512}  # T4 is 1x1 at 32 px: branches end at T3
    assert [s.branch(level)[0].kernel_size for level in (1, 2, 3)] == [(4, 4), (2, 2), (1, 1)]
    assert [s.branch(level)[0].stride for level in (1, 2, 3)] == [(4, 4), (2, 2), (1, 1)]


@pytest.mark.parametrize("arch", ARCHS)
def test_stage_shapes_and_info(arch):
    b = build_backbone(arch, 10).eval()
    assert b.num_features == 512
    assert b.stage_info == tuple(StageInfo(c, r, f"layer{i}")
                                 for i, (c, r) in enumerate(((128, 4), (256, 8), (512, 16), (512, 32)), 1))
    with torch.no_grad():
        stages = b.forward_stages(torch.randn(2, 3, 32, 32))
    assert [tuple(t.shape) for t in stages] == [(2, 128, 8, 8), (2, 256, 4, 4), (2, 512, 2, 2), (2, 512, 1, 1)]


def test_width_mult_scales_every_channel():
    b = build_backbone("vgg19", 10, width_mult=0.25)
    assert [i.channels for i in b.stage_info] == [32, 64, 128, 128]
    assert b.conv1.out_channels == 16 and b.conv2.in_channels == 16
    assert b.classifier[0].in_features == 128 and b.classifier[0].out_features == 128
    assert b.classifier[2].out_features == 128 and b.classifier[4].in_features == 128
    assert count_params(b) == vgg_params(16, (32, 64, 128, 128), CONVS["vgg19"], 128, 10)


def test_student_outputs_at_quarter_width():
    torch.manual_seed(0)
    method = make_method("vgg16", 0.25, classes=10).eval()
    s = method.students
    assert s.widths == {1: 128, 2: 128, 3: 128}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        stages = method.backbone.forward_stages(x)
        out = {"teacher": method.backbone.forward_head(stages[-1]), **s(stages)}
        fused = s.top_down(stages)
        # every level's auxiliary branch ends at the T3 size (2x2), before pooling
        for level, size in ((1, 8), (2, 4), (3, 2)):
            assert fused[level].shape == (2, 128, size, size)
            assert s.branch(level)(fused[level]).shape == (2, 128, 2, 2)
    assert list(out) == ["teacher", "student1", "student2", "student3"]
    for logits, feature in out.values():
        assert logits.shape == (2, 10) and feature.shape == (2, 128)


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_equals_forward_head_of_stages(arch):
    torch.manual_seed(0)
    b = build_backbone(arch, 10, 0.25)
    x = torch.randn(2, 3, 32, 32)
    for mode in (False, True):
        b.train(mode)
        with torch.no_grad():
            logits, feature = b.forward_head(b.forward_stages(x)[-1])
            torch.testing.assert_close(b(x), logits, rtol=0, atol=0)
            torch.testing.assert_close(feature, b.forward_stages(x)[-1].mean(dim=(2, 3)), rtol=1e-5, atol=1e-6)
    assert feature.shape == (2, b.num_features)


def test_official_initialisation():
    torch.manual_seed(0)
    b = build_backbone("vgg16", 100)
    convs = [m for m in b.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 2 + sum(CONVS["vgg16"])
    for conv in convs:
        assert conv.bias is not None and torch.all(conv.bias == 0)
    for bn in (m for m in b.modules() if isinstance(m, nn.BatchNorm2d)):
        assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)
    for linear in (m for m in b.modules() if isinstance(m, nn.Linear)):
        assert torch.all(linear.bias == 0)
        assert abs(linear.weight.mean().item()) < 1e-3
    assert abs(b.classifier[0].weight.std().item() / 0.01 - 1) < 0.02  # 262,144 samples
    assert abs(b.classifier[4].weight.std().item() / 0.01 - 1) < 0.05  # 51,200 samples
    # Kaiming normal, fan_out mode: std = sqrt(2 / (out_channels * 3 * 3))
    for conv in (b.layer2[0], b.layer3[3], b.layer4[6]):
        expected = math.sqrt(2.0 / (conv.out_channels * 9))
        assert abs(conv.weight.std().item() / expected - 1) < 0.03


@pytest.mark.parametrize("arch", ARCHS)
def test_official_key_names(arch):
    state = build_backbone(arch, 100).state_dict()
    assert set(state) == official_backbone_keys(CONVS[arch])
    for key in ("layer1.0.weight", "layer1.1.running_mean", "layer1.3.bias", "layer4.7.num_batches_tracked",
                "classifier.4.bias", "conv2.bias", "bn2.running_var"):
        assert key in state
    assert state["layer1.0.weight"].shape == (128, 64, 3, 3)
    assert state["classifier.0.weight"].shape == (512, 512)
    assert state["classifier.4.weight"].shape == (100, 512)
    b = build_backbone(arch, 100)
    assert isinstance(b.layer1[6], nn.MaxPool2d) and isinstance(b.layer4[3 * CONVS[arch][3]], nn.MaxPool2d)
    # an official-layout state dict (here: another instance's) loads strictly, unchanged
    assert not b.load_state_dict(build_backbone(arch, 100).state_dict(), strict=True).missing_keys


def test_teskd_method_on_vgg():
    torch.manual_seed(0)
    method = build_model(load_config(None, ["model.arch=vgg16", "model.width_mult=0.125"]), 10)
    s = method.students
    assert s.branch_stage == 3 and s.widths == {1: 64, 2: 64, 3: 64}
    assert [s.branch(level)[0].kernel_size for level in (1, 2, 3)] == [(4, 4), (2, 2), (1, 1)]
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)
    out = method.forward_train(x, y)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert method.backbone.layer1[0].weight.grad.abs().sum() > 0
    assert set(out.logits) == {"teacher", "student1", "student2", "student3"}


def test_registered():
    assert {"vgg16", "vgg19"} <= set(list_backbones())
