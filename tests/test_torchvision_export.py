"""``teskd export --format torchvision`` of a ``tv:NAME`` network loads into torchvision's own constructor the
usual way, MNASNet included (its loader needs the state dict's version table)."""

import warnings

import torch
import torchvision

from teskd.cli import main
from teskd.deploy.metadata import DeployInfo
from teskd.deploy.safetensors_format import save_safetensors
from teskd.models import build_backbone

warnings.filterwarnings("ignore", category=UserWarning)


def test_a_mnasnet_export_loads_into_torchvision_mnasnet(tmp_path, capsys):
    torch.manual_seed(0)
    net = build_backbone("tv:mnasnet0_5", 10)
    net.train()
    with torch.no_grad():  # BN statistics away from their defaults
        net(torch.randn(4, 3, 64, 64))
    net.eval()
    src = save_safetensors(net, DeployInfo("tv:mnasnet0_5", 10, 1.0, input_size=64, resize=73),
                           tmp_path / "m.safetensors")
    out = tmp_path / "mnasnet.pth"
    assert main(["export", str(src), "--format", "torchvision", "--out", str(out)]) == 0
    assert "identical outputs" in capsys.readouterr().out
    twin = torchvision.models.mnasnet0_5(num_classes=10)  # the documented way (export.py's docstring)
    twin.load_state_dict(torch.load(out, weights_only=True), strict=True)
    assert twin.layers[0].out_channels == 16  # the current (version 2) stem, not converted to version 1's 32
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(twin.eval()(x), net(x))
    # the backbone's own state dict carries torchvision's version too: it loads into the constructor in memory
    again = torchvision.models.mnasnet0_5(num_classes=10)
    again.load_state_dict(net.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(again.eval()(x), net(x))
