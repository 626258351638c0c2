"""BYOT, DKS and CS-KD: losses against hand computation, exits on several backbones, tiny real runs."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from teskd.cli import main
from teskd.config import load_config
from teskd.errors import TeskdError
from teskd.methods import METHODS, build_method
from teskd.methods.byot import byot_loss
from teskd.losses import soft_kl
from teskd.methods.dks import dks_loss
from teskd.models import build_backbone

from conftest import REPO

# ---------------------------------------------------------------------------------------------------------------
# hand computation (python floats)


def softmax(row, t=1.0):
    m = max(row)
    e = [math.exp((v - m) / t) for v in row]
    s = sum(e)
    return [v / s for v in e]


def cross_entropy(rows, labels):
    return sum(-math.log(softmax(r)[y]) for r, y in zip(rows, labels)) / len(rows)


def kl(p_rows, q_rows):
    """mean over rows of sum_c p log(p / q)"""
    return sum(sum(p * math.log(p / q) for p, q in zip(pr, qr)) for pr, qr in zip(p_rows, q_rows)) / len(p_rows)


Z = [[1.0, -0.5, 2.0], [0.3, 0.2, -1.0]]  # final / teacher logits, B = 2, C = 3
E1 = [[0.5, 0.5, 0.0], [-1.0, 2.0, 0.5]]
E2 = [[2.0, 0.1, -0.3], [0.0, 0.0, 1.5]]
Y = [2, 0]


def tensor(rows, grad=False):
    return torch.tensor(rows, dtype=torch.float32, requires_grad=grad)


def test_byot_loss_by_hand():
    alpha, beta, t = 0.1, 1e-2, 3.0
    f = [[1.0, -2.0, 0.5, 0.0], [0.0, 3.0, -1.0, 2.0]]
    g1 = [[0.5, -1.0, -0.5, 1.0], [-2.0, 1.0, 0.0, 0.5]]
    g2 = [[2.0, 1.0, -3.0, -1.0], [1.0, -1.0, -1.0, 0.0]]
    ce = cross_entropy(Z, Y) + cross_entropy(E1, Y) + cross_entropy(E2, Y)
    kd = 0.0
    for e in (E1, E2):  # T^2 * mean_b -sum_c softmax(z/T) * log softmax(e/T)
        kd += t * t * sum(-sum(p * math.log(q) for p, q in zip(softmax(zr, t), softmax(er, t)))
                          for zr, er in zip(Z, e)) / 2
    feat = 0.0
    for g in (g1, g2):  # sum over elements where either is > 0
        feat += sum((a - b) ** 2 for gr, fr in zip(g, f) for a, b in zip(gr, fr) if a > 0 or b > 0)
    assert feat == pytest.approx(51.75)  # 8.5 + 43.25: elements where both are <= 0 left out
    parts = byot_loss(tensor(Z), [tensor(E1), tensor(E2)], tensor(f), [tensor(g1), tensor(g2)],
                      torch.tensor(Y), alpha, beta, t)
    assert parts["ce"].item() == pytest.approx((1 - alpha) * ce, rel=1e-6)
    assert parts["kd"].item() == pytest.approx(alpha * kd, rel=1e-6)
    assert parts["feat"].item() == pytest.approx(beta * feat, rel=1e-6)


def test_byot_targets_are_detached():
    """The KD gradient reaches the exits only (alpha T (q - p) / B per exit logit), never the final head;
    the feature term's gradient never reaches the final feature."""
    alpha, t = 0.3, 2.0
    z, e1, f, g1 = tensor(Z, True), tensor(E1, True), tensor([[1.0, -1.0]], True), tensor([[2.0, 0.5]], True)
    parts = byot_loss(z, [e1], f.expand(2, 2), [g1.expand(2, 2)], torch.tensor(Y), alpha, 1.0, t)
    (parts["kd"] + parts["feat"]).backward()
    assert z.grad is None or z.grad.abs().max() == 0
    assert f.grad is None or f.grad.abs().max() == 0
    for b in range(2):
        p, q = softmax(Z[b], t), softmax(E1[b], t)
        for c in range(3):
            assert e1.grad[b, c].item() == pytest.approx(alpha * t * (q[c] - p[c]) / 2, abs=1e-6)
    # d/dg sum (g - f)^2 over the two rows, both elements masked in
    assert g1.grad.tolist()[0] == pytest.approx([2 * 2 * (2.0 - 1.0), 2 * 2 * (0.5 + 1.0)])


def test_dks_loss_by_hand():
    eps = 1e-3  # large enough to matter at float32
    branches = {"deployed": Z, "exit2": E1, "exit3": E2}

    def smooth(rows):
        return [[(p + eps) / (1 + 3 * eps) for p in softmax(r)] for r in rows]

    ce = sum(cross_entropy(rows, Y) for rows in branches.values())
    kd = sum(kl(smooth(branches[j]), smooth(branches[i])) for i in branches for j in branches if i != j)
    parts = dks_loss({k: tensor(v) for k, v in branches.items()}, torch.tensor(Y), eps)
    assert parts["ce"].item() == pytest.approx(ce, rel=1e-6)
    assert parts["kd"].item() == pytest.approx(kd, rel=1e-5)
    assert kd > 0 and set(parts) == {"ce", "kd"}


def test_dks_synergy_gradient_by_hand():
    """With eps = 0: d kd / d z_i = sum_{j != i} (p_i - p_j) / B (each branch pulled toward the others, which
    are detached as targets)."""
    branches = {"deployed": Z, "exit2": E1, "exit3": E2}
    logits = {k: tensor(v, True) for k, v in branches.items()}
    dks_loss(logits, torch.tensor(Y), eps=0.0)["kd"].backward()
    for i in branches:
        for b in range(2):
            p_i = softmax(branches[i][b])
            expected = [sum(p_i[c] - softmax(branches[j][b])[c] for j in branches if j != i) / 2 for c in range(3)]
            assert logits[i].grad[b].tolist() == pytest.approx(expected, abs=1e-6)


def test_cskd_kl_by_hand():
    t = 4.0
    expected = t * t * kl([softmax(r, t) for r in E1], [softmax(r, t) for r in Z])  # sum KL / B, B = 2
    z, partner = tensor(Z, True), tensor(E1, True)
    value = soft_kl(z, partner, t)
    assert value.item() == pytest.approx(expected, rel=1e-6)
    value.backward()
    assert partner.grad is None or partner.grad.abs().max() == 0
    for b in range(2):
        grad = [t * (q - p) / 2 for q, p in zip(softmax(Z[b], t), softmax(E1[b], t))]
        assert z.grad[b].tolist() == pytest.approx(grad, abs=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# the methods on several backbones

EXITS = {"byot": {"exit1", "exit2", "exit3"}, "dks": {"exit2", "exit3"}, "cskd": set()}
HEAD = {"byot": "teacher", "dks": "deployed", "cskd": "deployed"}  # each method's deploy_branch
ARCHS = [("resnet18", 32), ("vgg16", 32), ("resnet18_imagenet", 64)]


def build(name, arch="resnet18", size=32, **params):
    torch.manual_seed(0)
    p = METHODS.get(name).params_class(**params)
    p.validate()
    return build_method(name, build_backbone(arch, 100, 0.125), 100, p, size)


def paired_batch(size, b=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * b, 3, size, size, generator=g)
    y = torch.randint(0, 100, (b,), generator=g)
    return x, torch.cat([y, y])


@pytest.mark.parametrize("arch,size", ARCHS)
@pytest.mark.parametrize("name,params", [("byot", {}), ("byot", {"exit_type": "sepconv"}), ("dks", {}),
                                         ("dks", {"exit_stages": [1, 2, 3], "replica_block": "bottleneck"}),
                                         ("cskd", {})])
def test_builds_trains_and_routes_gradients(name, params, arch, size):
    method = build(name, arch, size, **params).train()
    x, y = paired_batch(size)  # a same-class paired batch suits every method
    out = method(x, y)
    rows = 3 if name == "cskd" else 6
    expected = {HEAD[name]} | EXITS[name]
    if params.get("exit_stages"):
        expected = {HEAD[name], "exit1", "exit2", "exit3"}
    assert set(out.logits) == expected
    assert all(z.shape == (rows, 100) for z in out.logits.values())
    assert sum(out.parts.values()).item() == pytest.approx(out.loss.item(), rel=1e-5)
    assert torch.isfinite(out.loss)
    if name == "byot":  # the exits bring their stage to the last stage's resolution and channels
        with torch.no_grad():
            maps = method.backbone.forward_stages(x)
            for k in (1, 2, 3):
                assert method.exits[f"exit{k}"](maps[k - 1]).shape == maps[-1].shape
    out.loss.backward()
    stages = [getattr(method.backbone, info.module) for info in method.backbone.stage_info]
    assert all(any(p.grad is not None and p.grad.abs().max() > 0 for p in s.parameters()) for s in stages)
    assert all(p.grad is not None for p in method.parameters()), "a parameter outside the graph"

    # each exit reads its own stage: its logits' gradient reaches stage k and nothing deeper
    for name_k in expected - {HEAD[name]}:
        k = int(name_k[-1])
        method.zero_grad(set_to_none=True)
        method(x, y).logits[name_k].sum().backward()
        assert any(p.grad is not None and p.grad.abs().max() > 0 for p in stages[k - 1].parameters())
        assert all(p.grad is None for p in stages[k].parameters())


@pytest.mark.parametrize("name", ["byot", "dks", "cskd"])
def test_deploys_the_plain_backbone(name):
    method = build(name).eval()
    fresh = build_backbone("resnet18", 100, 0.125)
    assert list(method.deploy_module.state_dict()) == list(fresh.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        scores = method(x)
        assert method.deploy_branch == HEAD[name] and set(scores) == {HEAD[name]} | EXITS[name]
        assert torch.equal(scores[HEAD[name]], method.deploy_module(x))


def test_cskd_unit_paired_batch():
    method = build("cskd").train()
    reference = copy.deepcopy(method.backbone)
    x, y = paired_batch(32, b=4)
    seen = []
    hook = method.backbone.register_forward_hook(lambda m, i, o: seen.append(o))
    out = method(x, y)
    hook.remove()
    # two backbone calls: the batch with gradients, its partners without
    assert len(seen) == 2 and seen[0].requires_grad and not seen[1].requires_grad
    assert torch.equal(out.labels, y[:4]) and out.logits["deployed"].shape == (4, 100)
    # separate train-mode forwards (each half with its own BN batch statistics)
    z, partner = reference(x[:4]), reference(x[4:])
    t = 4.0
    kd = t * t * F.kl_div(F.log_softmax(z / t, 1), F.softmax(partner / t, 1), reduction="sum") / 4
    assert out.loss.item() == pytest.approx((F.cross_entropy(z, y[:4]) + kd).item(), rel=1e-5)
    assert out.parts["kd"].item() == pytest.approx(kd.item(), rel=1e-3, abs=1e-6)  # float32 cancellation
    joint = copy.deepcopy(reference)(x)  # one forward over 2B would mix the halves' BN statistics
    assert not torch.allclose(joint[:4], z, atol=1e-4)
    bn = next(m for m in method.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert bn.num_batches_tracked.item() == 2


def test_cskd_rejects_unpaired_batches():
    method = build("cskd").train()
    x, y = paired_batch(32, b=2)
    with pytest.raises(TeskdError, match="paired"):
        method(x[:3], y[:3])  # odd
    with pytest.raises(TeskdError, match="paired"):
        method(x, torch.tensor([1, 2, 3, 4]))  # second half of another class
    assert METHODS.get("cskd").batch_pairing == "same_class"


@pytest.mark.parametrize("override", ["method.alpha=1.5", "method.temperature=0", "method.exit_type=foo",
                                      "method.beta=-1"])
def test_byot_params_rejected(override):
    with pytest.raises(TeskdError, match=override.split("=")[0]):
        load_config(None, ["method.name=byot", override])


@pytest.mark.parametrize("override", ["method.exit_stages=[4]", "method.exit_stages=[]", "method.replica_blocks=[1,1]",
                                      "method.replica_block=foo"])
def test_dks_params_rejected(override):
    with pytest.raises(TeskdError, match=override.split("=")[0]):
        load_config(None, ["method.name=dks", override])


def test_cskd_params_rejected():
    with pytest.raises(TeskdError, match="method.temperature"):
        load_config(None, ["method.name=cskd", "method.temperature=-1"])


# ---------------------------------------------------------------------------------------------------------------
# tiny real runs


@pytest.mark.parametrize("name,parts", [("byot", {"ce", "kd", "feat"}), ("dks", {"ce", "kd"}),
                                        ("cskd", {"ce", "kd"})])
def test_trains_on_real_cifar100(name, parts, tmp_path, cifar100_root):
    out = tmp_path / name
    config = str(REPO / "configs" / "cifar100" / "resnet18_ce.yaml")
    args = [f"method.name={name}", f"data.root={cifar100_root}", "model.width_mult=0.125",
            "data.subset_per_class=2", "data.test_subset_per_class=1", "data.batch_size=50",
            "data.eval_batch_size=100", "train.progress=false", "train.threads=1", "train.epochs=1"]
    assert main(["train", config, *args, "--out", str(out)]) == 0
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert set(record["test_acc"]) == {HEAD[name]} | EXITS[name]
    assert {f"loss_{p}" for p in parts} <= set(record)
    assert not any(k.startswith("loss_") and k[5:] not in parts for k in record)
    assert sum(record[f"loss_{p}"] for p in parts) == pytest.approx(record["train_loss"], rel=1e-5)
    assert math.isfinite(record["train_loss"])
    assert set(record["train_acc"]) == {HEAD[name]} | EXITS[name]
    assert all(0 <= v <= 100 for v in [*record["train_acc"].values(), *record["test_acc"].values()])
