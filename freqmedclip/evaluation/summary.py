"""Aggregate per-case metrics into per-(method, dataset, structure) summaries and paper-style tables.

Input rows are plain dicts, one per evaluated case (a 2D slice or crop, one structure, one method):
``{"method", "dataset", "structure", "subject_id", <metric columns>, "gt_empty", "pred_empty"}``,
typically ``{**metrics.case_metrics(pred, gt, spacing), "method": ..., ...}``.

Notable choices (DATA.md §4.3, item 3 "Aggregation"):

* Per group and metric: mean, SD (``ddof=1``; 0.0 for a single case, so no NaN), median, quartiles
  q1/q3, and a 95 % bootstrap CI of the mean.
* The bootstrap resamples SUBJECTS, not cases: slices of one patient are correlated, so a
  case-level bootstrap would overstate precision. Each replicate draws the group's subjects with
  replacement and averages all cases of the drawn subjects (a subject drawn twice counts twice).
  The statistic is therefore the same case-weighted mean as the point estimate, and duplicating
  every case of a subject leaves the CI unchanged. Percentile interval, ``N_BOOT`` = 2000
  replicates, seeded; each group uses a fresh generator from ``seed``, so a group's CI does not
  depend on which other groups are present. Rows of several training seeds can be pooled: a
  subject's cases from all seeds are then resampled together.
* Empty-mask cases are kept (metrics.py assigns them perfect or worst-case values) and counted:
  ``n_gt_empty``, ``n_pred_empty``, ``n_both_empty`` and ``n_one_empty`` (the cases that received
  worst-case distances).

Table writers return GitHub markdown shaped like the paper's Tables 3-6. "Average" columns are
the unweighted mean over datasets of the per-dataset means (as the paper's Table 3 Average); they
carry no CI, and read "n/a" when a method lacks one of the datasets. Formatting: Dice, IoU and NSD
with 3 decimals, distances in mm with 2, time in ms with 1, memory in GiB with 2; a CI is shown as
``[lo, hi]``. Each table needs exactly one structure per (method, dataset): filter the summary
first (e.g. BraTS whole tumour), so that an average never silently weights one dataset by its
number of structures.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from freqmedclip.evaluation.metrics import DEFAULT_TOLERANCE_MM, HIGHER_IS_BETTER, METRIC_NAMES

GROUP_KEYS = ("method", "dataset", "structure")
N_BOOT = 2000
CONFIDENCE = 0.95
STATS = ("mean", "sd", "median", "q1", "q3", "ci_lo", "ci_hi")
DECIMALS = {"dice": 3, "iou": 3, "nsd": 3, "hausdorff": 2, "hd95": 2, "assd": 2}
LABELS = {"dice": "Dice", "iou": "IoU", "nsd": "NSD", "hausdorff": "HD (mm)", "hd95": "HD95 (mm)", "assd": "ASSD (mm)"}
MISSING = "n/a"


# ---------------------------------------------------------------------------------------------
# Bootstrap and summaries
# ---------------------------------------------------------------------------------------------

def _subject_totals(values: np.ndarray, subjects: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    """Per-subject sums (S, M) of ``values`` (N, M) and case counts (S,), subjects in first-seen order."""
    index: dict[Any, int] = {}
    codes = np.array([index.setdefault(s, len(index)) for s in subjects], dtype=np.intp)
    sums = np.zeros((len(index), values.shape[1]))
    np.add.at(sums, codes, values)
    return sums, np.bincount(codes, minlength=len(index)).astype(float)


def _bootstrap_ci(
    values: np.ndarray, subjects: Sequence[Any], n_boot: int, seed: int, confidence: float
) -> tuple[np.ndarray, np.ndarray]:
    """Subject-level percentile bootstrap CI of the case mean, for each column of ``values`` (N, M).

    Returns (lo, hi), each of shape (M,).
    """
    if len(values) == 0 or len(values) != len(subjects):
        raise ValueError(f"need one subject per case and at least one case, got {len(values)} / {len(subjects)}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    sums, counts = _subject_totals(values, subjects)
    n_subjects = len(counts)
    rng = np.random.default_rng(seed)
    drawn = rng.integers(0, n_subjects, size=(n_boot, n_subjects))      # (B, S) subject indices
    # weights[b, s] = how often subject s was drawn in replicate b, via one flat bincount.
    offsets = drawn + n_subjects * np.arange(n_boot)[:, None]
    weights = np.bincount(offsets.ravel(), minlength=n_boot * n_subjects).reshape(n_boot, n_subjects)
    boot_means = (weights @ sums) / (weights @ counts)[:, None]         # (B, M)
    alpha = 100 * (1 - confidence) / 2
    lo, hi = np.percentile(boot_means, [alpha, 100 - alpha], axis=0)
    return lo, hi


def subject_bootstrap_ci(
    values: Sequence[float],
    subjects: Sequence[Any],
    n_boot: int = N_BOOT,
    seed: int = 0,
    confidence: float = CONFIDENCE,
) -> tuple[float, float]:
    """Subject-level bootstrap CI of the mean of per-case ``values`` (N,), ``subjects`` (N,) ids."""
    lo, hi = _bootstrap_ci(np.asarray(values, dtype=float)[:, None], subjects, n_boot, seed, confidence)
    return float(lo[0]), float(hi[0])


def _check_row(i: int, row: Mapping[str, Any], metrics: Sequence[str]) -> None:
    missing = [k for k in (*GROUP_KEYS, "subject_id", *metrics, "gt_empty", "pred_empty") if k not in row]
    if missing:
        raise KeyError(f"row {i} lacks {missing}; every case row needs group keys, subject_id, metrics and flags")
    bad = [m for m in metrics if not math.isfinite(float(row[m]))]
    if bad:
        # A NaN/inf would otherwise be dropped or poison a mean; metrics.py never produces one.
        raise ValueError(f"row {i} has non-finite {bad}: {[row[m] for m in bad]}")


def summarize(
    rows: Iterable[Mapping[str, Any]],
    metrics: Sequence[str] = METRIC_NAMES,
    n_boot: int = N_BOOT,
    seed: int = 0,
    confidence: float = CONFIDENCE,
) -> list[dict[str, Any]]:
    """Summarise per-case rows per (method, dataset, structure), groups in first-seen order.

    Returns:
        One flat dict per group: the group keys, ``n_cases``, ``n_subjects``, ``n_gt_empty``,
        ``n_pred_empty``, ``n_both_empty``, ``n_one_empty`` and, for each metric ``m``,
        ``m_mean``, ``m_sd``, ``m_median``, ``m_q1``, ``m_q3``, ``m_ci_lo``, ``m_ci_hi``.
    """
    groups: dict[tuple[Any, ...], list[Mapping[str, Any]]] = {}
    for i, row in enumerate(rows):
        _check_row(i, row, metrics)
        groups.setdefault(tuple(row[k] for k in GROUP_KEYS), []).append(row)

    summary = []
    for key, cases in groups.items():
        values = np.array([[float(c[m]) for m in metrics] for c in cases])        # (N, M)
        subjects = [c["subject_id"] for c in cases]
        gt_empty = np.array([bool(c["gt_empty"]) for c in cases])
        pred_empty = np.array([bool(c["pred_empty"]) for c in cases])
        lo, hi = _bootstrap_ci(values, subjects, n_boot, seed, confidence)
        q1, median, q3 = np.percentile(values, [25, 50, 75], axis=0)
        sd = values.std(axis=0, ddof=1) if len(cases) > 1 else np.zeros(len(metrics))
        out: dict[str, Any] = dict(zip(GROUP_KEYS, key))
        out.update(
            n_cases=len(cases),
            n_subjects=len(set(subjects)),
            n_gt_empty=int(gt_empty.sum()),
            n_pred_empty=int(pred_empty.sum()),
            n_both_empty=int((gt_empty & pred_empty).sum()),
            n_one_empty=int((gt_empty ^ pred_empty).sum()),
        )
        stats = {"mean": values.mean(axis=0), "sd": sd, "median": median, "q1": q1, "q3": q3,
                 "ci_lo": lo, "ci_hi": hi}
        for j, m in enumerate(metrics):
            out.update({f"{m}_{s}": float(stats[s][j]) for s in STATS})
        summary.append(out)
    return summary


# ---------------------------------------------------------------------------------------------
# Markdown tables (paper Tables 3-6)
# ---------------------------------------------------------------------------------------------

def _index(summary: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[str], dict[tuple[str, str], Mapping]]:
    """Methods and datasets in first-seen order, and the summary row of each (method, dataset)."""
    methods: list[str] = []
    datasets: list[str] = []
    cells: dict[tuple[str, str], Mapping[str, Any]] = {}
    for row in summary:
        key = (row["method"], row["dataset"])
        if key in cells:
            raise ValueError(f"several summary rows for method {key[0]!r}, dataset {key[1]!r} (structures "
                             f"{cells[key].get('structure')!r}, {row.get('structure')!r}); keep one structure")
        cells[key] = row
        if key[0] not in methods:
            methods.append(key[0])
        if key[1] not in datasets:
            datasets.append(key[1])
    return methods, datasets, cells


def _dataset_mean(cells: Mapping, method: str, datasets: Sequence[str], metric: str) -> float | None:
    """Unweighted mean over ``datasets`` of ``metric``'s per-dataset mean; None if one is missing."""
    if not datasets or any((method, d) not in cells for d in datasets):
        return None
    return float(np.mean([cells[(method, d)][f"{metric}_mean"] for d in datasets]))


def _fmt(value: float | None, decimals: int) -> str:
    return MISSING if value is None else f"{value:.{decimals}f}"


def _with_ci(row: Mapping[str, Any] | None, metric: str, show_ci: bool) -> str:
    if row is None:
        return MISSING
    d = DECIMALS[metric]
    text = _fmt(row[f"{metric}_mean"], d)
    return f"{text} [{_fmt(row[f'{metric}_ci_lo'], d)}, {_fmt(row[f'{metric}_ci_hi'], d)}]" if show_ci else text


def _bold_best(cells: list[str], values: list[float | None], metric: str) -> list[str]:
    """Bold the mean of the best method(s) in one column, compared at the printed precision."""
    shown = [None if v is None else round(v, DECIMALS[metric]) for v in values]
    present = [v for v in shown if v is not None]
    if len(present) < 2:
        return cells
    best = max(present) if HIGHER_IS_BETTER[metric] else min(present)
    out = []
    for cell, v in zip(cells, shown):
        if v == best:
            mean, _, rest = cell.partition(" ")   # bold only the number, not the CI
            cell = f"**{mean}**" + (f" {rest}" if rest else "")
        out.append(cell)
    return out


def _markdown(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    """Markdown table; first column left-aligned (labels), the others right-aligned (numbers)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([" --- "] + [" ---: "] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines) + "\n"


def _columns_to_rows(columns: list[list[str]]) -> list[list[str]]:
    return [list(r) for r in zip(*columns)]


def overlap_table(
    summary: Sequence[Mapping[str, Any]],
    methods: Sequence[str] | None = None,
    datasets: Sequence[str] | None = None,
    show_ci: bool = True,
    bold_best: bool = True,
) -> str:
    """Paper Table 3: Dice / IoU per dataset and method, plus their Average over datasets.

    Args:
        summary: rows from ``summarize``, one structure per (method, dataset).
        methods, datasets: row and column order (default: first seen in ``summary``).
        show_ci: append the bootstrap ``[lo, hi]`` to per-dataset cells.
        bold_best: bold the best mean per column (the paper's "Bold: best per column").
    """
    all_methods, all_datasets, cells = _index(summary)
    methods, datasets = list(methods or all_methods), list(datasets or all_datasets)
    header = ["Method"]
    columns: list[list[str]] = [list(methods)]
    for d in datasets:
        for m in ("dice", "iou"):
            header.append(f"{d} {LABELS[m]}")
            col = [_with_ci(cells.get((meth, d)), m, show_ci) for meth in methods]
            vals = [cells[(meth, d)][f"{m}_mean"] if (meth, d) in cells else None for meth in methods]
            columns.append(_bold_best(col, vals, m) if bold_best else col)
    for m in ("dice", "iou"):
        header.append(f"Average {LABELS[m]}")
        vals = [_dataset_mean(cells, meth, datasets, m) for meth in methods]
        col = [_fmt(v, DECIMALS[m]) for v in vals]
        columns.append(_bold_best(col, vals, m) if bold_best else col)
    return _markdown(header, _columns_to_rows(columns))


def ablation_table(
    summary: Sequence[Mapping[str, Any]],
    full: str,
    variants: Sequence[str] | None = None,
    metric: str = "dice",
) -> str:
    """Paper Table 4: average ``metric`` over datasets per variant, and Δ = variant − full model.

    Args:
        summary: rows from ``summarize`` whose ``method`` is the variant name (e.g. "w/o FFBI").
        full: method name of the full model; shown first, with Δ "—".
        variants: column order (default: first seen); ``full`` is put first if absent.
        metric: which metric to average (paper: Dice).

    Δ is computed from the unrounded averages. Every variant must cover the full model's datasets,
    otherwise the averages would not be comparable (ValueError).
    """
    all_methods, _, cells = _index(summary)
    if full not in all_methods:
        raise ValueError(f"full model {full!r} not in summary methods {all_methods}")
    datasets = [d for (meth, d) in cells if meth == full]
    order = [full] + [v for v in (variants or all_methods) if v != full]
    averages = []
    for v in order:
        avg = _dataset_mean(cells, v, datasets, metric)
        if avg is None:
            raise ValueError(f"variant {v!r} lacks some of the full model's datasets {datasets}")
        averages.append(avg)
    d = DECIMALS[metric]
    deltas = ["—"] + [f"{a - averages[0]:+.{d}f}" for a in averages[1:]]
    return _markdown(["", *order], [[f"Avg {LABELS[metric]}", *(_fmt(a, d) for a in averages)], ["Δ", *deltas]])


def boundary_table(
    summary: Sequence[Mapping[str, Any]],
    tolerance_mm: float = DEFAULT_TOLERANCE_MM,
    methods: Sequence[str] | None = None,
    with_hd95: bool = False,
    bold_best: bool = True,
) -> str:
    """Paper Table 5: average HD (mm) and Boundary Dice (= NSD at ``tolerance_mm``) per method.

    Args:
        summary: rows from ``summarize``, one structure per (method, dataset).
        tolerance_mm: the τ the NSD column was computed with (printed in its header).
        methods: row order (default: first seen).
        with_hd95: add an "Avg HD95 (mm)" column (outlier-robust; DATA.md §4.4).
        bold_best: bold the lowest HD / highest NSD.

    The last column counts the cases that received the worst-case distance because exactly one
    mask was empty, over all datasets, as "k/n".
    """
    all_methods, datasets, cells = _index(summary)
    methods = list(methods or all_methods)
    metrics = ["hausdorff", *(["hd95"] if with_hd95 else []), "nsd"]
    header = ["Method", "Avg HD (mm)", *(["Avg HD95 (mm)"] if with_hd95 else []),
              f"Boundary Dice (NSD @ {tolerance_mm:g} mm)", "Worst-case cases"]
    columns: list[list[str]] = [list(methods)]
    for m in metrics:
        vals = [_dataset_mean(cells, meth, datasets, m) for meth in methods]
        col = [_fmt(v, DECIMALS[m]) for v in vals]
        columns.append(_bold_best(col, vals, m) if bold_best else col)
    worst = []
    for meth in methods:
        rows = [cells[(meth, d)] for d in datasets if (meth, d) in cells]
        worst.append(f"{sum(r['n_one_empty'] for r in rows)}/{sum(r['n_cases'] for r in rows)}")
    columns.append(worst)
    return _markdown(header, _columns_to_rows(columns))


def efficiency_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Paper Table 6: inference time and peak memory per method.

    Args:
        rows: dicts with ``method``, ``time_ms`` (per image) and ``peak_memory_mb`` in MiB, as
            ``freqmedclip.inference.benchmark.run`` reports it (``torch.cuda.max_memory_allocated() / 2**20``);
            optionally ``time_ms_sd``, printed as "mean ± sd". Memory is printed in GiB, as the
            paper's GB column.
    """
    body = []
    for i, r in enumerate(rows):
        missing = [k for k in ("method", "time_ms", "peak_memory_mb") if k not in r]
        if missing:
            raise KeyError(f"efficiency row {i} lacks {missing}")
        time = f"{r['time_ms']:.1f}" + (f" ± {r['time_ms_sd']:.1f}" if "time_ms_sd" in r else "")
        body.append([str(r["method"]), time, f"{r['peak_memory_mb'] / 1024:.2f}"])
    return _markdown(["Method", "Inference time (ms)", "Peak memory (GiB)"], body)
