"""TESKD's students at the image sizes users pick, not only those whose stage maps halve exactly.

At 112 px the ImageNet ResNet-18's stages are 28, 14, 7, 4 (a stride-2 convolution rounds 7/2 up):
the students upsample to the next stage's actual size, and their stride-k branches zero-pad to a
multiple of k, so they give T_B's size (see students.py). Where the sizes divide, both are exactly
the official operations (the 32 px equivalence tests in test_models.py and test_students_fast.py).
"""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from teskd.build import build_model
from teskd.config import load_config
from teskd.models.students import BRANCHES, UpsampleBlock

from test_students_fast import assert_same, build_pair

warnings.filterwarnings("ignore", category=UserWarning)

REDUCTIONS = (4, 8, 16, 32)


def imagenet_r18(size: int, *extra: str) -> list[str]:
    """ImageNet ResNet-18 at the smallest width (stages 4, 8, 16, 32 channels) on ``size`` px image-folder data."""
    return ["model.arch=resnet18_imagenet", "model.width_mult=0.0625", "data.dataset=imagefolder",
            f"data.image_size={size}", *extra]


def batch(size: int, classes: int = 5, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, size, size, generator=g, dtype=dtype), torch.randint(0, classes, (2,), generator=g)


def record_sizes(method):
    """Hooks that record the stage maps' sizes and the size of each branch's k x k stride-k output during
    one pass (read at the BN after that convolution, which the fast students call as a module too)."""
    seen = {}
    s = method.students
    s.register_forward_pre_hook(lambda _m, args: seen.__setitem__("stages", [t.shape[-1] for t in args[0]]))
    for level in s.levels:
        block = s.branch(level)
        block[block.patch_layer + 1].register_forward_hook(
            lambda _m, _a, out, level=level: seen.__setitem__(level, tuple(out.shape[-2:])))
    return seen


# 40, 48, 56, 112 and 299 have stages that do not halve exactly; they crashed in the top-down sum
@pytest.mark.parametrize("size", [40, 48, 56, 96, 112, 128, 160, 192, 224, 256, 299, 320, 384])
def test_imagenet_resnet18_teskd_trains_at_common_image_sizes(size):
    torch.manual_seed(0)
    method = build_model(load_config(None, imagenet_r18(size)), 5).train()
    seen = record_sizes(method)
    x, y = batch(size)
    out = method.forward_train(x, y)
    assert {k: tuple(v.shape) for k, v in out.logits.items()} == {
        "teacher": (2, 5), "student1": (2, 5), "student2": (2, 5), "student3": (2, 5)}
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for name, p in method.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for p in method.students.parameters())
    # every stride-2 step of this network rounds up, so T_i has ceil(size / reduction_i) cells
    assert seen["stages"] == [math.ceil(size / r) for r in REDUCTIONS]
    b = method.students.branch_stage
    assert b == (4 if size // 32 >= 2 else 3)
    t_b = seen["stages"][b - 1]
    assert {level: seen[level] for level in (1, 2, 3)} == dict.fromkeys((1, 2, 3), (t_b, t_b))  # all at T_B's size


@pytest.mark.parametrize("size, extra", [
    (112, []),  # stages 28, 14, 7, 4: every upsampling and every branch meets an odd map
    (299, []),  # 75, 38, 19, 10
    (40, []),  # 10, 5, 3, 2: branches at stage 3, k = 4, 2, 1
    (112, ["method.student_branch=bottleneck", "method.levels=[1, 3]"]),  # padded inside the branch (layer 3)
    (299, ["method.student_branch=depthwise", "method.levels=[2]"]),
])
def test_fast_students_equal_the_reference_at_odd_sizes_float64(size, extra):
    torch.manual_seed(0)
    ref, fast = build_pair(imagenet_r18(size, *extra), 5)
    x, y = batch(size, dtype=torch.float64)
    assert_same(ref.double(), fast.double(), x, y, rtol=1e-9, atol=1e-12)


def test_a_library_backbone_at_an_odd_size_trains_and_the_fast_students_agree():
    torch.manual_seed(0)
    overrides = ["model.arch=tv:mobilenet_v3_small", "method.levels=[1, 2, 3]", "method.student_width=stage",
                 "data.dataset=imagefolder", "data.image_size=112"]
    ref, fast = build_pair(overrides, 5)
    for m in (*ref.modules(), *fast.modules()):  # its classifier's dropout would draw different masks in the two
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    seen = record_sizes(fast)
    x, y = batch(112, dtype=torch.float64)
    assert_same(ref.double(), fast.double(), x, y, rtol=1e-9, atol=1e-12)
    assert seen == {"stages": [28, 14, 7, 4], 1: (4, 4), 2: (4, 4), 3: (4, 4)}


def test_upsampling_to_the_size_is_the_official_x2_where_sizes_double():
    torch.manual_seed(0)
    block = UpsampleBlock(3, 4, 2).double()
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    official = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
    assert torch.equal(block.resize(x, (8, 10)), official(x))  # bit for bit
    assert torch.equal(block.resize(x, None), official(x))
    assert torch.equal(block.eval()(x, (8, 10)), block(x))
    # to an odd size: 4 -> 7 with aligned corners puts every input cell on an even output position
    odd = block.resize(x, (7, 9))
    assert odd.shape == (2, 3, 7, 9)
    assert torch.equal(odd[..., ::2, ::2], x)
    torch.testing.assert_close(odd[..., 1::2, ::2], (x[..., :-1, :] + x[..., 1:, :]) / 2, rtol=1e-12, atol=1e-12)
    assert block(x, (7, 9)).shape == (2, 4, 7, 9)


@pytest.mark.parametrize("branch", sorted(BRANCHES))
def test_branches_zero_pad_maps_that_k_does_not_divide(branch):
    torch.manual_seed(0)
    block = BRANCHES[branch](8, 2).double().eval()
    with torch.no_grad():  # BN statistics away from the defaults, so its shift is not 0
        for layer in block:
            if isinstance(layer, nn.BatchNorm2d):
                layer.running_mean.uniform_(-1, 1), layer.running_var.uniform_(0.5, 2)
    x = torch.rand(2, 8, 7, 7, dtype=torch.float64)
    out = block(x)
    assert out.shape == (2, 8, 4, 4)
    manual = x
    for index, layer in enumerate(block):
        manual = layer(F.pad(manual, (0, 1, 0, 1)) if index == block.patch_layer else manual)
    assert torch.equal(out, manual)
    # the official patches are kept, at the top left; the padded edge cells are added at the bottom and right
    plain = nn.Sequential.forward(block, x)
    assert plain.shape == (2, 8, 3, 3)
    torch.testing.assert_close(out[..., :3, :3], plain, rtol=1e-12, atol=1e-12)
    # where k divides the size nothing is padded: the plain branch, exactly
    x8 = torch.rand(2, 8, 8, 8, dtype=torch.float64)
    assert torch.equal(block(x8), nn.Sequential.forward(block, x8))
