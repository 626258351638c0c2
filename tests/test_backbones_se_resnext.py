"""CIFAR SE-ResNet-18/34/50 and (official) ResNeXt-18/34/50 backbones."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from teskd.build import build_model
from teskd.config import load_config
from teskd.models import StageInfo, build_backbone, count_params, list_backbones
from teskd.models.backbones.resnext import group_count

SE = ("seresnet18", "seresnet34", "seresnet50")
RX = ("resnext18", "resnext34", "resnext50")
ARCHS = SE + RX
BLOCKS = {"18": (2, 2, 2, 2), "34": (3, 4, 6, 3), "50": (3, 4, 6, 3)}

# official counts, 100 classes, width 1: (teacher alone, teacher + faithful students)
OFFICIAL_PARAMS = {
    "seresnet18": (11_314_012, 37_144_712),
    "seresnet34": (21_498_000, 47_328_700),
    "seresnet50": (26_262_804, 437_472_832),
    "resnext18": (22_209_444, 48_040_144),
    "resnext34": (42_422_052, 68_252_752),
    "resnext50": (23_177_124, 434_387_152),
}


def stage_channels(arch: str, width_mult: float = 1.0) -> list[int]:
    expansion = 4 if arch.endswith("50") else 1
    return [max(1, int(round(c * expansion * width_mult))) for c in (64, 128, 256, 512)]


def build_meta(arch: str, classes: int = 100, width_mult: float = 1.0):
    """(backbone, students) of the TESKD model exactly as training builds it, on the meta device."""
    with torch.device("meta"):
        method = build_model(load_config(None, [f"model.arch={arch}", f"model.width_mult={width_mult}"]), classes)
    return method.backbone, method.students


# ---------------------------------------------------------------- official naming, rebuilt from the official code

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def official_keys(arch: str) -> set[str]:
    """The backbone state-dict keys of the official senet_our.py / resnext_our.py models."""
    bottleneck = arch.endswith("50")
    expansion = 4 if bottleneck else 1
    keys: set[str] = set()

    def bn(prefix):
        keys.update(f"{prefix}.{p}" for p in BN)

    in_planes = 64
    if arch in SE:
        keys.update({"pre.0.weight", "pre.0.bias", "linear.weight", "linear.bias"})
        bn("pre.1")
        convs = (0, 3, 6) if bottleneck else (0, 3)
        for s, (planes, n, stride) in enumerate(zip((64, 128, 256, 512), BLOCKS[arch[-2:]], (1, 2, 2, 2)), 1):
            for b in range(n):
                p = f"stage{s}.{b}"
                for i in convs:
                    keys.update({f"{p}.residual.{i}.weight", f"{p}.residual.{i}.bias"})
                    bn(f"{p}.residual.{i + 1}")
                keys.update(f"{p}.excitation.{i}.{w}" for i in (0, 2) for w in ("weight", "bias"))
                if b == 0 and (stride != 1 or in_planes != planes * expansion):
                    keys.update({f"{p}.shortcut.0.weight", f"{p}.shortcut.0.bias"})
                    bn(f"{p}.shortcut.1")
                in_planes = planes * expansion
    else:
        keys.update({"conv1.0.weight", "fc.weight", "fc.bias"})
        bn("bn1")
        convs = (1, 2, 3) if bottleneck else (1, 2)
        for s, (planes, n, stride) in enumerate(zip((64, 128, 256, 512), BLOCKS[arch[-2:]], (1, 2, 2, 2)), 1):
            for b in range(n):
                p = f"layer{s}.{b}"
                for i in convs:
                    keys.add(f"{p}.conv{i}.weight")
                    bn(f"{p}.bn{i}")
                if b == 0 and (stride != 1 or in_planes != planes * expansion):
                    keys.add(f"{p}.downsample.0.weight")
                    bn(f"{p}.downsample.1")
                in_planes = planes * expansion
    return keys


@pytest.mark.parametrize("arch", ARCHS)
def test_state_dict_keys_are_the_official_ones(arch):
    backbone, _ = build_meta(arch, width_mult=0.25)
    assert set(backbone.state_dict()) == official_keys(arch)


def test_official_key_spot_checks_and_shapes():
    se18 = build_meta("seresnet18")[0].state_dict()
    assert se18["pre.0.weight"].shape == (64, 3, 3, 3) and se18["pre.0.bias"].shape == (64,)
    assert se18["stage1.0.residual.0.weight"].shape == (64, 64, 3, 3)
    assert se18["stage1.0.residual.3.bias"].shape == (64,)
    assert se18["stage1.0.residual.4.running_var"].shape == (64,)
    assert se18["stage1.0.excitation.0.weight"].shape == (4, 64)  # reduction 16
    assert se18["stage4.1.excitation.2.weight"].shape == (512, 32)
    assert se18["stage2.0.shortcut.0.weight"].shape == (128, 64, 1, 1) and "stage2.0.shortcut.0.bias" in se18
    assert "stage2.0.shortcut.1.running_mean" in se18 and "stage1.0.shortcut.0.weight" not in se18
    assert se18["linear.weight"].shape == (100, 512)
    se50 = build_meta("seresnet50")[0].state_dict()
    assert se50["stage1.0.residual.0.weight"].shape == (64, 64, 1, 1)
    assert se50["stage1.0.residual.6.weight"].shape == (256, 64, 1, 1)
    assert se50["stage1.0.shortcut.0.weight"].shape == (256, 64, 1, 1)  # channels change in stage 1
    assert se50["stage2.0.residual.3.weight"].shape == (128, 128, 3, 3)
    assert se50["stage4.2.excitation.0.weight"].shape == (128, 2048)
    assert se50["linear.weight"].shape == (100, 2048)

    rx18 = build_meta("resnext18")[0].state_dict()
    assert rx18["conv1.0.weight"].shape == (64, 3, 3, 3) and "conv1.0.bias" not in rx18
    assert rx18["layer1.0.conv1.weight"].shape == (128, 64, 3, 3)  # first conv 2x wide, not grouped
    assert rx18["layer1.0.conv2.weight"].shape == (64, 128, 3, 3)
    assert rx18["layer2.0.downsample.0.weight"].shape == (128, 64, 1, 1)
    assert "layer1.0.downsample.0.weight" not in rx18 and "layer1.0.conv1.bias" not in rx18
    assert rx18["fc.weight"].shape == (100, 512)
    rx50 = build_meta("resnext50")[0].state_dict()
    assert rx50["layer1.0.conv1.weight"].shape == (128, 64, 1, 1)
    assert rx50["layer1.0.conv2.weight"].shape == (128, 4, 3, 3)  # 32 groups of 4 channels
    assert rx50["layer1.0.conv3.weight"].shape == (256, 128, 1, 1)
    assert rx50["layer1.0.downsample.0.weight"].shape == (256, 64, 1, 1)
    assert rx50["layer4.0.conv2.weight"].shape == (1024, 32, 3, 3)
    assert rx50["fc.weight"].shape == (100, 2048)


# ---------------------------------------------------------------- parameter counts and stage layout


def test_registered():
    assert set(ARCHS) <= set(list_backbones())


@pytest.mark.parametrize("arch", ARCHS)
def test_official_param_counts(arch):
    backbone, students = build_meta(arch)
    teacher, total = OFFICIAL_PARAMS[arch]
    assert count_params(backbone) == teacher
    assert count_params(backbone) + count_params(students) == total


@pytest.mark.parametrize("arch", ARCHS)
def test_stage_info(arch):
    backbone, _ = build_meta(arch)
    chans = stage_channels(arch)
    names = [f"{'stage' if arch in SE else 'layer'}{i}" for i in (1, 2, 3, 4)]  # the official module names
    assert backbone.stage_info == tuple(StageInfo(c, r, n) for c, r, n in zip(chans, (1, 2, 4, 8), names))
    assert backbone.num_features == chans[-1]


@pytest.mark.parametrize("arch", ARCHS)
def test_width_mult_shrinks(arch):
    full, _ = build_meta(arch)
    small, _ = build_meta(arch, width_mult=0.25)
    assert [i.channels for i in small.stage_info] == stage_channels(arch, 0.25)
    assert small.num_features == full.num_features // 4
    assert count_params(small) < count_params(full) / 8
    widest = max(m.out_channels for m in full.modules() if isinstance(m, nn.Conv2d))
    assert all(m.out_channels <= widest // 4 for m in small.modules() if isinstance(m, nn.Conv2d))
    linears = [m for m in small.modules() if isinstance(m, nn.Linear)]
    assert all(m.in_features <= full.num_features // 4 for m in linears)


def test_width_mult_se_bottleneck_and_groups():
    tiny, _ = build_meta("seresnet18", width_mult=0.125)  # 8 channels -> SE hidden max(1, 8 // 16) = 1
    assert tiny.stage1[0].excitation[0].out_features == 1
    quarter, _ = build_meta("seresnet18", width_mult=0.25)
    assert [s[0].excitation[0].out_features for s in (quarter.stage1, quarter.stage4)] == [1, 8]
    rx, _ = build_meta("resnext50", width_mult=0.25)
    assert all(b.conv2.groups == 32 for layer in (rx.layer1, rx.layer4) for b in layer)
    odd, _ = build_meta("resnext50", width_mult=0.3)  # 2 * 64 * 0.3 -> 38 channels: 19 groups
    assert odd.layer1[0].conv2.in_channels == 38 and odd.layer1[0].conv2.groups == 19
    assert group_count(128) == 32 and group_count(48) == 24 and group_count(13) == 13
    plain, _ = build_meta("resnext34")
    assert all(m.groups == 1 for m in plain.modules() if isinstance(m, nn.Conv2d))


# ---------------------------------------------------------------- real forward passes (width 0.25)


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_shapes_and_head(arch):
    torch.manual_seed(0)
    backbone = build_backbone(arch, 10, width_mult=0.25).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        stages = backbone.forward_stages(x)
        logits, feature = backbone.forward_head(stages[-1])
        direct = backbone(x)
    chans = stage_channels(arch, 0.25)
    assert [tuple(t.shape) for t in stages] == [(2, c, s, s) for c, s in zip(chans, (32, 16, 8, 4))]
    assert logits.shape == (2, 10) and feature.shape == (2, backbone.num_features)
    torch.testing.assert_close(feature, stages[-1].mean(dim=(2, 3)))
    torch.testing.assert_close(direct, logits)
    assert torch.isfinite(direct).all()


@pytest.mark.parametrize("arch", ("seresnet18", "seresnet50"))
def test_se_excitation_matters(arch):
    torch.manual_seed(0)
    backbone = build_backbone(arch, 10, width_mult=0.25).eval()
    block = backbone.stage2[0]  # has a projection shortcut in both
    x = torch.randn(2, block.residual[0].in_channels, 16, 16)
    with torch.no_grad():
        out = block(x)
        residual, shortcut = block.residual(x), block.shortcut(x)
        weights = block.excitation(residual.mean(dim=(2, 3)))
        assert ((weights > 0) & (weights < 1)).all()
        torch.testing.assert_close(out, torch.relu(residual * weights[:, :, None, None] + shortcut))
        handle = block.excitation.register_forward_hook(lambda m, i, o: torch.zeros_like(o))
        try:
            zeroed = block(x)
        finally:
            handle.remove()
    torch.testing.assert_close(zeroed, torch.relu(shortcut))
    assert not torch.allclose(zeroed, out)
