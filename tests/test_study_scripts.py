"""The evidence study's analysis scripts (benchmarks/overfit_*.py): the numbers they put in RESULTS.md come from
these pairings, so they are checked against hand-computed values; nothing here trains."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import overfit_cost  # noqa: E402
import overfit_heldout  # noqa: E402


def _row(variant, seed, ce, val, test, train=99.0):
    return {"variant": variant, "seed": seed, "ce": ce, "val_top1": val, "test_top1": test, "train_top1": train}


def test_heldout_rows_pair_each_seed_with_its_own_architectures_ce():
    table = {
        "ce-0": _row("ce", 0, "ce", 18.0, 17.0), "ce-1": _row("ce", 1, "ce", 16.0, 16.5),
        "teskd-0": _row("teskd", 0, "ce", 17.0, 16.0, 80.0), "teskd-1": _row("teskd", 1, "ce", 16.5, 17.0, 70.0),
        "teskd-2": _row("teskd", 2, "ce", 20.0, 20.0, 90.0),  # no CE of seed 2: in the mean, not paired
        "se-ce-0": _row("se-ce", 0, "se-ce", 10.0, 11.0),
        "se-teskd-0": _row("se-teskd", 0, "se-ce", 12.5, 10.0),
    }
    rows = {r.split(" | ")[0].lstrip("| "): r for r in overfit_heldout.rows(table)}
    # columns: test top-1, Δ test, held-out top-1, Δ held-out, training top-1
    assert rows["ce"] == "| ce | 0, 1 | 16.75 ± 0.35 | — | 17.00 ± 1.41 | — | 99.00 ± 0.00 |"
    # teskd: means over its 3 seeds (test 16, 17, 20: 17.67 ± 2.08), Δ of seeds 0 and 1 only:
    # test 16 - 17, 17 - 16.5; held-out 17 - 18, 16.5 - 16 (mean -0.25, sample std 1.06)
    assert rows["teskd"] == ("| teskd | 0, 1, 2 | 17.67 ± 2.08 | -1.00 / +0.50 → -0.25 ± 1.06 | 17.83 ± 1.89 | "
                             "-1.00 / +0.50 → -0.25 ± 1.06 | 80.00 ± 10.00 |")
    assert rows["se-teskd"] == "| se-teskd | 0 | 10.00 | -1.00 | 12.50 | +2.50 | 99.00 |"  # against se-ce, not ce
    assert rows["se-ce"] == "| se-ce | 0 | 11.00 | — | 10.00 | — | 99.00 |"


def test_detached_rows_pair_each_seed_with_teskd_as_published():
    table = {
        "teskd-0": _row("teskd", 0, "ce", 17.0, 16.0), "teskd-1": _row("teskd", 1, "ce", 16.0, 16.5),
        "det-0": _row("det", 0, "ce", 18.5, 19.0), "det-1": _row("det", 1, "ce", 15.0, 17.0),
        "det-2": _row("det", 2, "ce", 30.0, 30.0),  # teskd has no seed 2: not paired
        "se-det-0": _row("se-det", 0, "se-ce", 12.0, 11.0),  # its reference has no runs: no row
    }
    rows = overfit_heldout.pair_rows(table, (("det", "teskd"), ("se-det", "se-teskd")))
    # test: 19 - 16, 17 - 16.5 (mean 1.75, sample std 1.77); held-out: 18.5 - 17, 15 - 16 (0.25, 1.77)
    assert rows == ["| det − teskd | +3.00 / +0.50 → +1.75 ± 1.77 | +1.50 / -1.00 → +0.25 ± 1.77 |"]


def test_heldout_plan_covers_both_sweeps_with_their_ce(monkeypatch):
    monkeypatch.chdir(REPO)  # the scripts run from the repository root, as their usage lines say
    plan = {name: (variant, seed, ce) for name, variant, seed, ce in overfit_heldout.planned()}
    assert plan["teskd-detach-w0.125-spc20-s2"] == ("teskd-detach", 2, "ce")
    assert plan["se-teskd-detach-w0.125-spc20-s1"] == ("se-teskd-detach", 1, "se-ce")
    assert len(plan) == 9 * 3 + 3 * 3
    variants = {variant for variant, _, _ in plan.values()}  # the detached pairs name the study's variants
    assert {name for pair in overfit_heldout.DETACHED for name in pair} <= variants


def test_cost_script_benches_each_variant_once_with_its_overrides(monkeypatch):
    monkeypatch.chdir(REPO)
    runs = overfit_cost.variants(overfit_cost.DEFAULT_SWEEPS[0])
    assert [r.variant for r in runs] == ["ce", "teskd", "teskd-tce1", "teskd-detach", "label_smoothing", "pskd",
                                        "cskd", "byot", "one"]
    tce1 = runs[2]
    assert "method.branch_ce_weights.teacher=5.0" in tce1.overrides and tce1.seed == 0


@pytest.mark.parametrize("values,sign,text", [([17.0], "", "17.00"), ([1.0, 2.0, 3.0], "", "2.00 ± 1.00"),
                                             ([0.5, 1.5], "+", "+1.00 ± 0.71"), ([-0.25], "+", "-0.25")])
def test_mean_std_text(values, sign, text):
    assert overfit_heldout._mean_std(values, sign) == text
