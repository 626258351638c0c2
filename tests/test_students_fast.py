"""The fast students (students_fast.py) compute exactly the reference function: outputs and gradients."""

import copy

import pytest
import torch

from teskd.config import load_config
from teskd.build import build_model
from teskd.models.students_fast import patch_conv


def build_pair(overrides, num_classes):
    """One model built twice, with the reference and with the fast students, holding the same weights;
    the global RNG is left as one build leaves it."""
    ref = build_model(load_config(None, [*overrides, "method.fast_students=false"]), num_classes)
    with torch.random.fork_rng(devices=[]):
        fast = build_model(load_config(None, [*overrides, "method.fast_students=true"]), num_classes)
    fast.load_state_dict(ref.state_dict())
    assert ref.students.fast is False and fast.students.fast is True
    return ref, fast


def _run(m, x, y):
    out = m.forward_train(x, y)
    out.loss.backward()
    grads = {n: p.grad for n, p in m.named_parameters()}
    return out, grads


def assert_same(m_ref, m_fast, x, y, rtol, atol):
    ref, g_ref = _run(m_ref, x, y)
    fast, g_fast = _run(m_fast, x, y)
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
    ref, fast = build_pair([f"model.arch={arch}", "model.width_mult=0.125", *extra], 10)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, 32, 32, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (6,), generator=g)
    assert_same(ref.double(), fast.double(), x, y, rtol=1e-9, atol=1e-12)


EPS32 = torch.finfo(torch.float32).eps
# Tolerances of the float32 check below, in units of float32 epsilon times the float64 value's scale.
# Logits: a few dot products of fan-in <= 2C (the fuse convolution over the concatenation, C = 128 at
# width 0.25) whose rounding grows like sqrt(fan): 16 * sqrt(2C) eps = 256 eps = 3.1e-5 of max|logit|.
# Measured: <= 27 eps for either formulation (1 or 2 threads, both layouts), so ~10x margin; a 1e-3 relative
# error inside the fast path (the fuse block's lateral term scaled by 1 + 1e-3) gives ~5000 eps.
OUTPUT_TOL = 256
# Gradients (all student parameters and the stage inputs together, one norm): the backward pass crosses
# five training-mode batch norms, whose backward cancels heavily, so rounding is amplified by ~1e4 for
# either formulation (measured <= 1.2e4 eps at this seed, on 1 or 2 threads, both layouts; the reference's
# own error is as large). 2**16 eps = 0.8% sits ~5x above that and ~4.5x below the ~3e5 eps that the same
# 1e-3 perturbation produces.
GRAD_TOL = 2**16


def _students_step(students, stages, cotangents):
    """The students alone on given stage maps: logits and the gradients of a fixed linear function of
    them, with respect to every student parameter and to the stage maps."""
    s = copy.deepcopy(students)
    stages = [t.detach().clone().requires_grad_(True) for t in stages]
    out = s(stages)
    objective = sum((out[k][0] * cotangents[k].to(out[k][0].dtype)).sum() for k in out)
    objective.backward()
    grads = {n: p.grad for n, p in s.named_parameters()}
    grads.update({f"stage{i + 1}": t.grad for i, t in enumerate(stages)})
    return {k: v[0] for k, v in out.items()}, grads


@pytest.mark.parametrize("channels_last", [False, True])
def test_fast_is_as_accurate_as_the_reference_in_float32(channels_last):
    """In float32 both formulations round differently; against float64 on the very same inputs, each must
    stay within a fixed multiple of float32 epsilon of the value's scale (not of the other's error: a ratio
    of two rounding errors flips with thread scheduling). The students run alone on identical stage maps,
    so the backbone's (shared) rounding does not blur what is compared."""
    torch.manual_seed(0)
    ref, fast = (m.double() for m in build_pair(["model.width_mult=0.25"], 100))
    with torch.no_grad():  # float32 values, so float32 and float64 start from the very same numbers
        x = torch.randn(32, 3, 32, 32, dtype=torch.float64)
        stages = [t.float() for t in ref.backbone.forward_stages(x)]
    g = torch.Generator().manual_seed(1)
    cotangents = {f"student{level}": torch.randn(32, 100, generator=g, dtype=torch.float64) / 32
                  for level in ref.students.levels}
    exact_logits, exact_grads = _students_step(ref.students.train(), [t.double() for t in stages], cotangents)
    if channels_last:
        stages = [t.contiguous(memory_format=torch.channels_last) for t in stages]
    grad_scale = torch.stack([v.norm() for v in exact_grads.values()]).norm().item()
    for students in (ref.students, fast.students):
        students32 = copy.deepcopy(students).train().float()
        if channels_last:
            students32 = students32.to(memory_format=torch.channels_last)
        logits, grads = _students_step(students32, stages, cotangents)
        assert logits.keys() == exact_logits.keys() and grads.keys() == exact_grads.keys()
        assert all(v is not None for v in grads.values())
        for k, want in exact_logits.items():
            err = (logits[k].double() - want).abs().max().item() / (EPS32 * want.abs().max().item())
            assert err <= OUTPUT_TOL, f"fast={students.fast} {k}: logits off by {err:.0f} eps x max|logit|"
        err = torch.stack([(grads[n].double() - v).norm() for n, v in exact_grads.items()]).norm().item()
        err /= EPS32 * grad_scale
        assert err <= GRAD_TOL, f"fast={students.fast}: gradients off by {err:.0f} eps x |gradient|"


def test_eval_mode_outputs_match():
    torch.manual_seed(0)
    ref_method, fast_method = (m.double().eval() for m in build_pair(["model.width_mult=0.125"], 10))
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    ref, fast = ref_method.forward_eval(x), fast_method.forward_eval(x)
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


def test_reference_switch_from_config_is_fixed_at_construction():
    method = build_model(load_config(None, ["model.width_mult=0.125", "method.fast_students=false"]), 10)
    assert method.students.fast is False
    with pytest.raises(AttributeError):
        method.students.fast = True
