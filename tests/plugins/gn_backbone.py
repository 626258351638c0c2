"""A test plug-in (loaded through TESKD_PLUGINS): a small backbone without BatchNorm.

With BatchNorm, each process of a multi-process CPU run normalises its own half batch, so
its weights cannot equal a one-process run's; GroupNorm has no batch statistics.
"""

from torch import nn

from teskd.models import Backbone, StageInfo, register_backbone


class GroupNormNet(Backbone):
    def __init__(self, num_classes: int, width: int):
        super().__init__()
        w = [width, 2 * width, 4 * width, 8 * width]
        self.stem = nn.Conv2d(3, w[0], 3, padding=1, bias=False)
        names = ("layer1", "layer2", "layer3", "layer4")
        self.stage_info = tuple(StageInfo(c, 2 ** i, n) for i, (c, n) in enumerate(zip(w, names)))
        for i, name in enumerate(names):
            cin = w[max(i - 1, 0)]
            setattr(self, name, nn.Sequential(nn.Conv2d(cin, w[i], 3, stride=1 if i == 0 else 2, padding=1),
                                              nn.GroupNorm(2, w[i]), nn.ReLU()))
        self.num_features = w[-1]
        self.fc = nn.Linear(w[-1], num_classes)

    def forward_stem(self, x):
        return self.stem(x)


@register_backbone("test_gn_net")
def gn_net(num_classes: int, width_mult: float) -> GroupNormNet:
    return GroupNormNet(num_classes, max(2, int(8 * width_mult)))
