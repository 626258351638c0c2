"""ImageNet ResNets: torchvision's networks exactly (keys, init, outputs), TESKD's official counts at 224 px."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch import nn

from teskd.build import build_model
from teskd.config import load_config
from teskd.data.registry import DATASETS
from teskd.methods import build_method
from teskd.models import build_backbone, count_params, list_backbones
from teskd.models.backbones.resnet_imagenet import ImageNetResNet

from conftest import randomize_bn

TORCHVISION = {
    "resnet18_imagenet": torchvision.models.resnet18,
    "resnet34_imagenet": torchvision.models.resnet34,
    "resnet50_imagenet": torchvision.models.resnet50,
}
ARCHS = tuple(TORCHVISION)
# official TESKD counts, 1000 classes: (deployed teacher, teacher + students)
OFFICIAL_PARAMS = {
    "resnet18_imagenet": (11_689_512, 38_905_312),
    "resnet34_imagenet": (21_797_672, 49_013_472),
    "resnet50_imagenet": (25_557_032, 442_299_360),
}


def teskd_method(arch: str, classes: int = 1000, width_mult: float = 1.0, input_size: int = 224):
    """TESKD on ``arch`` as build_model makes it for ``input_size`` px images (faithful students)."""
    cfg = load_config(None, [f"model.arch={arch}", f"model.width_mult={width_mult}"])
    return build_method("teskd", build_backbone(arch, classes, width_mult), classes, cfg.method, input_size)


def test_registered():
    assert set(ARCHS) <= set(list_backbones())


@pytest.mark.parametrize("arch", ARCHS)
def test_state_dict_is_torchvisions(arch):
    """Same keys in the same order, same shapes, buffers included (meta device: no memory, no time)."""
    with torch.device("meta"):
        ours = build_backbone(arch, 1000).state_dict()
        theirs = TORCHVISION[arch](weights=None, num_classes=1000).state_dict()
    assert list(ours) == list(theirs)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    # layer1 projects only for Bottleneck (64 -> 256); every later stage projects in its first block
    assert ("layer1.0.downsample.0.weight" in ours) == (arch == "resnet50_imagenet")
    assert "layer2.0.downsample.1.running_var" in ours and "fc.bias" in ours


@pytest.mark.parametrize("arch", ["resnet18_imagenet", "resnet50_imagenet"])
def test_initialisation_is_torchvisions(arch):
    """Under the same seed the freshly built networks are bit-identical: same init, same order of draws."""
    torch.manual_seed(0)
    ours = build_backbone(arch, 10).state_dict()
    torch.manual_seed(0)
    theirs = TORCHVISION[arch](weights=None, num_classes=10).state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_initialisation_at_reduced_width_and_students_keep_defaults():
    torch.manual_seed(0)
    method = teskd_method("resnet18_imagenet", classes=10, width_mult=0.5, input_size=64)
    backbone = method.backbone
    assert ImageNetResNet.weight_init is None  # the students are not given the backbone's init
    for m in backbone.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    conv = backbone.layer4[1].conv2  # 256 -> 256, 3x3: He fan-out normal, std sqrt(2 / (256 * 9))
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (256 * 9)), rel=0.03)
    # PyTorch's default conv init is uniform within 1/sqrt(fan_in); a He normal init would exceed it
    lateral = method.students.laterals["3"][0]
    assert lateral.weight.abs().max().item() <= 1 / math.sqrt(lateral.weight.shape[1])
    stem = backbone.conv1.weight
    assert stem.abs().max().item() > 1 / math.sqrt(stem[0].numel())


@pytest.mark.parametrize("arch, size", [("resnet18_imagenet", 224), ("resnet34_imagenet", 64),
                                        ("resnet50_imagenet", 64)])
def test_torchvision_weights_load_into_ours_with_identical_outputs(arch, size):
    torch.manual_seed(1)
    theirs = TORCHVISION[arch](weights=None, num_classes=10)
    randomize_bn(theirs)
    ours = build_backbone(arch, 10)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    ours.eval(), theirs.eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = theirs(x)
        assert torch.equal(ours(x), expected)
        assert torch.equal(ours.forward_head(ours.forward_stages(x)[-1])[0], expected)


def test_deployed_teacher_loads_into_torchvision_with_identical_outputs(arch="resnet18_imagenet"):
    """The trained model's deploy module is torchvision's network: strict load, same teacher logits.
    (ResNet-18 only: ResNet-50's faithful students alone are 417 M parameters.)"""
    torch.manual_seed(2)
    method = teskd_method(arch, classes=10, width_mult=1.0, input_size=64)
    randomize_bn(method.backbone, seed=3)
    theirs = TORCHVISION[arch](weights=None, num_classes=10)
    theirs.load_state_dict(method.deploy_module.state_dict(), strict=True)
    method.eval(), theirs.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(theirs(x), method(x)["teacher"])


@pytest.mark.parametrize("arch", ARCHS)
def test_stages_and_official_param_counts(arch):
    """Stage maps 56/28/14/7 at 224 px, students branch at stage 4 (kernels 8, 4, 2), official counts."""
    with torch.device("meta"):
        method = teskd_method(arch)
        stages = method.backbone.forward_stages(torch.empty(2, 3, 224, 224))
    expansion = 4 if arch == "resnet50_imagenet" else 1
    assert [info.reduction for info in method.backbone.stage_info] == [4, 8, 16, 32]
    assert [tuple(t.shape) for t in stages] == [(2, c * expansion, s, s) for c, s in
                                                zip((64, 128, 256, 512), (56, 28, 14, 7))]
    assert method.backbone.num_features == 512 * expansion
    students = method.students
    assert students.branch_stage == 4
    assert [students.branch(level)[0].kernel_size for level in (1, 2, 3)] == [(8, 8), (4, 4), (2, 2)]
    assert (count_params(method.deploy_module), count_params(method)) == OFFICIAL_PARAMS[arch]


@pytest.mark.skipif("imagenet" not in DATASETS, reason="no 'imagenet' dataset spec registered yet")
def test_build_model_with_the_imagenet_dataset_gives_the_official_counts():
    cfg = load_config(None, ["model.arch=resnet18_imagenet", "data.dataset=imagenet"])
    with torch.device("meta"):
        method = build_model(cfg, 1000)
    assert method.input_size == 224 and method.students.branch_stage == 4
    assert (count_params(method.deploy_module), count_params(method)) == OFFICIAL_PARAMS["resnet18_imagenet"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("width_mult", [0.5, 0.125])
def test_width_mult_scales_like_the_cifar_resnets(arch, width_mult):
    """Same stages as the CIFAR ResNet of that width; only the stem conv (7x7 vs 3x3) and stem reduction differ."""
    with torch.device("meta"):
        ours = build_backbone(arch, 10, width_mult)
        cifar = build_backbone(arch.removesuffix("_imagenet"), 10, width_mult)
    stem_ch = cifar.conv1.out_channels
    assert stem_ch == max(1, round(64 * width_mult))
    assert count_params(ours) - count_params(cifar) == (49 - 9) * 3 * stem_ch
    assert [(i.channels, i.reduction) for i in ours.stage_info] == [(i.channels, 4 * i.reduction)
                                                                    for i in cifar.stage_info]


def test_teskd_training_step_on_a_small_imagenet_resnet():
    """Width 0.125, 64 px: stage maps 16/8/4/2, so the students still branch at stage 4."""
    torch.manual_seed(0)
    method = teskd_method("resnet18_imagenet", classes=10, width_mult=0.125, input_size=64).train()
    assert method.students.branch_stage == 4
    assert teskd_method("resnet18_imagenet", classes=10, width_mult=0.125, input_size=32).students.branch_stage == 3
    opt = torch.optim.SGD(method.parameters(), lr=0.1)
    before = {k: v.clone() for k, v in method.state_dict().items()}
    out = method(torch.randn(2, 3, 64, 64), torch.tensor([3, 7]))
    assert set(out.logits) == {"teacher", "student1", "student2", "student3"}
    assert all(v.shape == (2, 10) for v in out.logits.values())
    assert torch.isfinite(out.loss) and torch.allclose(sum(out.parts.values()), out.loss.detach())
    opt.zero_grad()
    out.loss.backward()
    grads = {name: p.grad for name, p in method.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["backbone.conv1.weight"].abs().sum() > 0 and grads["students.fc_b1.weight"].abs().sum() > 0
    opt.step()
    after = method.state_dict()
    assert not torch.equal(after["backbone.conv1.weight"], before["backbone.conv1.weight"])
    assert not torch.equal(after["backbone.bn1.running_mean"], before["backbone.bn1.running_mean"])
