"""A faster, exactly equivalent execution of ``HierarchicalStudents`` (same parameters, same function).

Each rewrite is algebra, not an approximation; ``tests/test_students_fast.py`` compares
outputs and every parameter gradient with the plain reference formulation
(``HierarchicalStudents.forward_reference``); ``HierarchicalStudents(..., fast=True)`` runs them:

1. **Upsample blocks**: bilinear upsampling (a fixed linear map over space) and a bias-free
   1x1 convolution (a linear map over channels) commute, so ``conv(up(x)) = up(conv(x))``;
   the convolution runs at the low resolution, r² (4×) fewer multiply-adds. BN then sees the
   very same upsampled map, so its batch statistics are unchanged.
2. **Fuse blocks**: with the 1x1 weight split as ``W = [W_a | W_b]`` over the two halves of
   the concatenation, ``W · cat[U + L, U] = (W_a + W_b) · U + W_a · L``: no 2C-channel
   concatenation is materialised, nor the ``U + L`` sum.
3. **Auxiliary branches**: a k×k convolution with stride k sees non-overlapping patches, so
   it is one matrix product of the (patch, C·k·k) matrix with the weight, instead of a
   generic strided convolution. Only the faithful ("conv") branches are rewritten; the
   cheaper branch types of ``student_branches.py`` run as they are.
4. ReLUs run in place (a BN output is not needed by BN's backward).

Odd sizes (see ``students.py``) take the same steps as the reference: the upsampling goes to the
lateral's actual size (rewrite 1 holds for any output size: bilinear interpolation is a linear map
over space, applied to each channel alike), and the branch's input is zero-padded to a multiple of
k (``pad_to_patches``) before the patch product.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from teskd.models.student_blocks import AuxiliaryBranch, ConvBNReLU, UpsampleBlock
from teskd.models.student_branches import pad_to_patches


# The blocks' convolutions are bias-free (ConvBNReLU, UpsampleBlock), which rewrites 1 and 2 rely on.


def _bn_relu(bn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.relu(bn(x), inplace=True)


def _conv_bn_relu(block: ConvBNReLU, x: torch.Tensor) -> torch.Tensor:
    return _bn_relu(block.bn, block.conv(x))


def _upsample(block: UpsampleBlock, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    return _bn_relu(block.bn, block.resize(F.conv2d(x, block.conv.weight), size))  # rewrite 1: 1x1 conv first


def _fuse(block: ConvBNReLU, up: torch.Tensor, lateral: torch.Tensor) -> torch.Tensor:
    weight = block.conv.weight  # (C, 2C, 1, 1) over cat[up + lateral, up]
    c = up.shape[1]
    w_a = weight[:, :c]
    out = F.conv2d(up, w_a + weight[:, c:])  # rewrite 2: no concatenation
    out.add_(F.conv2d(lateral, w_a))  # in place: a conv's backward does not need its output
    return _bn_relu(block.bn, out)


def patch_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A k×k, stride-k, unpadded convolution as one matrix product over patches (rewrite 3)."""
    k = conv.kernel_size[0]
    if k == 1:
        return conv(x)
    b, c, h, w = x.shape
    ho, wo = h // k, w // k
    x = x[:, :, : ho * k, : wo * k]
    if x.is_contiguous(memory_format=torch.channels_last):
        # (b, h, w, c) in memory: order each patch as (row, col, channel) so the copy moves
        # contiguous runs of k*c values, and order the weight the same way
        patches = x.permute(0, 2, 3, 1).reshape(b, ho, k, wo, k, c).transpose(2, 3).reshape(b * ho * wo, k * k * c)
        weight = conv.weight.permute(0, 2, 3, 1).reshape(conv.out_channels, k * k * c)
    else:
        patches = x.reshape(b, c, ho, k, wo, k).permute(0, 2, 4, 1, 3, 5).reshape(b * ho * wo, c * k * k)
        weight = conv.weight.reshape(conv.out_channels, c * k * k)
    out = torch.addmm(conv.bias, patches, weight.t()) if conv.bias is not None else patches @ weight.t()
    return out.reshape(b, ho, wo, conv.out_channels).permute(0, 3, 1, 2)  # channels-last memory


def _branch(block: AuxiliaryBranch, x: torch.Tensor) -> torch.Tensor:
    y = _bn_relu(block.bn1, patch_conv(block.conv1, pad_to_patches(x, block.conv1.stride[0])))
    return _bn_relu(block.bn2, block.conv2(y))


def fast_forward(students: nn.Module,
                 stages: Sequence[torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Same result as ``students.forward_reference(stages)`` (``students``: a ``HierarchicalStudents``)."""
    fused: dict[int, torch.Tensor] = {}
    above = _conv_bn_relu(students.laterals["3"], stages[3])  # S4
    for level in range(3, students.levels[0] - 1, -1):
        up = _upsample(students.upsample[str(level - 1)], above, stages[level - 1].shape[-2:])
        lateral = _conv_bn_relu(students.laterals[str(level - 1)], stages[level - 1])
        above = fused[level] = _fuse(students.fuse(level), up, lateral)
    out = {}
    for level in students.levels:
        block = students.branch(level)
        mapped = _branch(block, fused[level]) if students.branch_type == "conv" else block(fused[level])
        feature = torch.flatten(F.adaptive_avg_pool2d(mapped, 1), 1)
        out[f"student{level}"] = (students.head(level)(feature), feature)
    return out
