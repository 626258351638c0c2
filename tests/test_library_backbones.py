"""Any torchvision/timm CNN or your own nn.Module as the deployed network: stage discovery,
students on it, one training step, and the strict round trip into the library's constructor."""

import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import teskd
from teskd.build import build_model
from teskd.config import load_config
from teskd.errors import TeskdError
from teskd.models import LibraryBackbone, build_backbone, register_backbone, wrap_backbone
from teskd.models.pretrained import load_pretrained
from teskd.models.stage_probe import probe_stages

from conftest import SHARED_CIFAR100

warnings.filterwarnings("ignore", category=UserWarning)

# name -> ((module, where) of T1..T4, channels of T1..T4), read from torchvision's definitions
TORCHVISION = {
    "resnet18": ([("layer2", "input"), ("layer3", "input"), ("layer4", "input"), ("avgpool", "input")],
                 [64, 128, 256, 512]),
    # the block outputs before each stride-2 block, not the expansion convs inside it; SE pools are not stages
    "mobilenet_v3_small": ([("features.2", "input"), ("features.4", "input"), ("features.9", "input"),
                            ("avgpool", "input")], [16, 24, 48, 576]),
    "regnet_y_400mf": ([("trunk_output.block2", "input"), ("trunk_output.block3", "input"),
                        ("trunk_output.block4", "input"), ("avgpool", "input")], [48, 104, 208, 440]),
    "efficientnet_b0": ([("features.3", "input"), ("features.4", "input"), ("features.6", "input"),
                         ("avgpool", "input")], [24, 40, 112, 1280]),
    "convnext_tiny": ([("features.2", "input"), ("features.4", "input"), ("features.6", "input"),
                       ("avgpool", "input")], [96, 192, 384, 768]),
    # pooling is functional code here: T4 is the output of the last module at stride 32
    "densenet121": ([("features.transition1", "input"), ("features.transition2", "input"),
                     ("features.transition3", "input"), ("features", "output")], [256, 512, 1024, 1024]),
}
TRAINED = ["resnet18", "mobilenet_v3_small", "regnet_y_400mf", "efficientnet_b0", "convnext_tiny"]


@pytest.mark.parametrize("name", sorted(TORCHVISION))
def test_stage_discovery_finds_four_stages_at_strides_4_to_32(name):
    taps_expected, channels = TORCHVISION[name]
    with torch.device("meta"):  # a shape probe: no memory, no compute
        backbone = build_backbone(f"tv:{name}", 10)
    assert [(t.module, t.where) for t in backbone.taps] == taps_expected
    assert [s.channels for s in backbone.stage_info] == channels
    assert [s.reduction for s in backbone.stage_info] == [4, 8, 16, 32]
    assert backbone.num_features == channels[-1]


def _tv(name: str, num_classes: int = 10) -> nn.Module:
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes)


@pytest.mark.parametrize("name", TRAINED)
def test_students_build_train_and_the_teacher_round_trips_strictly(name):
    torch.manual_seed(0)
    # all three students (the library default is the deepest alone), each as wide as its stage (cheap)
    cfg = load_config(None, [f"model.arch=tv:{name}", "method.levels=[1, 2, 3]", "method.student_width=stage"])
    method = build_model(cfg, 10)
    backbone = method.backbone
    # the students read the discovered stages at CIFAR's 32 px: T4 is 1x1 there, so they branch at stage 3
    assert method.students.branch_stage == 3
    assert method.students.widths == {lvl: backbone.stage_info[lvl - 1].channels for lvl in (1, 2, 3)}
    g = torch.Generator().manual_seed(1)
    # 16 images: with 1x1 maps at stride 32, BatchNorm on fewer samples makes RegNet's gradients explode
    images, labels = torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    opt = torch.optim.SGD(method.parameters(), lr=0.01)
    method.train()
    out = method(images, labels)
    assert set(out.logits) == {"teacher", "student1", "student2", "student3"}
    assert all(v.shape == (16, 10) for v in out.logits.values())
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for part, module in (("students", method.students), ("backbone", backbone)):
        grads = [p.grad for p in module.parameters() if p.requires_grad]
        assert any(g_ is not None and g_.abs().sum() > 0 for g_ in grads), part
    opt.step()
    after = backbone.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in after)  # the step changed the teacher

    # the deployed network is the library's own: strict load into its constructor, identical outputs
    twin = _tv(name)
    twin.load_state_dict(after, strict=True)
    assert list(twin.state_dict()) == list(after)
    backbone.eval(), twin.eval()
    with torch.no_grad():
        x = torch.randn(3, 3, 32, 32, generator=g)
        assert torch.isfinite(twin(x)).all() and torch.equal(backbone(x), twin(x))
        assert torch.equal(method.eval()(x)["teacher"], twin(x))


def test_a_trained_torchvision_run_exports_to_torchvision_and_loads(tmp_path):
    from teskd.cli import main

    if not (SHARED_CIFAR100 / "train.npz").is_file():
        pytest.skip(f"real CIFAR-100 not found at {SHARED_CIFAR100}")
    run = tmp_path / "run"
    args = [f"data.root={SHARED_CIFAR100}", "model.arch=tv:mobilenet_v3_small", "data.subset_per_class=2",
            "data.test_subset_per_class=1", "data.batch_size=50", "train.epochs=1", "train.progress=false",
            "train.threads=1", "schedule.warmup_epochs=0"]
    assert main(["train", "configs/cifar100/resnet18_teskd.yaml", *args, "--out", str(run)]) == 0
    out = tmp_path / "mnv3.pth"
    assert main(["export", str(run), "--format", "torchvision", "--out", str(out)]) == 0
    twin = _tv("mobilenet_v3_small", 100)
    twin.load_state_dict(torch.load(out, weights_only=True), strict=True)
    model, preprocess, classes = teskd.load(run)
    assert len(classes) == 100
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), twin.eval()(x))


class TwoStageNet(nn.Module):
    """A CNN that pools after two downsamplings: no 4 stages to find."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.b = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.b(F.relu(self.a(x)))), 1).flatten(1))


def test_a_network_without_four_stages_gets_one_line_errors():
    with pytest.raises(TeskdError) as err:
        wrap_backbone(TwoStageNet(), "TwoStageNet")
    msg = str(err.value)
    assert "\n" not in msg and "cannot split TwoStageNet into 4 stages" in msg and "[2, 4]" in msg
    with torch.device("meta"), pytest.raises(TeskdError, match=r"cannot split tv:vit_b_16 into 4 stages"):
        build_backbone("tv:vit_b_16", 10)
    with pytest.raises(TeskdError, match="unknown torchvision classification model 'mobilenet_v9'"):
        build_backbone("tv:mobilenet_v9", 10)
    with pytest.raises(TeskdError, match="model.width_mult must be 1.0 for tv:resnet18"):
        build_backbone("tv:resnet18", 10, 0.5)
    with pytest.raises(TeskdError, match="stage 4 and head cannot be copied"):
        build_model(load_config(None, ["model.arch=tv:resnet18", "method.name=one"]), 10)


class TinyNet(nn.Module):
    """A user's own CNN: four stride-2 stages, functional pooling, a learned scale held at the top."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.stages = nn.Sequential(*[nn.Sequential(nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.BatchNorm2d(2 * c),
                                                    nn.ReLU()) for c in (8, 16, 32, 64)])
        self.scale = nn.Parameter(torch.ones(()))
        self.head = nn.Linear(128, num_classes)

    def forward(self, x):
        return self.head(self.stages(self.stem(x)).mean((2, 3))) * self.scale


def test_own_module_is_wrapped_unchanged_and_follows_dtype_moves():
    net = TinyNet()
    backbone = wrap_backbone(net, "TinyNet")
    assert [(t.module, t.where) for t in backbone.taps] == [("stages.1", "input"), ("stages.2", "input"),
                                                           ("stages.3", "input"), ("stages", "output")]
    assert [s.channels for s in backbone.stage_info] == [16, 32, 64, 128]
    assert list(backbone.state_dict()) == list(net.state_dict())
    backbone.to(torch.float64)  # the model's own parameter follows (its forward reads it)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        backbone.scale.fill_(2.0)
        f = backbone.eval().forward_features(x)
        assert torch.equal(f.logits, net(x)) and f.logits.dtype == torch.float64
        assert torch.allclose(f.logits, net.head(f.stages[-1].mean((2, 3))) * 2.0)
        assert torch.equal(f.feature, f.stages[-1].mean((2, 3)))
    assert not net.training  # train/eval reaches the wrapped model itself


def test_own_module_registered_by_name_trains_through_the_api(tmp_path):
    if not (SHARED_CIFAR100 / "train.npz").is_file():
        pytest.skip(f"real CIFAR-100 not found at {SHARED_CIFAR100}")

    @register_backbone("test_tinynet")
    def tinynet(num_classes, width_mult):
        return wrap_backbone(TinyNet(num_classes), "TinyNet")

    summary = teskd.train("configs/cifar100/resnet18_teskd.yaml", tmp_path / "run",
                          **{"model.arch": "test_tinynet", "data.root": str(SHARED_CIFAR100),
                             "data.subset_per_class": 2, "data.test_subset_per_class": 1, "data.batch_size": 50,
                             "train.epochs": 1, "train.progress": False, "schedule.warmup_epochs": 0})
    assert summary["arch"] == "test_tinynet" and summary["epochs"] == 1
    model, _, _ = teskd.load(tmp_path / "run")
    twin = TinyNet(100)
    twin.load_state_dict(model.state_dict(), strict=True)


def test_pretrained_weights_load_except_a_head_of_another_size(tmp_path):
    torch.manual_seed(0)
    source = _tv("mobilenet_v3_small", 1000)  # "ImageNet" weights
    torch.save(source.state_dict(), tmp_path / "w.pth")
    backbone = build_backbone("tv:mobilenet_v3_small", 10)
    skipped = load_pretrained(backbone, tmp_path / "w.pth")
    assert skipped == ["classifier.3.weight", "classifier.3.bias"]
    mine = backbone.state_dict()
    for key, value in source.state_dict().items():
        if key not in skipped:
            assert torch.equal(mine[key], value), key
    with pytest.raises(TeskdError, match="does not match the network; missing"):
        load_pretrained(build_backbone("tv:resnet18", 10), tmp_path / "w.pth")
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(TeskdError, match="cannot read"):
        load_pretrained(backbone, tmp_path / "bad.pth")


def test_timm_networks_use_their_feature_info_and_round_trip():
    timm = pytest.importorskip("timm")  # installed by `make install` (the [timm] extra)
    for name, channels in (("resnet18", [64, 128, 256, 512]), ("mobilenetv3_small_100", [16, 24, 48, 576])):
        torch.manual_seed(0)
        method = build_model(load_config(None, [f"model.arch=timm:{name}"]), 10)
        backbone = method.backbone
        assert isinstance(backbone, LibraryBackbone) and all(t.where == "output" for t in backbone.taps)
        assert [s.channels for s in backbone.stage_info] == channels
        out = method.train()(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))
        out.loss.backward()
        twin = timm.create_model(name, pretrained=False, num_classes=10)
        twin.load_state_dict(backbone.state_dict(), strict=True)
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            assert torch.equal(backbone.eval()(x), twin.eval()(x))


def test_probe_leaves_the_model_untouched():
    net = TinyNet()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in net.modules())
    probe_stages(net, "TinyNet")
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in net.modules()) == hooks


def test_info_shows_the_discovered_stages_and_the_students_cost():
    from teskd.evaluation import model_info

    info = model_info(load_config(None, ["model.arch=tv:mobilenet_v3_small"]))
    assert info["stages"] == ("T1 16ch /4 features.2 input · T2 24ch /8 features.4 input · "
                              "T3 48ch /16 features.9 input · T4 576ch /32 avgpool input")
    # the library default: the deepest student alone, at the faithful width (the teacher's 576: no projection)
    assert info["students"].startswith("levels 3 · widths 576/576/576") and "no projection" in info["students"]
    assert info["params_train"] < 2.5 * info["params_deploy"]  # three such students: > 8x (below)
    paper = model_info(load_config(None, ["model.width_mult=0.125"]))  # the paper's networks: all three, width C
    assert paper["students"].startswith("levels 1,2,3 · widths 64/64/64")
    assert info["params_deploy"] == sum(p.numel() for p in _tv("mobilenet_v3_small", 100).parameters())
    faithful = model_info(load_config(None, ["model.arch=tv:mobilenet_v3_small", "method.student_width=faithful",
                                             "method.levels=[1, 2, 3]"]))
    assert "widths 576/576/576" in faithful["students"] and faithful["params_train"] > 8 * info["params_deploy"]
