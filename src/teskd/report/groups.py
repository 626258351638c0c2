"""Groups of runs, the seeds of one setting, and their statistics: mean and sample std over seeds, the
difference from the matching CE group (Δ vs CE) and the per-seed paired difference (Δ paired)."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from teskd.report.runs import RunInfo
from teskd.report.settings import OWN_COLUMNS, UNSET, is_operational, render_value


def mean(values: list) -> float | None:
    values = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v]
    return statistics.fmean(values) if values else None


def std(values: list) -> float | None:
    """Sample standard deviation (ddof=1); None for fewer than two values."""
    values = [float(v) for v in values if isinstance(v, (int, float)) and v == v]
    return statistics.stdev(values) if len(values) > 1 else None


def maybe_number(text: str):
    try:
        return float(text)
    except ValueError:
        return text


def _finite(value):
    """NaN and infinities as None (JSON has no such numbers)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


@dataclass
class Group:
    """Runs with the same settings apart from their seed (and operational keys)."""

    dataset: str
    arch: str
    width_mult: str
    method: str
    common: tuple  # ((key, value), ...): settings that differ between the runs reported
    method_settings: tuple  # the same among runs of this method (method.* keys)
    runs: list[RunInfo]
    ce: "Group | None" = None  # the CE group with the same dataset, arch, width and common settings

    @property
    def settings(self) -> str:
        return " ".join(f"{k}={render_value(v)}" for k, v in (*self.common, *self.method_settings))

    @property
    def counted(self) -> list[RunInfo]:
        """The runs the statistics use: the finished ones, or, while none has finished, the unfinished ones
        (up to their last finished epoch); a mean never mixes a finished seed with one stopped halfway."""
        return [r for r in self.runs if not r.unfinished] or self.runs

    @property
    def last(self) -> list[float]:
        return [r.row.top1_last for r in self.counted]

    @property
    def best(self) -> list[float]:
        return [r.row.top1_best for r in self.counted]

    @property
    def finished(self) -> bool:
        return any(not r.unfinished for r in self.runs)

    @property
    def delta_vs_ce(self) -> float | None:
        """None unless both groups have a finished seed (a run stopped halfway is not a result to compare)."""
        if self.ce is None or not (self.finished and self.ce.finished):
            return None
        return mean(self.last) - mean(self.ce.last)

    def paired_deltas(self) -> list[float]:
        """Last top-1 minus CE's, seed by seed, over the seeds both groups finished (a paired difference: the
        seed's data order and initialisation are shared, so their noise partly cancels)."""
        if self.ce is None:
            return []
        ce = {r.seed: r.row.top1_last for r in self.ce.runs if not r.unfinished}
        return [r.row.top1_last - ce[r.seed] for r in self.runs if not r.unfinished and r.seed in ce]

    @property
    def epochs(self) -> str:
        """``done/total`` of each seed (``*``: unfinished), one entry when all agree."""
        each = [f"{r.done}/{r.total if r.total is not None else '?'}" + ("*" if r.unfinished else "")
                for r in self.runs]
        return each[0] if len(set(each)) == 1 else ",".join(each)

    def first(self, get):
        return next((v for v in map(get, self.runs) if v is not None), None)

    def branch_means(self) -> dict[str, float]:
        names = dict.fromkeys(b for r in self.counted for b in r.branches)
        return {b: mean([r.branches.get(b) for r in self.counted]) for b in names}

    def as_dict(self) -> dict:
        """The group as plain data (``--format json``; csv flattens it), numbers at full precision."""
        summary = lambda key: self.first(lambda r: (r.summary or {}).get(key))  # noqa: E731
        paired = self.paired_deltas()
        return _finite({
            "dataset": self.dataset, "arch": self.arch, "width_mult": maybe_number(self.width_mult),
            "method": self.method, "settings": self.settings,
            "settings_dict": {k: v for k, v in (*self.common, *self.method_settings) if v is not UNSET},
            "n": len(self.counted), "seeds": [r.seed for r in self.counted], "epochs": self.epochs,
            "unfinished": sum(r.unfinished for r in self.runs),
            "top1_last_mean": mean(self.last), "top1_last_std": std(self.last),
            "top1_best_mean": mean(self.best), "top1_best_std": std(self.best),
            "delta_vs_ce": self.delta_vs_ce,
            "delta_paired_mean": mean(paired), "delta_paired_std": std(paired), "delta_paired_n": len(paired),
            "train_top1_last_mean": mean([r.train_last for r in self.counted]),
            "test_acc_last_mean": self.branch_means(),
            "train_images_per_sec": mean([r.row.images_per_sec for r in self.counted]),
            "params_train": self.first(lambda r: r.row.params_train),
            "params_deploy": self.first(lambda r: r.row.params_deploy),
            "macs_train": summary("macs_train"), "macs_deploy": summary("macs_deploy"),
            "run_dirs": [str(r.path) for r in self.runs],
            "runs": [_run_dict(r) for r in self.runs],
        })


def _run_dict(r: RunInfo) -> dict:
    return {"dir": str(r.path), "seed": r.seed, "epochs_done": r.done, "epochs_total": r.total,
            "finished": not r.unfinished, "top1_last": r.row.top1_last, "top1_best": r.row.top1_best,
            "selected_on": r.row.selected_on, "test_acc_last": r.branches, "train_top1_last": r.train_last,
            "train_images_per_sec": r.row.images_per_sec}


# --- grouping -----------------------------------------------------------------------------------------------

def _identity(r: RunInfo) -> tuple[str, str, str, str]:
    s, c = r.summary or {}, r.config
    width = c.get("model.width_mult")
    return (str(c.get("data.dataset") or s.get("dataset") or "?"), str(c.get("model.arch") or s.get("arch") or "?"),
            format(width, "g") if isinstance(width, (int, float)) else "?", str(c.get("method.name") or r.row.method))


def _differing(configs: list[dict], keys: list[str]) -> list[str]:
    return [k for k in keys if len({render_value(c.get(k, UNSET)) for c in configs}) > 1]


def _buckets(runs: list[RunInfo]) -> list[Group]:
    """The runs split by identity and by every setting that differs between them (method.* settings compared
    among runs of the same method), in the order of first appearance."""
    idents = [_identity(r) for r in runs]
    keys = sorted({k for r in runs for k in r.config if k not in OWN_COLUMNS and not is_operational(k)})
    common_keys = _differing([r.config for r in runs], [k for k in keys if not k.startswith("method.")])
    method_keys = {m: _differing([r.config for r, i in zip(runs, idents) if i[3] == m],
                                 [k for k in keys if k.startswith("method.")]) for m in {i[3] for i in idents}}
    buckets: dict[tuple, Group] = {}
    for r, ident in zip(runs, idents):
        common = tuple((k, r.config.get(k, UNSET)) for k in common_keys)
        own = tuple((k, r.config.get(k, UNSET)) for k in method_keys[ident[3]])
        key = (*ident, tuple((k, render_value(v)) for k, v in common), tuple((k, render_value(v)) for k, v in own))
        buckets.setdefault(key, Group(*ident, common, own, [])).runs.append(r)
    return list(buckets.values())


def _sort_seeds(g: Group, notes: list[str] | None) -> None:
    g.runs.sort(key=lambda r: (not isinstance(r.seed, int), r.seed if isinstance(r.seed, int) else 0,
                               str(r.seed), str(r.path)))
    seeds = [str(r.seed) for r in g.runs]
    if notes is not None and len(set(seeds)) < len(seeds):
        notes.append(f"the runs {', '.join(str(r.path) for r in g.runs)} have the same settings and repeat a "
                     f"seed ({', '.join(seeds)}); each is counted as a seed of its own")


def _comparable(g: Group) -> tuple:
    return g.dataset, g.arch, g.width_mult, tuple((k, render_value(v)) for k, v in g.common)


def _link_ce(groups: list[Group]) -> None:
    """Each non-CE group's ``ce``: the one CE group with its dataset, arch, width and non-method settings."""
    ce: dict[tuple, list[Group]] = {}
    for g in groups:
        if g.method == "ce":
            ce.setdefault(_comparable(g), []).append(g)
    for g in groups:
        matches = ce.get(_comparable(g), [])
        if g.method != "ce" and len(matches) == 1:
            g.ce = matches[0]


def _maybe_width(text: str) -> tuple:
    value = maybe_number(text)
    return (0, value, "") if isinstance(value, float) else (1, 0.0, text)


def group_runs(runs: list[RunInfo], notes: list[str] | None = None) -> list[Group]:
    """Group the runs by dataset, arch, width, method and every other setting that differs between them
    (method.* settings compared among runs of the same method), apart from the seed and operational keys.
    Sorted by dataset, arch, width, settings, then method (ce first); each non-CE group is linked to the CE
    group with the same dataset, arch, width and non-method settings."""
    groups = _buckets(runs)
    for g in groups:
        _sort_seeds(g, notes)
    _link_ce(groups)
    groups.sort(key=lambda g: (g.dataset, g.arch, _maybe_width(g.width_mult),
                               " ".join(f"{k}={render_value(v)}" for k, v in g.common),
                               g.method != "ce", g.method, g.settings))
    return groups
