"""For every architecture: the exported teacher is the plain backbone and computes the teacher branch."""

import pytest
import torch
from safetensors.torch import load_file

from teskd.config import load_config
from teskd.build import build_model
from teskd.deploy.safetensors_format import export_deployed
from teskd.models import build_backbone, list_backbones

PAPER_ARCHS = {"resnet18", "resnet34", "resnet50", "seresnet18", "seresnet34", "seresnet50",
               "resnext18", "resnext34", "resnext50", "vgg16", "vgg19"}


def test_every_paper_architecture_is_registered():
    assert PAPER_ARCHS <= set(list_backbones())


@pytest.mark.parametrize("arch", sorted(PAPER_ARCHS))
def test_exported_teacher_matches_the_trained_teacher_branch(arch, tmp_path):
    torch.manual_seed(0)
    cfg = load_config(None, [f"model.arch={arch}", "model.width_mult=0.125"])
    method = build_model(cfg, 100)
    # a few training steps, so weights and BN statistics are no longer the initial ones
    opt = torch.optim.SGD(method.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 100, (8,))
    for _ in range(2):
        opt.zero_grad()
        method.forward_train(x, y).loss.backward()
        opt.step()
    path = tmp_path / "teacher.safetensors"
    export_deployed(method, path, cfg, 100)

    plain = build_backbone(arch, 100, 0.125)  # no student code involved
    plain.load_state_dict(load_file(str(path)))  # strict
    plain.eval()
    method.eval()
    test_x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = method.forward_eval(test_x)["teacher"]
        got = plain(test_x)
    assert torch.equal(got, expected)
    assert sum(p.numel() for p in plain.parameters()) < sum(p.numel() for p in method.parameters())
