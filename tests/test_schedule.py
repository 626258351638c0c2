import math

import pytest

from teskd.config import ScheduleConfig
from teskd.engine.schedule import lr_factor


def test_step_schedule_matches_official_per_epoch_multisteplr():
    cfg = ScheduleConfig(name="step", milestones=[100, 150], gamma=0.1)
    # 0-based epochs 0..99 -> 1, 100..149 -> 0.1, 150..199 -> 0.01 (official: 1-based epochs 101, 151 change)
    assert [lr_factor(cfg, 200, e) for e in (0, 99, 100, 149, 150, 199)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.01])


def test_cosine_schedule_per_epoch():
    cfg = ScheduleConfig(name="cosine")
    assert lr_factor(cfg, 200, 0) == 1.0
    assert lr_factor(cfg, 200, 100) == pytest.approx(0.5)
    assert lr_factor(cfg, 200, 150) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.75)))


def test_warmup_ramps_linearly_per_step_then_follows_schedule():
    cfg = ScheduleConfig(name="step", milestones=[100], warmup_epochs=2)
    steps = 10
    ramp = [lr_factor(cfg, 200, e, s, steps) for e in (0, 1) for s in range(steps)]
    assert ramp == pytest.approx([(i + 1) / 20 for i in range(20)])
    assert lr_factor(cfg, 200, 2, 0, steps) == 1.0
