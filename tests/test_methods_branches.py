"""ONE, OKDDip and FRSKD: losses against hand computation, every backbone, gradient flow, real training."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from teskd.cli import main
from teskd.config import load_config
from teskd.errors import TeskdError
from teskd.methods import METHODS
from teskd.losses import sigmoid_ramp
from teskd.losses import soft_kl
from teskd.methods.frskd import attention_map, attention_transfer
from teskd.methods.okddip import okddip_loss, peer_targets
from teskd.methods._auxiliary import pooled
from teskd.methods.one import gated_ensemble, one_loss, run_branch, shared_trunk
from teskd.models import build_backbone

from conftest import REPO

torch.set_num_threads(1)

METHOD_NAMES = ("one", "okddip", "frskd")
BRANCHES = {
    "one": {"branch1", "branch2", "branch3", "ensemble"},
    "okddip": {"leader", "peer1", "peer2", "peer3", "peers_ensemble"},
    "frskd": {"classifier", "self_teacher"},
}
TRAIN_BRANCHES = {**BRANCHES, "okddip": {"leader", "peer1", "peer2", "peer3"}}
DEPLOYED = {"one": "branch1", "okddip": "leader", "frskd": "classifier"}  # each method's deploy_branch
PARTS = {"one": {"ce", "kd"}, "okddip": {"ce", "kd"}, "frskd": {"ce", "kd", "feat"}}


def build(name: str, arch: str = "resnet18", size: int = 32, num_classes: int = 10, **params):
    torch.manual_seed(0)
    backbone = build_backbone(arch, num_classes, 0.125)
    cls = METHODS.get(name)
    return cls(backbone, num_classes, cls.params_class(**params), size)


def batch(size: int = 32, n: int = 4, num_classes: int = 10):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, num_classes, (n,), generator=g)


# --- hand formulas (python floats / numpy) ------------------------------------------------------------


def softmax_row(row, t=1.0):
    e = [math.exp(v / t) for v in row]
    s = sum(e)
    return [v / s for v in e]


def ce_hand(rows, labels):
    """mean over rows of -log softmax(row)[label]."""
    return sum(-math.log(softmax_row(r)[y]) for r, y in zip(rows, labels)) / len(rows)


def kl_hand(rows, target_rows, t, eps=1e-7):
    """T^2 * mean over rows of sum_c (p_c + eps) (log(p_c + eps) - log q_c), p = softmax(target/T), q = softmax(row/T)."""
    total = 0.0
    for r, tr in zip(rows, target_rows):
        q, p = softmax_row(r, t), softmax_row(tr, t)
        total += sum((pc + eps) * (math.log(pc + eps) - math.log(qc)) for pc, qc in zip(p, q))
    return t * t * total / len(rows)


def np_softmax(x, t=1.0, axis=-1):
    x = np.asarray(x, dtype=np.float64) / t
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def np_ce(z, y):
    return float(np.mean(-np.log(np_softmax(z)[np.arange(len(y)), y])))


def np_kl(z, target, t, eps=1e-7):
    p, q = np_softmax(target, t) + eps, np_softmax(z, t)
    return float(t * t * np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=1)))


def np_(t):
    return t.detach().double().numpy()


# --- the ramp ------------------------------------------------------------------------------------------


def test_ramp_values_by_hand():
    # exp(-5 (1 - e/80)^2): e = 0 -> exp(-5); 20 -> exp(-5 * 0.5625); 40 -> exp(-1.25); 79 -> exp(-5/6400)
    assert sigmoid_ramp(0, 80) == pytest.approx(0.006737946999085467, rel=1e-12)
    assert sigmoid_ramp(20, 80) == pytest.approx(0.060054667895307945, rel=1e-12)
    assert sigmoid_ramp(40, 80) == pytest.approx(0.2865047968601901, rel=1e-12)
    assert sigmoid_ramp(79, 80) == pytest.approx(0.9992190550963239, rel=1e-12)
    assert sigmoid_ramp(80, 80) == 1.0 and sigmoid_ramp(150, 80) == 1.0
    assert sigmoid_ramp(5, 0) == 1.0
    assert sigmoid_ramp(5, 10) == pytest.approx(math.exp(-1.25))


@pytest.mark.parametrize("name", ["one", "okddip"])
def test_on_epoch_start_sets_the_ramp(name):
    method = build(name)
    x, y = batch()
    assert float(method.kd_ramp) == pytest.approx(math.exp(-5))  # before any epoch: epoch 0
    method.on_epoch_start(40, 200)
    assert (method.epoch, method.epochs) == (40, 200)
    assert float(method.kd_ramp) == pytest.approx(0.2865047968601901, rel=1e-6)
    kd_40 = method.forward_train(x, y).parts["kd"].item()
    method.on_epoch_start(80, 200)
    assert float(method.kd_ramp) == 1.0
    kd_80 = method.forward_train(x, y).parts["kd"].item()  # train-mode BN: the same outputs
    assert kd_40 == pytest.approx(0.2865047968601901 * kd_80, rel=1e-5)
    assert "kd_ramp" not in method.state_dict()  # not a checkpointed weight


# --- ONE -----------------------------------------------------------------------------------------------


def test_one_gated_ensemble_by_hand():
    z = torch.tensor([[[1.0, 2.0, 0.0], [0.0, -1.0, 3.0], [2.0, 2.0, 2.0]],
                      [[0.5, 0.0, 1.0], [4.0, 0.0, 0.0], [-2.0, 1.0, 0.0]]])  # (B=2, m=3, K=3)
    gate = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.6, 0.3]])
    # sample 0: .5*[1,2,0] + .25*[0,-1,3] + .25*[2,2,2] = [1.0, 1.25, 1.25]
    # sample 1: .1*[.5,0,1] + .6*[4,0,0] + .3*[-2,1,0] = [1.85, 0.3, 0.1]
    expected = torch.tensor([[1.0, 1.25, 1.25], [1.85, 0.3, 0.1]])
    assert torch.allclose(gated_ensemble(z, gate), expected, atol=1e-6)


def test_one_loss_by_hand():
    branches = [[[1.0, 2.0, 0.0], [0.5, 0.0, 1.0]], [[0.0, -1.0, 3.0], [4.0, 0.0, 0.0]],
                [[2.0, 2.0, 2.0], [-2.0, 1.0, 0.0]]]
    ens = [[1.0, 1.25, 1.25], [1.85, 0.3, 0.1]]
    labels = [0, 2]
    ce, kd = one_loss([torch.tensor(b) for b in branches], torch.tensor(ens), torch.tensor(labels), 3.0)
    ce_expected = sum(ce_hand(b, labels) for b in branches) + ce_hand(ens, labels)
    kd_expected = sum(kl_hand(b, ens, 3.0) for b in branches)
    assert ce.item() == pytest.approx(ce_expected, rel=1e-6)
    assert kd.item() == pytest.approx(kd_expected, rel=1e-5)
    # the ensemble is the (detached) target: the KL sends no gradient to it
    ens_t = torch.tensor(ens, requires_grad=True)
    branch_t = [torch.tensor(b, requires_grad=True) for b in branches]
    one_loss(branch_t, ens_t, torch.tensor(labels), 3.0)[1].backward()
    assert ens_t.grad is None or ens_t.grad.abs().max() == 0
    assert all(b.grad.abs().max() > 0 for b in branch_t)


def test_one_forward_is_the_hand_formula():
    method = build("one")
    method.on_epoch_start(40, 200)
    x, y = batch()
    out = method.forward_train(x, y)
    # recompute the branches (train-mode BN: same outputs) and the gate by hand
    t3 = shared_trunk(method.backbone, x)
    z1 = method.backbone.forward_head(method.backbone.layer4(t3))[0]
    zs = [np_(z1)] + [np_(run_branch(s, h, t3)[0]) for s, h in zip(method.branch_stages, method.branch_heads)]
    fc, bn = method.gate[0], method.gate[1]
    h = np_(pooled(t3)) @ np_(fc.weight).T + np_(fc.bias)
    h = (h - h.mean(0)) / np.sqrt(h.var(0) + bn.eps) * np_(bn.weight) + np_(bn.bias)  # BN1d, batch statistics
    gate = np_softmax(np.maximum(h, 0.0))
    ens = sum(gate[:, i:i + 1] * zs[i] for i in range(3))
    yn = y.numpy()
    ce = sum(np_ce(z, yn) for z in zs) + np_ce(ens, yn)
    kd = math.exp(-1.25) * sum(np_kl(z, ens, 3.0) for z in zs)
    assert out.parts["ce"].item() == pytest.approx(ce, rel=1e-4)
    assert out.parts["kd"].item() == pytest.approx(kd, rel=1e-3)
    assert out.loss.item() == pytest.approx(ce + kd, rel=1e-4)
    assert np.allclose(np_(out.logits["ensemble"]), ens, atol=1e-4)
    assert np.allclose(np_(out.logits["branch1"]), zs[0], atol=1e-5)


# --- OKDDip --------------------------------------------------------------------------------------------


def test_okddip_attention_target_by_hand():
    # one sample, 3 peers, d = 2, K = 2
    q = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
    k = [[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]]
    z = [[1.0, 0.0], [0.0, 2.0], [3.0, -1.0]]
    # energies e_ij = q_i . k_j: row 0 = [0, 1, 0], row 1 = [0, 0, 2], row 2 = [0, 1, 2]
    energies = [[0.0, 1.0, 0.0], [0.0, 0.0, 2.0], [0.0, 1.0, 2.0]]
    expected = []
    for row in energies:
        a = softmax_row(row)
        expected.append([sum(a[j] * z[j][c] for j in range(3)) for c in range(2)])
    got = peer_targets(torch.tensor([z]), torch.tensor([q]), torch.tensor([k]))
    assert torch.allclose(got[0], torch.tensor(expected), atol=1e-6)
    # spelled out for peer 0: a = (1, e, 1) / (2 + e); target = (1 + 3, 2e - 1) / (2 + e)
    e = math.e
    assert got[0, 0, 0].item() == pytest.approx(4 / (2 + e), rel=1e-6)
    assert got[0, 0, 1].item() == pytest.approx((2 * e - 1) / (2 + e), rel=1e-6)


def test_okddip_loss_by_hand():
    peers = [[[1.0, 0.0, 2.0], [0.0, 1.0, 0.0]], [[0.5, 0.5, 0.0], [3.0, 0.0, 1.0]]]  # (n=2 peers) x (B=2, K=3)
    targets = [[[0.8, 0.2, 1.5], [1.0, 0.5, 0.2]], [[0.6, 0.4, 0.5], [2.0, 0.3, 0.7]]]
    leader = [[2.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    labels = [2, 0]
    mean = [[(a + b) / 2 for a, b in zip(r1, r2)] for r1, r2 in zip(*peers)]
    ce, kd = okddip_loss(torch.tensor(leader), torch.tensor(peers).transpose(0, 1),
                         torch.tensor(targets).transpose(0, 1), torch.tensor(labels), 3.0)
    ce_expected = ce_hand(leader, labels) + sum(ce_hand(p, labels) for p in peers)
    kd_expected = sum(kl_hand(p, t, 3.0) for p, t in zip(peers, targets)) + kl_hand(leader, mean, 3.0)
    assert ce.item() == pytest.approx(ce_expected, rel=1e-6)
    assert kd.item() == pytest.approx(kd_expected, rel=1e-5)


def test_okddip_forward_is_the_hand_formula():
    method = build("okddip", alpha=0.5)
    method.on_epoch_start(20, 200)
    x, y = batch()
    out = method.forward_train(x, y)
    t3 = shared_trunk(method.backbone, x)
    leader = np_(method.backbone.forward_head(method.backbone.layer4(t3))[0])
    outs = [run_branch(s, h, t3) for s, h in zip(method.peer_stages, method.peer_heads)]
    z = np.stack([np_(o[0]) for o in outs], axis=1)  # (B, n, K)
    f = np.stack([np_(o[1]) for o in outs], axis=1)  # (B, n, C)
    assert method.query.weight.shape == (8, 64)  # C = 64 at width 0.125, C // 8
    q, k = f @ np_(method.query.weight).T, f @ np_(method.key.weight).T
    a = np_softmax(np.einsum("bid,bjd->bij", q, k))
    targets = np.einsum("bij,bjc->bic", a, z)
    yn = y.numpy()
    ce = np_ce(leader, yn) + sum(np_ce(z[:, i], yn) for i in range(3))
    kd = sum(np_kl(z[:, i], targets[:, i], 3.0) for i in range(3)) + np_kl(leader, z.mean(1), 3.0)
    kd *= 0.5 * 0.060054667895307945
    assert out.parts["ce"].item() == pytest.approx(ce, rel=1e-4)
    assert out.parts["kd"].item() == pytest.approx(kd, rel=1e-3)
    assert out.loss.item() == pytest.approx(ce + kd, rel=1e-4)


def test_okddip_kl_reaches_the_other_peers_and_the_projections():
    method = build("okddip")
    x, y = batch()
    leader, peers, features = method._branches(x)
    targets = peer_targets(peers, method.query(features), method.key(features))
    from teskd.losses import kd_kl

    # peer 1's KL alone: its target mixes peers 2 and 3, and is not detached
    kl = kd_kl(peers[:, 0], targets[:, 0], 3.0)
    grad = torch.autograd.grad(kl, peers, retain_graph=True)[0]
    assert grad[:, 1].abs().max() > 0 and grad[:, 2].abs().max() > 0
    # in the full loss, the projections learn only through the (undetached) targets
    method.zero_grad(set_to_none=True)
    method.forward_train(x, y).loss.backward()
    for proj in (method.query, method.key):
        assert proj.weight.grad is not None and proj.weight.grad.abs().max() > 0


# --- FRSKD ---------------------------------------------------------------------------------------------


def test_frskd_attention_transfer_by_hand():
    # f: 1 sample, 2 channels, 2x2; channel mean of f^2 per position
    f = torch.tensor([[[[1.0, 2.0], [0.0, 1.0]], [[3.0, 0.0], [1.0, 1.0]]]])
    g = torch.tensor([[[[0.0, 1.0], [1.0, 0.0]]]], requires_grad=True)  # 1 channel
    mf = [(1 + 9) / 2, (4 + 0) / 2, (0 + 1) / 2, (1 + 1) / 2]  # [5, 2, 0.5, 1]
    nf = math.sqrt(sum(v * v for v in mf))
    mg = [0.0, 1.0, 1.0, 0.0]
    ng = math.sqrt(2.0)
    at_f, at_g = [v / nf for v in mf], [v / ng for v in mg]
    expected = sum((a - b) ** 2 for a, b in zip(at_f, at_g)) / 4
    assert torch.allclose(attention_map(f)[0], torch.tensor(at_f), atol=1e-6)
    loss = attention_transfer(f.requires_grad_(), g)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert g.grad is None  # the self-teacher's feature is the detached target
    assert f.grad.abs().max() > 0


def test_frskd_kl_by_hand():
    z_cls = [[1.0, 0.0, -1.0], [0.2, 0.4, 0.0]]
    z_st = [[0.0, 2.0, 1.0], [1.0, 1.0, 3.0]]
    expected = 0.0
    for r, tr in zip(z_cls, z_st):
        q, p = softmax_row(r, 4.0), softmax_row(tr, 4.0)
        expected += sum(pc * math.log(pc / qc) for pc, qc in zip(p, q))  # no eps in FRSKD's KL
    expected *= 16.0 / 2
    st = torch.tensor(z_st, requires_grad=True)
    cls = torch.tensor(z_cls, requires_grad=True)
    got = soft_kl(cls, st, 4.0)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    got.backward()
    assert st.grad is None and cls.grad.abs().max() > 0


def test_frskd_forward_is_the_formula():
    method = build("frskd", alpha=2.0, beta=100.0, temperature=4.0)
    x, y = batch()
    out = method.forward_train(x, y)
    stages = method.backbone.forward_stages(x)
    z = method.backbone.forward_head(stages[-1])[0]
    g, z_st = method.self_teacher(stages)
    assert [t.shape for t in g] == [s.shape[:1] + (2 * s.shape[1],) + s.shape[2:] for s in stages]  # width 2 x C_k
    yn = y.numpy()
    ce = np_ce(np_(z), yn) + np_ce(np_(z_st), yn)
    p, logq = np_softmax(np_(z_st), 4.0), np.log(np_softmax(np_(z), 4.0))
    kd = 2.0 * 16.0 * float(np.sum(p * (np.log(p) - logq))) / len(yn)
    feat = 0.0
    for f_k, g_k in zip(stages, g):
        a = [np_(t).__pow__(2).mean(1).reshape(len(yn), -1) for t in (f_k, g_k)]
        a = [v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12) for v in a]
        feat += float(np.mean((a[0] - a[1]) ** 2))
    feat *= 100.0
    assert out.parts["ce"].item() == pytest.approx(ce, rel=1e-4)
    assert out.parts["kd"].item() == pytest.approx(kd, rel=1e-3)
    assert out.parts["feat"].item() == pytest.approx(feat, rel=1e-3)
    assert out.loss.item() == pytest.approx(ce + kd + feat, rel=1e-4)


def test_frskd_self_teacher_learns_only_from_its_ce():
    method = build("frskd")
    x, y = batch()
    method.forward_train(x, y).loss.backward()
    full = {n: p.grad.clone() for n, p in method.self_teacher.named_parameters()}
    cls_full = method.backbone.fc.weight.grad.clone()
    method.zero_grad(set_to_none=True)
    _, _, st_logits, _ = method._branches(x)  # train-mode BN: the same outputs
    F.cross_entropy(st_logits, y).backward()
    for n, p in method.self_teacher.named_parameters():
        assert torch.allclose(full[n], p.grad, rtol=1e-4, atol=1e-7), n
    assert any(full[n].abs().max() > 0 for n in full)
    # the classifier does learn from the KD/attention terms (its head gets no gradient from CE(self-teacher))
    assert method.backbone.fc.weight.grad is None or not torch.allclose(cls_full, method.backbone.fc.weight.grad)


# --- every method on every kind of backbone ------------------------------------------------------------


@pytest.mark.parametrize("arch,size", [("resnet18", 32), ("vgg16", 32), ("resnet18_imagenet", 64)])
@pytest.mark.parametrize("name", METHOD_NAMES)
def test_builds_trains_and_deploys(name, arch, size):
    method = build(name, arch, size)
    x, y = batch(size)
    out = method(x, y)
    assert set(out.logits) == TRAIN_BRANCHES[name]
    assert all(v.shape == (4, 10) for v in out.logits.values())
    assert set(out.parts) == PARTS[name]
    assert sum(v.item() for v in out.parts.values()) == pytest.approx(out.loss.item(), rel=1e-5)
    out.loss.backward()
    # every parameter learns; gradients reach the shared stages
    missing = [n for n, p in method.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
    assert not missing, missing
    first = getattr(method.backbone, method.backbone.stage_info[0].module)
    assert any(p.grad.abs().max() > 0 for p in first.parameters())
    # the deployed network is the plain backbone
    assert method.deploy_module is method.backbone
    fresh = build_backbone(arch, 10, 0.125)
    assert list(method.deploy_module.state_dict()) == list(fresh.state_dict())
    method.eval()
    with torch.no_grad():
        scores = method(x)
        assert set(scores) == BRANCHES[name]
        assert all(v.shape == (4, 10) for v in scores.values())
        assert method.deploy_branch == DEPLOYED[name]
        assert torch.allclose(scores[DEPLOYED[name]], method.backbone(x), atol=1e-5)
    # the copies of stage 4 and the head start from other weights than the backbone's
    if name != "frskd":
        stages = method.branch_stages if name == "one" else method.peer_stages
        own = [p for p in getattr(method.backbone, method.backbone.stage_info[-1].module).parameters() if p.dim() > 1]
        for copy in stages:
            other = [p for p in copy.parameters() if p.dim() > 1]
            assert [p.shape for p in other] == [p.shape for p in own]
            assert not torch.equal(other[0], own[0])


@pytest.mark.parametrize("override", ["method.num_branches=1", "method.temperature=0", "method.ramp_epochs=-1"])
def test_one_params_are_validated(override):
    with pytest.raises(TeskdError):
        load_config(None, ["method.name=one", override])


@pytest.mark.parametrize("name,override", [("okddip", "method.num_peers=0"), ("okddip", "method.alpha=-1"),
                                           ("okddip", "method.proj_factor=0"), ("frskd", "method.beta=-1"),
                                           ("frskd", "method.width=0"), ("frskd", "method.temperature=-4")])
def test_params_are_validated(name, override):
    with pytest.raises(TeskdError):
        load_config(None, [f"method.name={name}", override])


# --- real training through the CLI ---------------------------------------------------------------------


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_trains_on_cifar100(name, tmp_path, cifar100_root):
    out = tmp_path / name
    cfg = str(REPO / "configs" / "cifar100" / "resnet18_ce.yaml")
    args = [f"data.root={cifar100_root}", f"method.name={name}", "model.width_mult=0.125",
            "data.subset_per_class=2", "data.test_subset_per_class=1", "data.batch_size=50",
            "data.eval_batch_size=100", "train.progress=false", "train.deterministic=true", "train.threads=1",
            "train.epochs=2", "method.ramp_epochs=1" if name != "frskd" else "method.alpha=2"]
    assert main(["train", cfg, *args, "--out", str(out)]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    for r in records:
        assert set(r["test_acc"]) == BRANCHES[name]
        parts = [r[f"loss_{p}"] for p in PARTS[name]]
        assert all(math.isfinite(v) for v in parts)
        assert sum(parts) == pytest.approx(r["train_loss"], rel=1e-5)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["params_deploy"] < summary["params_train"]
    from safetensors.torch import load_file

    build_backbone("resnet18", 100, 0.125).load_state_dict(load_file(str(out / "deployed.safetensors")))
