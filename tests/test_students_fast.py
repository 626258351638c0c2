"""The fast students (students_fast.py) compute exactly the reference function: outputs and gradients."""

import copy

import pytest
import torch

from teskd.config import load_config
from teskd.engine.trainer import build_model
from teskd.models.students_fast import patch_conv


def _run(method, fast, x, y):
    m = copy.deepcopy(method)
    m.students.fast = fast
    out = m.forward_train(x, y)
    out.loss.backward()
    grads = {n: p.grad for n, p in m.named_parameters()}
    return out, grads, m


def assert_same(method, x, y, rtol, atol):
    ref, g_ref, m_ref = _run(method, False, x, y)
    fast, g_fast, m_fast = _run(method, True, x, y)
    assert fast.loss.item() == pytest.approx(ref.loss.item(), rel=rtol, abs=atol)
    assert ref.logits.keys() == fast.logits.keys()
    for k in ref.logits:
        torch.testing.assert_close(fast.logits[k], ref.logits[k], rtol=rtol, atol=atol)
    assert g_ref.keys() == g_fast.keys()
    for name, g in g_ref.items():
        assert (g is None) == (g_fast[name] is None), name
        if g is not None:  # error relative to the tensor's norm (BN-preceded biases have ~0 gradient)
            err = (g_fast[name] - g).norm().item()
            assert err <= rtol * g.norm().item() + atol, (name, err, g.norm().item())
    # BN running statistics follow the same batch statistics
    for (name, b_ref), b_fast in zip(m_ref.named_buffers(), m_fast.buffers()):
        torch.testing.assert_close(b_fast, b_ref, rtol=rtol, atol=atol, msg=name)


CASES = [
    ("resnet18", []),
    ("resnet50", []),  # bottleneck: C = 2048 x width
    ("vgg16", []),  # branch kernels 4, 2, 1 (k = 1 takes the plain conv)
    ("resnext18", []),
    ("seresnet18", []),
    ("resnet18", ["method.levels=[2]"]),
    ("resnet18", ["method.levels=[1, 3]"]),
    ("resnet18", ["method.student_width={1: 8, 2: 24, 3: 16}", "method.feature_loss=false"]),
]


@pytest.mark.parametrize("arch, extra", CASES)
def test_fast_equals_reference_float64(arch, extra):
    torch.manual_seed(0)
    cfg = load_config(None, [f"model.arch={arch}", "model.width_mult=0.125", *extra])
    method = build_model(cfg, 10).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, 32, 32, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (6,), generator=g)
    assert_same(method, x, y, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("channels_last", [False, True])
def test_fast_is_as_accurate_as_the_reference_in_float32(channels_last):
    """In float32 both formulations round differently; measured against a float64 computation of the
    same step, the fast one must be about as accurate as the reference one."""
    torch.manual_seed(0)
    method = build_model(load_config(None, ["model.width_mult=0.25"]), 100)
    # batch 32: with 8 images, BN over a 4x4 map (128 values a channel) can be ill-conditioned enough that
    # either formulation's float32 rounding gets amplified to percent-level gradient differences
    x = torch.randn(32, 3, 32, 32)
    y = torch.randint(0, 100, (32,))
    exact = _run(method.double(), False, x.double(), y)
    method = method.float()
    if channels_last:
        method = method.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    ref, fast = _run(method, False, x, y), _run(method, True, x, y)

    def error(run, name):
        return (run[1][name].double() - exact[1][name]).norm().item()

    for name, g in exact[1].items():
        if g is None or g.norm() < 1e-6:  # BN-preceded biases: exactly zero gradient in exact arithmetic
            continue
        assert error(fast, name) <= 3 * error(ref, name) + 1e-4 * g.norm().item(), name
    for k in exact[0].logits:
        assert (fast[0].logits[k].double() - exact[0].logits[k]).abs().max() < 1e-3


def test_eval_mode_outputs_match():
    torch.manual_seed(0)
    method = build_model(load_config(None, ["model.width_mult=0.125"]), 10).double().eval()
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    method.students.fast = False
    ref = method.forward_eval(x)
    method.students.fast = True
    fast = method.forward_eval(x)
    for k in ref:
        torch.testing.assert_close(fast[k], ref[k], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("k, size", [(2, 8), (4, 16), (8, 32), (4, 18)])
def test_patch_conv_is_the_strided_convolution(k, size):
    conv = torch.nn.Conv2d(5, 7, kernel_size=k, stride=k).double()
    x = torch.randn(3, 5, size, size, dtype=torch.float64)
    torch.testing.assert_close(patch_conv(conv, x), conv(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("k, size", [(2, 8), (8, 32)])
def test_patch_conv_channels_last(k, size):
    conv = torch.nn.Conv2d(5, 7, kernel_size=k, stride=k).double()
    x = torch.randn(3, 5, size, size, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(patch_conv(conv, x), conv(x), rtol=1e-12, atol=1e-12)


def test_checkpointed_students_give_the_same_step_with_less_saved_memory():
    from teskd.bench import activation_bytes

    torch.manual_seed(0)
    plain = build_model(load_config(None, ["model.width_mult=0.125"]), 10).double()
    ckpt = copy.deepcopy(plain)
    ckpt.params.checkpoint_students = True
    x = torch.randn(6, 3, 32, 32, dtype=torch.float64)
    y = torch.randint(0, 10, (6,))
    outs = []
    for m in (plain, ckpt):
        out = m.forward_train(x, y)
        out.loss.backward()
        outs.append(out)
    assert outs[1].loss.item() == pytest.approx(outs[0].loss.item(), rel=1e-12)
    for (name, p1), p2 in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p2.grad, p1.grad, rtol=1e-9, atol=1e-12, msg=name)
    # BN running statistics are updated once, not again by the recomputation
    for (name, b1), b2 in zip(plain.named_buffers(), ckpt.buffers()):
        torch.testing.assert_close(b2, b1, rtol=1e-12, atol=1e-12, msg=name)
    dev = torch.device("cpu")
    assert activation_bytes(ckpt, x, y, dev, None) < 0.6 * activation_bytes(plain, x, y, dev, None)


def test_reference_switch_from_config():
    method = build_model(load_config(None, ["model.width_mult=0.125", "method.fast_students=false"]), 10)
    assert method.students.fast is False
