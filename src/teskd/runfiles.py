"""The one reader of a run folder's files: ``config.yaml``, ``summary.json`` and ``metrics.jsonl``.

Run folders travel (copied from a cluster, unpacked from someone's archive, damaged by a full disk), so
``teskd report``, ``curves``, ``sweep`` and ``train --resume`` read them as untrusted input:

* regular files only, of bounded size (:func:`teskd.fileio.read_text`: a FIFO or ``/dev/zero`` is refused);
* YAML without aliases (teskd never writes one; ``&a [*a, *a]`` nested a few times is an alias bomb) and
  with at most ``config.MAX_NODES`` values;
* JSON without NaN/Infinity, with integers of at most ``MAX_INT_DIGITS`` digits;
* nesting at most ``MAX_DEPTH`` deep, checked before the parser recurses into it;
* the fields teskd reads of the right types (numbers finite, names strings).

Every failure is one :class:`TeskdError` line naming the file; only a torn *last* line of ``metrics.jsonl``
(a kill while it was being appended) is dropped, with a warning.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from teskd import fileio
from teskd.config import _check_size, _short
from teskd.engine.rundir import RunDir
from teskd.errors import TeskdError, one_line
from teskd.log import log

MAX_DEPTH = 32  # nesting of a value in a run file; teskd writes at most 3 levels (config.yaml: 2)
MAX_INT_DIGITS = 20  # 2**64 has 20 digits; epochs, seeds, parameter and MAC counts are far below it
MAX_BRANCHES = 256  # entries of a record's per-branch accuracies (TESKD has 5; each is a curve to draw)
DIGEST_FILE_LIMIT = 1 << 20  # a checkpoint's .sha256 holds one or two lines


class _Refused(ValueError):
    """A run file's content teskd will not use; the message says why, in a few words."""


# --- JSON ------------------------------------------------------------------------------------------------

# a JSON string (possibly unterminated: a torn line) or a bracket; brackets inside strings do not nest
_JSON_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?|[\[\]{}]')


def _check_json_depth(text: str) -> None:
    """Refuse nesting deeper than MAX_DEPTH before ``json`` recurses into it (once per level)."""
    if text.count("[") + text.count("{") <= MAX_DEPTH:  # the usual case: no scan needed
        return
    depth = 0
    for m in _JSON_TOKEN.finditer(text):
        token = m.group()
        if token in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                raise _Refused(f"nested more than {MAX_DEPTH} levels deep")
        elif token in "]}":
            depth = max(depth - 1, 0)


def _refuse_constant(name: str):
    raise _Refused(f"{name} is not a number JSON allows")


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _Refused(f"an integer of {len(text.lstrip('-')):,} digits (at most {MAX_INT_DIGITS})")
    return int(text)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 parses as infinity
        raise _Refused(f"the number {text[:30]} is out of range")
    return value


def parse_json(text: str) -> Any:
    """``text`` as strict, bounded JSON; a ValueError (``_Refused`` or json's own) says what is wrong."""
    _check_json_depth(text)
    return json.loads(text, parse_constant=_refuse_constant, parse_int=_bounded_int, parse_float=_finite_float)


def _reason(exc: Exception) -> str:
    return str(exc) if isinstance(exc, _Refused) else one_line(exc, 160)


# --- field types -----------------------------------------------------------------------------------------

def is_number(value) -> bool:
    """A finite int or float (not a bool)."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and (isinstance(value, int) or math.isfinite(value)))


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_accuracies(value) -> bool:
    """``{branch: top-1}``, as records and summaries hold them."""
    return (isinstance(value, dict) and 0 < len(value) <= MAX_BRANCHES
            and all(isinstance(k, str) and is_number(v) for k, v in value.items()))


_TYPES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "string": (lambda v: isinstance(v, str), "a string"),
    "number": (is_number, "a finite number"),
    "number?": (lambda v: v is None or is_number(v), "a finite number or null"),
    "count": (_is_count, "an integer >= 0"),
    "count?": (lambda v: v is None or _is_count(v), "an integer >= 0 or null"),
    "epoch": (lambda v: _is_count(v) and v >= 1, "an integer >= 1"),
    "accuracies": (_is_accuracies, f"a mapping of branch names to finite numbers (at most {MAX_BRANCHES})"),
}

# what teskd writes into summary.json (engine/summary.py); other keys are kept unchecked (newer versions)
SUMMARY_FIELDS = {
    "method": "string", "arch": "string", "dataset": "string", "selected_on": "string", "device": "string",
    "amp": "string", "eval_precision": "string", "torch": "string",
    "epochs": "epoch", "best_epoch": "epoch", "seed": "count",
    "params_train": "count?", "params_deploy": "count?", "macs_train": "count?", "macs_deploy": "count?",
    "width_mult": "number", "deployed_top1_last": "number", "deployed_top5_last": "number",
    "deployed_top1_best": "number", "deployed_top1_max_test": "number", "deployed_val_top1_best": "number",
    "deployed_branch": "string",
    "train_images_per_sec": "number?", "train_hours": "number?",
    "test_acc_last": "accuracies",
}

# the per-epoch record (engine/trainer.py); loss_* parts are numbers too
RECORD_FIELDS = {
    "epoch": "epoch", "lr": "number", "train_loss": "number", "epoch_seconds": "number",
    "train_images_per_sec": "number", "data_wait_share": "number",
    "train_acc": "accuracies", "test_acc": "accuracies", "test_top5": "accuracies", "val_acc": "accuracies",
}


# --- runs written before "teacher" was renamed to "deployed" ---------------------------------------------
# Until then the deployed network was called "teacher" whatever the method: summary.json's headline keys,
# the branch in metrics.jsonl records, and the exported teacher.safetensors (engine/rundir.py). Readers see
# the new names only: read_summary renames the old keys, and deployed_key finds the branch in a record.

LEGACY_BRANCH = "teacher"
_OLD_SUMMARY_KEYS = {f"teacher_{k}": f"deployed_{k}" for k in
                     ("top1_last", "top5_last", "top1_best", "top1_max_test", "val_top1_best")}
_OLD_SUMMARY_FIELDS = {old: SUMMARY_FIELDS[new] for old, new in _OLD_SUMMARY_KEYS.items()}
_BRANCH_KEYS = ("test_acc", "val_acc", "train_acc", "test_top5")  # a record's per-branch mappings


def deployed_key(record: dict, branch: str | None) -> str:
    """The key of the deployed network in ``record``'s per-branch accuracies. ``branch``: the deployed branch
    as the run names it (:func:`run_deploy_branch`; None when unknown). Records written before the rename
    name it ``teacher`` for every method (KD's old ``teacher`` is the deployed student, its frozen teacher
    was ``kd_teacher``), so a record without ``branch`` is such an old one. A run resumed across the rename
    has both kinds, which is why this is decided record by record."""
    if branch is not None and any(branch in (record.get(key) or {}) for key in _BRANCH_KEYS):
        return branch
    return LEGACY_BRANCH


def deployed_value(record: dict, key: str, branch: str | None):
    """``record[key]`` of the deployed network (:func:`deployed_key`), or None where the record lacks it."""
    values = record.get(key)
    return values.get(deployed_key(record, branch)) if isinstance(values, dict) else None


def with_deployed_branch(record: dict, branch: str | None) -> dict:
    """``record`` with the deployed network's entries under the name ``branch``: an old record's ``teacher``
    renamed, so the records of a run resumed across the rename draw one curve. Unchanged when ``branch`` is
    None or already the record's name."""
    old = deployed_key(record, branch)
    if branch is None or old == branch:
        return record
    return {key: ({branch if b == old else b: v for b, v in value.items()}
                  if key in _BRANCH_KEYS and isinstance(value, dict) else value) for key, value in record.items()}


def method_deploy_branch(method) -> str | None:
    """The ``deploy_branch`` of a registered method's class; None for a name not registered here (a plug-in
    that is not loaded) or not a name at all."""
    if not isinstance(method, str):
        return None
    from teskd.registry import METHODS  # the registry imports methods only when asked for one

    try:
        branch = getattr(METHODS.get(method), "deploy_branch", None)
    except Exception:  # noqa: BLE001  (an unknown name, or a plug-in that fails to import)
        return None
    return branch if isinstance(branch, str) else None


def run_deploy_branch(summary: dict | None, method) -> str | None:
    """The deployed branch of a run: summary.json's ``deployed_branch`` (written since the rename), else the
    class attribute of its ``method`` (a method name) where registered. Pass it to :func:`deployed_key`,
    which falls back to ``teacher`` for records of old runs."""
    recorded = (summary or {}).get("deployed_branch")
    return recorded if isinstance(recorded, str) else method_deploy_branch(method)


def _field_problem(data: dict, fields: dict[str, str], required=(), numbers_prefix: str | None = None) -> str | None:
    """What is wrong with the known fields of ``data`` (and keys starting with ``numbers_prefix``: numbers)."""
    missing = [k for k in required if k not in data]
    if missing:
        return f"{', '.join(missing)} missing"
    for key, value in data.items():
        kind = fields.get(key)
        if kind is None and numbers_prefix and isinstance(key, str) and key.startswith(numbers_prefix):
            kind = "number"
        if kind is not None and not _TYPES[kind][0](value):
            return f"{key} should be {_TYPES[kind][1]}, got {_short(value)}"
    return None


def record_problem(record) -> str | None:
    """Why ``record`` is not an epoch record of metrics.jsonl, or None."""
    if not isinstance(record, dict):
        return "not a JSON object"
    return _field_problem(record, RECORD_FIELDS, ("epoch",), numbers_prefix="loss_")


# --- the three files -------------------------------------------------------------------------------------

def _run(run) -> RunDir:
    return run if isinstance(run, RunDir) else RunDir(run)


def read_summary(run, required=("epochs",)) -> dict:
    """``summary.json`` of ``run`` (a RunDir or folder) as a dict whose known fields have their types and
    ``required`` keys are present; anything else is one TeskdError line naming the file."""
    path = _run(run).summary
    text = fileio.read_text(path, "run summary")
    try:
        data = parse_json(text)
    except _Refused as exc:
        raise TeskdError(f"{path} is refused: {exc}") from exc
    except ValueError as exc:
        raise TeskdError(f"{path} is empty or not valid JSON ({one_line(exc, 160)})") from exc
    if not isinstance(data, dict):
        raise TeskdError(f"{path} is not a JSON object (got {_short(data)})")
    # types first, under the file's own key names (an old summary's teacher_*), then what is required, under
    # today's names
    problem = _field_problem(data, {**SUMMARY_FIELDS, **_OLD_SUMMARY_FIELDS})
    data = _renamed_summary_keys(data)
    problem = problem or _field_problem(data, SUMMARY_FIELDS, required)
    if problem:
        raise TeskdError(f"{path} is not a teskd summary: {problem}")
    return data


def _renamed_summary_keys(data: dict) -> dict:
    """An old summary's ``teacher_*`` keys under their ``deployed_*`` names (a new key, if present, wins)."""
    data = dict(data)
    for old, new in _OLD_SUMMARY_KEYS.items():
        if old in data:
            value = data.pop(old)
            data.setdefault(new, value)
    return data


class _RunConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing aliases and, while composing (which recurses once per level), nesting
    deeper than MAX_DEPTH."""

    _depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise _Refused(f"line {mark.line + 1}: a YAML alias (*name); teskd writes none, and aliases nested "
                           f"in each other expand to billions of values")
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise _Refused(f"line {mark.line + 1}: nested more than {MAX_DEPTH} levels deep")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _number_problem(data) -> str | None:
    """The first integer too long or float not finite in a (small, already size-checked) YAML document."""
    stack = [data]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            stack += [*node.keys(), *node.values()]
        elif isinstance(node, list):
            stack += node
        elif isinstance(node, int) and not isinstance(node, bool) and abs(node) >= 10 ** MAX_INT_DIGITS:
            return f"an integer of more than {MAX_INT_DIGITS} digits"
        elif isinstance(node, float) and not math.isfinite(node):
            return f"{node} (no setting is meaningful at nan or inf)"
    return None


def read_config_yaml(run) -> dict:
    """``config.yaml`` of ``run`` (a RunDir or folder): a mapping, bounded as the module docstring says."""
    path = _run(run).config
    text = fileio.read_text(path, "run config")
    try:
        data = yaml.load(text, Loader=_RunConfigLoader)  # noqa: S506  (a SafeLoader subclass)
    except _Refused as exc:
        raise TeskdError(f"{path} is refused: {exc}") from exc
    except (yaml.YAMLError, ValueError, RecursionError) as exc:  # ValueError: values YAML cannot build
        detail = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise TeskdError(f"{path} is not valid YAML: {detail[:200]}") from exc
    if not isinstance(data, dict):
        raise TeskdError(f"{path} is not a mapping of settings (got {_short(data)})")
    _check_size(data, str(path))
    problem = _number_problem(data)
    if problem:
        raise TeskdError(f"{path} is refused: it holds {problem}")
    return data


def _warn_torn(path: Path, number: int) -> None:
    log.warning(f"warning: ignoring the incomplete last line ({number}) of {path}")


def read_metrics(path: str | os.PathLike, check: Callable[[dict], bool] | None = None,
                 on_torn: Callable[[int], None] | None = None) -> list[dict]:
    """The epoch records of a ``metrics.jsonl`` ([] when it does not exist). ``check``: a stricter test of
    each record; ``on_torn(line)``: told about a bad last line, which is dropped (default: a logged warning).
    Any other bad line, or a file that is not a readable regular file, is a TeskdError."""
    path = Path(path)
    if not os.path.lexists(path):
        return []
    data = fileio.read_regular(path, "metrics log", fileio.RUN_FILE_LIMIT)
    numbered = [(i, line) for i, line in enumerate(data.split(b"\n"), 1) if line.strip()]
    records = []
    for number, raw in numbered:
        try:
            record = parse_json(raw.decode("utf-8"))
            problem = record_problem(record)
            if problem is None and check is not None and not check(record):
                problem = "not a complete epoch record"
            if problem:
                raise _Refused(problem)
        except ValueError as exc:  # UnicodeDecodeError is one too
            if number == numbered[-1][0]:  # torn by a kill while it was being written: that epoch is redone
                (on_torn or (lambda n: _warn_torn(path, n)))(number)
                break
            raise TeskdError(f"{path} line {number} is not an epoch record ({_reason(exc)}); "
                             f"the file is damaged or was edited") from exc
        records.append(record)
    return records


def read_digest_text(path: Path) -> str:
    """A checkpoint's digest file (small, regular), as text."""
    return fileio.read_text(path, "checksum file", DIGEST_FILE_LIMIT)
