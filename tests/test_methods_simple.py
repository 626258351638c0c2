"""Baselines: label smoothing, classic KD, DML and PS-KD.

Loss tests compare with numbers written out by hand (python floats and math) on 2 x 3 logits; the
end-to-end tests train tiny real CIFAR-100 runs through ``teskd train``.
"""

import json
import math

import pytest
import torch
from torch import nn

from teskd.cli import main
from teskd.config import load_config
from teskd.errors import TeskdError
from teskd.methods import build_method
from teskd.models import build_backbone

from conftest import REPO, hooked_trainer

CONFIG = str(REPO / "configs" / "cifar100" / "resnet18_ce.yaml")

Z1 = [[1.0, 2.0, 0.5], [0.2, -1.0, 3.0]]  # logits of 2 samples x 3 classes
Z2 = [[0.3, 0.1, 2.0], [1.5, 0.0, -0.5]]
LABELS = [1, 2]


# --- hand arithmetic (python floats only) --------------------------------------------------------


def softmax(row, t=1.0):
    e = [math.exp(v / t) for v in row]
    return [v / sum(e) for v in e]


def log_softmax(row, t=1.0):
    m = math.log(sum(math.exp(v / t) for v in row))
    return [v / t - m for v in row]


def soft_ce(rows, targets):
    """mean over rows of sum_c -target_c log_softmax(z)_c"""
    return sum(-sum(t * l for t, l in zip(tr, log_softmax(r))) for r, tr in zip(rows, targets)) / len(rows)


def onehot(label, c=3):
    return [1.0 if i == label else 0.0 for i in range(c)]


def kl(p_rows, z_rows, t=1.0):
    """batch mean of KL(softmax(p_rows/t) || softmax(z_rows/t))"""
    total = 0.0
    for pr, zr in zip(p_rows, z_rows):
        p, lp, lq = softmax(pr, t), log_softmax(pr, t), log_softmax(zr, t)
        total += sum(pi * (a - b) for pi, a, b in zip(p, lp, lq))
    return total / len(p_rows)


class Fixed(nn.Module):
    """A 'network' whose output is a fixed, trainable logit table (the input is ignored)."""

    def __init__(self, logits):
        super().__init__()
        self.z = nn.Parameter(torch.tensor(logits, dtype=torch.float64))

    def forward(self, x):
        return self.z


def method(name, backbone, num_classes=3, **params):
    from teskd.config import method_params_class

    p = method_params_class(name)(**params)
    p.validate()
    return build_method(name, backbone, num_classes, p).train()


X = torch.zeros(2, 3, 32, 32)
Y = torch.tensor(LABELS)


# --- losses by hand --------------------------------------------------------------------------------


def test_label_smoothing_loss_by_hand():
    m = method("label_smoothing", Fixed(Z1), label_smoothing=0.1)
    out = m(X, Y)
    targets = [[0.9 * o + 0.1 / 3 for o in onehot(y)] for y in LABELS]
    assert float(out.loss.detach()) == pytest.approx(soft_ce(Z1, targets), rel=1e-6)
    assert set(out.parts) == {"ce"} and set(out.logits) == {"deployed"}
    # smoothing=0 is plain cross-entropy
    plain = method("label_smoothing", Fixed(Z1), label_smoothing=0.0)(X, Y)
    assert float(plain.loss.detach()) == pytest.approx(soft_ce(Z1, [onehot(y) for y in LABELS]), rel=1e-6)


def test_label_smoothing_rejects_bad_values():
    with pytest.raises(TeskdError, match="method.label_smoothing"):
        load_config(CONFIG, ["method.name=label_smoothing", "method.label_smoothing=1.0"])


def _tiny_teacher_file(path, num_classes=3):
    """A teskd-style deployed.safetensors of a tiny resnet18 (metadata arch/num_classes/width_mult)."""
    from safetensors.torch import save_file

    net = build_backbone("resnet18", num_classes, 0.125)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path),
              metadata={"arch": "resnet18", "num_classes": str(num_classes), "width_mult": "0.125"})
    return net


def test_kd_loss_by_hand(tmp_path):
    _tiny_teacher_file(tmp_path / "t.safetensors")
    m = method("kd", Fixed(Z1), teacher=str(tmp_path / "t.safetensors"), temperature=4.0,
               ce_weight=0.1, kd_weight=0.9)
    m.kd_teacher = Fixed(Z2).requires_grad_(False)  # a known teacher
    out = m(X, Y)
    ce = soft_ce(Z1, [onehot(y) for y in LABELS])
    kd = 16.0 * kl(Z2, Z1, t=4.0)
    assert float(out.parts["ce"]) == pytest.approx(0.1 * ce, rel=1e-6)
    assert float(out.parts["kd"]) == pytest.approx(0.9 * kd, rel=1e-6)
    assert float(out.loss.detach()) == pytest.approx(0.1 * ce + 0.9 * kd, rel=1e-6)
    assert set(out.logits) == {"student", "teacher"}  # the deployed student, the frozen teacher
    # the teacher is a constant target: its table gets no gradient
    out.loss.backward()
    assert m.kd_teacher.z.grad is None and m.backbone.z.grad is not None


def test_dml_loss_and_gradients_by_hand():
    m = method("dml", Fixed(Z1))
    m.peer2 = Fixed(Z2)
    out = m(X, Y)
    ce = soft_ce(Z1, [onehot(y) for y in LABELS]) + soft_ce(Z2, [onehot(y) for y in LABELS])
    kls = kl(Z2, Z1) + kl(Z1, Z2)
    assert float(out.parts["ce"]) == pytest.approx(ce, rel=1e-6)
    assert float(out.parts["kl"]) == pytest.approx(kls, rel=1e-6)
    assert float(out.loss.detach()) == pytest.approx(ce + kls, rel=1e-6)
    assert set(out.logits) == {"peer1", "peer2"}
    out.loss.backward()
    # each peer's gradient is its own: d/dz_k [CE(z_k) + KL(sg p_other || p_k)] = (2 p_k - y - p_other) / B
    for zk, zo, grad in ((Z1, Z2, m.backbone.z.grad), (Z2, Z1, m.peer2.z.grad)):
        for i, y in enumerate(LABELS):
            pk, po, yy = softmax(zk[i]), softmax(zo[i]), onehot(y)
            expected = [(2 * a - b - c) / 2 for a, b, c in zip(pk, yy, po)]
            assert grad[i].tolist() == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_pskd_loss_by_hand_epoch0_and_later():
    m = method("pskd", Fixed(Z1), alpha_T=0.8)
    with pytest.raises(TeskdError, match="setup_data"):
        m(X, Y, torch.tensor([0, 1]))
    m.setup_data(4, 1)
    with pytest.raises(TeskdError, match="index"):
        m(X, Y, None)
    assert "predictions" not in " ".join(m.state_dict())  # not part of the module's weights
    # epoch 0: plain cross-entropy, and the batch's rows take this step's softmax
    m.on_epoch_start(0, 4)
    out = m(X, Y, torch.tensor([3, 1]))
    assert float(out.loss.detach()) == pytest.approx(soft_ce(Z1, [onehot(y) for y in LABELS]), rel=1e-6)
    table = m.training_state_dict()["predictions"]
    assert table[3].tolist() == pytest.approx(softmax(Z1[0]), rel=1e-6)
    assert table[1].tolist() == pytest.approx(softmax(Z1[1]), rel=1e-6)
    assert table[0].abs().sum() == 0 and table[2].abs().sum() == 0
    # epoch 2 of 4: alpha_t = 0.8 * 3 / 4 = 0.6, with a given table
    given = torch.tensor([[0.2, 0.5, 0.3], [0.1, 0.1, 0.8], [0.6, 0.3, 0.1], [0.3, 0.3, 0.4]])
    m.load_training_state({"predictions": given.clone()})
    m.on_epoch_start(2, 4)
    out = m(X, Y, torch.tensor([2, 0]))
    prev = [given[2].tolist(), given[0].tolist()]
    targets = [[0.4 * o + 0.6 * p for o, p in zip(onehot(y), pr)] for y, pr in zip(LABELS, prev)]
    assert float(out.loss.detach()) == pytest.approx(soft_ce(Z1, targets), rel=1e-6)
    assert float(out.parts["ce"]) == pytest.approx(float(out.loss.detach()))
    after = m.training_state_dict()["predictions"]
    assert after[2].tolist() == pytest.approx(softmax(Z1[0]), rel=1e-6)
    assert after[1].tolist() == pytest.approx(given[1].tolist())  # untouched rows stay


def test_pskd_table_shape_is_checked():
    m = method("pskd", Fixed(Z1))
    m.setup_data(4, 1)
    with pytest.raises(TeskdError, match="shape"):
        m.load_training_state({"predictions": torch.zeros(5, 3)})
    with pytest.raises(TeskdError, match="alpha_T"):
        load_config(CONFIG, ["method.name=pskd", "method.alpha_T=1.5"])


# --- tiny real runs --------------------------------------------------------------------------------


def tiny(root, *extra):
    return [f"data.root={root}", "model.width_mult=0.125", "data.subset_per_class=4",
            "data.test_subset_per_class=2", "data.batch_size=50", "data.eval_batch_size=100",
            "train.progress=false", "train.deterministic=true", "train.threads=1", *extra]


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def check_run(run, branches, parts, epochs=1):
    recs = records(run)
    assert [r["epoch"] for r in recs] == list(range(1, epochs + 1))
    for r in recs:
        assert set(r["test_acc"]) == set(branches)
        assert {f"loss_{p}" for p in parts} <= set(r)
        assert sum(r[f"loss_{p}"] for p in parts) == pytest.approx(r["train_loss"], rel=1e-5)
    summary = json.loads((run / "summary.json").read_text())
    plain = sum(p.numel() for p in build_backbone("resnet18", 100, 0.125).parameters())
    assert summary["params_deploy"] == plain
    return summary


def test_label_smoothing_trains(tmp_path, cifar100_root):
    out = tmp_path / "ls"
    assert main(["train", CONFIG, *tiny(cifar100_root, "train.epochs=1", "method.name=label_smoothing"),
                 "--out", str(out)]) == 0
    check_run(out, {"deployed"}, ["ce"])


@pytest.fixture(scope="module")
def ce_run(tmp_path_factory):
    from conftest import SHARED_CIFAR100

    if not (SHARED_CIFAR100 / "train.npz").is_file():
        pytest.skip(f"real CIFAR-100 not found at {SHARED_CIFAR100}")
    out = tmp_path_factory.mktemp("kd") / "ce_teacher"
    assert main(["train", CONFIG, *tiny(SHARED_CIFAR100, "train.epochs=1"), "--out", str(out)]) == 0
    return out


def test_kd_trains_with_a_frozen_teacher(ce_run, tmp_path, cifar100_root):
    out = tmp_path / "kd"
    seen = {"calls": 0}

    def hook(trainer, n, output):
        m = trainer.method
        assert not m.kd_teacher.training and m.backbone.training
        assert all(not p.requires_grad for p in m.kd_teacher.parameters())
        ids = {id(p) for g in trainer.opt.optimizer.param_groups for p in g["params"]}
        assert not ids & {id(p) for p in m.kd_teacher.parameters()}
        assert {id(p) for p in m.backbone.parameters()} <= ids
        seen["calls"] += 1
        return output

    args = tiny(cifar100_root, "train.epochs=1", "method.name=kd", f"method.teacher={ce_run}")
    trainer = hooked_trainer(CONFIG, args, out, hook)
    trainer.run()
    assert seen["calls"] == 8  # 400 images / 50
    summary = check_run(out, {"student", "teacher"}, ["ce", "kd"])
    assert summary["params_train"] == summary["params_deploy"]  # the teacher is not trained
    # the teacher's weights (BN statistics included) are exactly the CE run's best checkpoint's
    src = torch.load(ce_run / "checkpoints" / "best.pt", weights_only=True)["model"]
    got = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["model"]
    teacher = {k[len("kd_teacher."):]: v for k, v in got.items() if k.startswith("kd_teacher.")}
    assert teacher and set(teacher) == {k[len("backbone."):] for k in src}
    for key, value in teacher.items():
        assert torch.equal(value, src[f"backbone.{key}"]), key
    # the deployed network is the student alone
    from safetensors.torch import load_file

    exported = load_file(str(out / "deployed.safetensors"))
    assert set(exported) == {k[len("backbone."):] for k in got if k.startswith("backbone.")}
    # the teacher's accuracy is that of the CE run's deployed network (same network, same test images)
    assert records(out)[0]["test_acc"]["teacher"] == pytest.approx(records(ce_run)[0]["test_acc"]["deployed"])


def _kd_teacher_state(teacher, *extra):
    from teskd.build import build_model

    cfg = load_config(CONFIG, ["model.width_mult=0.125", "method.name=kd", f"method.teacher={teacher}", *extra])
    return build_model(cfg, 100).kd_teacher.state_dict()


def test_kd_teacher_sources_agree(ce_run):
    from safetensors.torch import load_file

    exported = load_file(str(ce_run / "deployed.safetensors"))
    for source in (ce_run, ce_run / "checkpoints" / "best.pt", ce_run / "deployed.safetensors"):
        state = _kd_teacher_state(source)
        assert set(state) == set(exported)
        for key, value in exported.items():
            assert torch.equal(state[key], value), (source, key)
    last = _kd_teacher_state(ce_run, "method.teacher_checkpoint=last")
    assert all(torch.equal(last[k], v) for k, v in exported.items())  # one epoch: best is last


def test_kd_bad_teacher_paths(tmp_path, capsys, cifar100_root):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(b"\x00" * 64)
    empty_dir = tmp_path / "empty_run"
    empty_dir.mkdir()
    for path in (tmp_path / "missing", garbage, bad_st, empty_dir):
        code = main(["train", CONFIG, *tiny(cifar100_root, "method.name=kd", f"method.teacher={path}"),
                     "--out", str(tmp_path / "run")])
        err = capsys.readouterr().err.strip()
        assert code == 2, path
        assert str(path) in err and "\n" not in err and "Traceback" not in err, err
    with pytest.raises(TeskdError, match="method.teacher"):
        load_config(CONFIG, ["method.name=kd"])  # required
    _tiny_teacher_file(tmp_path / "three.safetensors", num_classes=3)
    with pytest.raises(TeskdError, match="3 classes"):
        _kd_teacher_state(tmp_path / "three.safetensors")


def test_dml_peers_start_different_and_train(tmp_path, cifar100_root):
    from teskd.build import build_model

    torch.manual_seed(0)
    m = build_model(load_config(CONFIG, ["model.width_mult=0.125", "method.name=dml"]), 100)
    a, b = m.backbone.state_dict(), m.peer2.state_dict()
    assert set(a) == set(b)
    weights = [k for k in a if k.endswith("weight") and a[k].dim() > 1]
    assert weights and all(not torch.equal(a[k], b[k]) for k in weights)
    out = tmp_path / "dml"
    assert main(["train", CONFIG, *tiny(cifar100_root, "train.epochs=1", "method.name=dml"),
                 "--out", str(out)]) == 0
    summary = check_run(out, {"peer1", "peer2"}, ["ce", "kl"])
    assert summary["params_train"] == 2 * summary["params_deploy"]


def test_dml_peer_of_another_architecture(tmp_path, cifar100_root):
    out = tmp_path / "dml_vgg"
    assert main(["train", CONFIG, *tiny(cifar100_root, "train.epochs=1", "method.name=dml", "method.peer_arch=vgg16",
                                       "method.peer_width_mult=0.125"), "--out", str(out)]) == 0
    summary = check_run(out, {"peer1", "peer2"}, ["ce", "kl"])
    vgg = sum(p.numel() for p in build_backbone("vgg16", 100, 0.125).parameters())
    assert summary["params_train"] == summary["params_deploy"] + vgg
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert any(k.startswith("peer2.") for k in state)
    with pytest.raises(TeskdError, match="peer_arch"):
        load_config(CONFIG, ["method.name=dml", "method.peer_arch=nonexistent"])


def _table(run):
    return torch.load(run / "checkpoints" / "last.pt", weights_only=True)["method_state"]["predictions"]


def test_pskd_resume_matches_a_straight_run(tmp_path, cifar100_root):
    args = tiny(cifar100_root, "method.name=pskd")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(["train", CONFIG, *args, "train.epochs=2", "--out", str(straight)]) == 0
    check_run(straight, {"deployed"}, ["ce"], epochs=2)
    assert main(["train", CONFIG, *args, "train.epochs=1", "--out", str(resumed)]) == 0
    after_one = _table(resumed)
    assert after_one.shape == (400, 100)
    # every training sample was seen once: each row is a softmax
    assert torch.allclose(after_one.sum(dim=1), torch.ones(400), atol=1e-5)
    assert main(["train", "--resume", str(resumed), "train.epochs=2"]) == 0
    a = torch.load(straight / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(resumed / "checkpoints" / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    assert set(a["model"]) == set(b["model"])
    assert not any("prediction" in k for k in a["model"])  # the table is not part of the weights
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert torch.equal(a["method_state"]["predictions"], b["method_state"]["predictions"])
    assert not torch.equal(a["method_state"]["predictions"], after_one)  # epoch 2 rewrote the rows
