"""The run table ``fit`` reads: one row per checkpoint with N, D, C, L (and a group).

Sources: a CSV file, or a zoo directory in which every checkpoint is a directory holding
``metadata.json`` (see :func:`read_zoo_metadata`, the one place that knows that layout).
"""

from __future__ import annotations

import csv
import json
import math
import operator
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fit.sumlaw import FitError
from zoo.hub.metadata import METADATA, table_row

_OPS = {
    "==": operator.eq,
    "!=": operator.ne,
    "<=": operator.le,
    ">=": operator.ge,
    "<": operator.lt,
    ">": operator.gt,
}
_WHERE = re.compile(r"^\s*(?P<col>.+?)\s*(?P<op>==|!=|<=|>=|<|>)\s*(?P<val>.*?)\s*$")


def read_zoo_metadata(path: Path) -> dict:
    """Flatten one checkpoint's ``metadata.json`` into a table row.

    The schema is :mod:`zoo.hub.metadata` (torch-free): ``architecture``, ``width``, ``N``
    (trainable parameters), ``atoms_seen`` (D, atoms), ``flops`` (C, training FLOPs) and
    ``validation`` (a dict of metrics with at least ``loss``). Every top-level scalar is kept;
    ``validation.X`` becomes column ``validation.X``; aliases ``D``, ``C`` and ``loss`` point to
    ``atoms_seen``, ``flops`` and ``validation.loss`` so the default column names work
    (:func:`zoo.hub.metadata.table_row`).

    Parameters
    ----------
    path : Path
        The ``metadata.json`` file.

    Returns
    -------
    dict[str, object]

    Raises
    ------
    FitError
        If the file is not valid JSON or not a JSON object.
    """
    try:
        meta = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise FitError(f"{path}: cannot read checkpoint metadata: {err}") from err
    if not isinstance(meta, dict):
        raise FitError(f"{path}: checkpoint metadata must be a JSON object")
    return {"checkpoint": str(Path(path).parent), **table_row(meta)}


def read_rows(source: str | Path) -> tuple[list[dict], bool]:
    """Rows of a CSV file or of a zoo directory.

    Returns
    -------
    rows : list[dict]
    is_zoo : bool
        True when ``source`` is a directory.

    Raises
    ------
    FitError
        Missing source, a directory without any ``metadata.json``, an empty CSV.
    """
    src = Path(source)
    if src.is_dir():
        files = sorted(src.rglob(METADATA))
        if not files:
            raise FitError(f"{src}: no checkpoint metadata.json found under this directory")
        return [read_zoo_metadata(f) for f in files], True
    if not src.is_file():
        raise FitError(f"{src}: no such file or directory")
    with src.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise FitError(f"{src}: CSV has no data rows")
    return rows, False


def _coerce(value):
    if isinstance(value, (bool, int, float)):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def parse_where(expr: str):
    """Parse ``"COL OP VALUE"`` (OP one of == != < <= > >=) into a row predicate.

    Values compare as numbers when both sides parse as numbers, otherwise as strings
    (``metric_valid == True`` matches the CSV text ``True`` and the JSON boolean true).

    Raises
    ------
    FitError
        If ``expr`` is not of that form.
    """
    m = _WHERE.match(expr)
    if not m:
        raise FitError(f"--where {expr!r}: expected 'COLUMN OP VALUE' with OP one of == != < <= > >=")
    col, op, val = m["col"], _OPS[m["op"]], m["val"]
    rhs = _coerce(val)

    def pred(row: dict) -> bool:
        if col not in row:
            raise FitError(f"--where {expr!r}: no column {col!r}; columns are {sorted(row)}")
        lhs = row[col]
        if isinstance(lhs, bool) or isinstance(rhs, str) or isinstance(_coerce(lhs), str):
            return bool(op(str(lhs), str(val)))
        return bool(op(float(_coerce(lhs)), float(rhs)))

    return pred


@dataclass
class RunTable:
    """Arrays of a selected run table, per row.

    Attributes
    ----------
    N, D, C, L : ndarray, shape [n]
        Parameters, data seen (tokens or atoms), training FLOPs, loss. NaN where absent.
    group : ndarray of str, shape [n]
        Group label (``"all"`` without a group column).
    k : ndarray, shape [n]
        FLOPs per parameter per data item, C/(N·D) (or the user's ``--flops-per-param-token``).
    notes : list[str]
        What was derived or assumed (reported in report.md).
    warnings : list[str]
        What the data cannot support or what was fitted against the user's likely intent
        (reported in bold in report.md, on the terminal and in fit.json).
    """

    N: np.ndarray
    D: np.ndarray
    C: np.ndarray
    L: np.ndarray
    group: np.ndarray
    k: np.ndarray
    notes: list
    warnings: list = None

    def __post_init__(self):
        if self.warnings is None:
            self.warnings = []

    def groups(self) -> list[str]:
        return list(dict.fromkeys(self.group.tolist()))

    def subset(self, name: str) -> "RunTable":
        m = self.group == name
        return RunTable(self.N[m], self.D[m], self.C[m], self.L[m], self.group[m], self.k[m], self.notes,
                        self.warnings)


#: columns that name the data a row was trained and validated on (zoo metadata; a CSV may have them)
DATA_COLUMNS = ("data_hash", "val_data_hash", "config.val_data_hash", "validation.structures")
#: what to do with rows of different data: refuse, fit each data set apart, or fit them together
DATA_MODES = ("refuse", "split", "mix")


def data_identity(row: dict) -> str:
    """A short label of the training data, validation set and validation subset size of a row."""
    train = str(row.get("data_hash") or "?")[:8]
    val = str(row.get("val_data_hash") or row.get("config.val_data_hash") or "?")[:8]
    size = row.get("validation.structures")
    return f"train {train}, val {val}" + (f" ({int(float(size))} structures)" if size not in (None, "") else "")


def _check_data(rows: list[dict], mode: str) -> tuple[list[str] | None, list[str]]:
    """(per-row data label to split groups by, or None; warnings) for rows of possibly different data.

    Raises
    ------
    FitError
        when rows differ in data and ``mode`` is ``"refuse"``.
    """
    if mode not in DATA_MODES:
        raise FitError(f"data mode must be one of {DATA_MODES}, got {mode!r}")
    if not any(col in rows[0] for col in DATA_COLUMNS):
        return None, []
    labels = [data_identity(r) for r in rows]
    counts = {label: labels.count(label) for label in dict.fromkeys(labels)}
    if len(counts) < 2:
        return None, []
    listing = "; ".join(f"{label}: {n} rows" for label, n in counts.items())
    if mode == "refuse":
        raise FitError(f"the rows come from {len(counts)} different data sets or validation sets ({listing}); "
                       "losses on different data are not comparable. Fit them apart (--split-by-data), "
                       "select one (--where 'data_hash == ...'), or fit them together anyway (--mix-data)")
    if mode == "split":
        return labels, [f"rows of {len(counts)} data sets fitted apart ({listing})"]
    return None, [f"rows of {len(counts)} different data sets or validation sets fitted TOGETHER as asked "
                  f"(--mix-data): {listing}"]


def _column(rows, name, what, required):
    if name is None:
        return None
    if name not in rows[0]:
        if not required:
            return None
        raise FitError(f"{what} column {name!r} not found; columns are {sorted(rows[0])}")
    out = np.empty(len(rows))
    for i, row in enumerate(rows):
        v = row.get(name)
        try:
            out[i] = float(v) if v not in (None, "") else math.nan
        except (TypeError, ValueError) as err:
            raise FitError(f"{what} column {name!r}, row {i + 1}: not a number: {v!r}") from err
    return out


def load_table(
    source,
    *,
    n_col="N",
    d_col="D",
    c_col="C",
    loss_col="loss",
    group_col=None,
    where=(),
    flops_per_param_token=None,
    data_mode="refuse",
) -> RunTable:
    """Read, select and complete a run table.

    D is derived as C/(K·N) when absent and C as K·N·D when absent (K =
    ``flops_per_param_token``; required in that case). Rows with a non-positive or missing N,
    C, D or L are an error naming the row. Rows whose training data, validation set or validation
    subset differ (:data:`DATA_COLUMNS`) are refused (``data_mode="refuse"``), grouped apart
    (``"split"``: the group label gains the data's label) or fitted together with a warning
    (``"mix"``).

    Raises
    ------
    FitError
        Missing columns, bad ``--where``, no rows left, non-positive values, K missing, rows of
        different data under ``data_mode="refuse"``.
    """
    rows, is_zoo = read_rows(source)
    if group_col is None and is_zoo:
        group_col = "architecture"
    for expr in where:
        pred = parse_where(expr)
        rows = [r for r in rows if pred(r)]
    if not rows:
        raise FitError(f"{source}: no rows left after --where {list(where)}")
    notes = [f"{len(rows)} rows from {source}" + (f" with {list(where)}" if where else "")]
    n = _column(rows, n_col, "N (--n-col)", True)
    lo = _column(rows, loss_col, "loss (--loss-col)", True)
    d = _column(rows, d_col, "D (--d-col)", False)
    c = _column(rows, c_col, "C (--c-col)", False)
    kk = flops_per_param_token
    if d is None and c is None:
        raise FitError(f"neither D column {d_col!r} nor C column {c_col!r} found; columns are {sorted(rows[0])}")
    if d is None or c is None:
        if kk is None:
            missing = "D" if d is None else "C"
            raise FitError(f"{missing} column missing: give --flops-per-param-token K to derive it (C = K·N·D)")
        if d is None:
            d = c / (kk * n)
            notes.append(f"D derived as C/({kk:g}·N)")
        else:
            c = kk * n * d
            notes.append(f"C derived as {kk:g}·N·D")
    for name, arr in (("N", n), ("D", d), ("C", c), ("loss", lo)):
        bad = ~np.isfinite(arr) | (arr <= 0)
        if np.any(bad):
            i = int(np.flatnonzero(bad)[0])
            raise FitError(
                f"{name}: {int(bad.sum())} row(s) with a missing or non-positive value, first row {i + 1} "
                f"({rows[i].get('checkpoint', '')}) value {arr[i]!r}; filter them with --where"
            )
    if group_col is not None:
        if group_col not in rows[0]:
            raise FitError(f"group column {group_col!r} not found; columns are {sorted(rows[0])}")
        labels = [str(r[group_col]) for r in rows]
    else:
        labels = ["all"] * len(rows)
    data_labels, warnings = _check_data(rows, data_mode)
    if data_labels is not None:
        labels = [f"{g} [{d}]" for g, d in zip(labels, data_labels)]
    k = np.full(len(rows), float(kk)) if kk is not None else c / (n * d)
    return RunTable(n, d, c, lo, np.array(labels), k, notes, warnings)
