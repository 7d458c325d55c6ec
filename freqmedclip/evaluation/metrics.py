"""Per-case segmentation metrics on 2D binary masks, distances in millimetres (paper §4 "Evaluation Metrics").

Every function takes ``pred`` and ``gt`` as numpy ``bool`` arrays of shape (H, W); the distance
metrics also take the pixel spacing ``(row_mm, col_mm)`` of *that* array (after any resize:
original spacing × original size / new size per axis, DATA.md §0.4). Spacing is never defaulted,
so a distance can never silently come out in pixels.

Definitions (A = prediction, B = reference, ∂X = boundary of X; DATA.md §4.1):

* Dice = 2|A∩B| / (|A|+|B|).  IoU = |A∩B| / |A∪B|.
* Boundary ∂X = X minus its erosion by the 4-connected cross (``scipy.ndimage.binary_erosion``
  with its default structure and ``border_value=0``): the inner 1-pixel contour, pixel centres.
  Mask pixels on the image edge count as boundary. This is the edge definition of medpy 0.5.2,
  MONAI ``get_mask_edges`` (``use_subvoxels=False``) and MetricsReloaded, so HD, HD95, ASSD and
  NSD match those libraries (DATA.md §4.2-4.3). DeepMind ``surface-distance`` uses voxel-corner
  surfels instead and gives different numbers (e.g. HD 2.0 vs our 1.0 mm in the shifted-square
  fixture of DATA.md §4.3).
* Directed distances d(∂A→∂B) = {min_b ‖a−b‖ : a ∈ ∂A}, Euclidean in mm, computed as
  ``distance_transform_edt(~∂B, sampling=spacing)[∂A]``.
* HD (Hausdorff, paper eq. 21) = max(max d(∂A→∂B), max d(∂B→∂A)).
* HD95 = max(P95 d(∂A→∂B), P95 d(∂B→∂A)): the MAXIMUM OF THE TWO DIRECTED 95th percentiles
  (``np.percentile``, linear interpolation), as MONAI and MetricsReloaded. It is *not* medpy's /
  seg-metrics' 95th percentile of the pooled distances, which hides a one-sided error (4.0 vs
  23.8 mm on the DATA.md §4.2 pair).
* ASSD = (Σ d(∂A→∂B) + Σ d(∂B→∂A)) / (|∂A|+|∂B|): pooled, as medpy 0.5.2 and MONAI
  ``symmetric=True`` (not the mean of the two directed means, which is MASD).
* NSD@τ (normalised surface Dice, Nikolov et al. 2021) =
  (|{a∈∂A: d(a,∂B) ≤ τ}| + |{b∈∂B: d(b,∂A) ≤ τ}|) / (|∂A|+|∂B|), counting boundary pixels
  (MONAI default, MetricsReloaded). This is what we report as the paper's "Boundary Dice"
  (DATA.md §4.1 option (a)). Default τ = ``DEFAULT_TOLERANCE_MM`` = 2.0 mm, i.e. about two pixels
  at the ~1 mm/pixel spacing of a 224² slice, the 2-pixel tolerance peers use (PEERS.md).

Empty masks (DATA.md §4.3), applied identically by every function:

* both empty: Dice = IoU = NSD = 1, HD = HD95 = ASSD = 0 (MetricsReloaded / BraTS style);
* exactly one empty: Dice = IoU = NSD = 0, HD = HD95 = ASSD = ``worst_case_distance(shape,
  spacing)`` = the image diagonal sqrt((H·row_mm)² + (W·col_mm)²), which is larger than any
  distance between two pixel centres of the image (about 339.4 mm for a 240×240 slice at 1 mm).

No function returns NaN or inf. ``case_metrics`` also returns the flags ``gt_empty`` and
``pred_empty`` so that summaries can count (never drop) these cases.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

DEFAULT_TOLERANCE_MM = 2.0  # NSD tolerance τ in mm ("Boundary Dice"); see module docstring
HD_PERCENTILE = 95.0
METRIC_NAMES = ("dice", "iou", "hausdorff", "hd95", "assd", "nsd")
HIGHER_IS_BETTER = {"dice": True, "iou": True, "nsd": True, "hausdorff": False, "hd95": False, "assd": False}

Spacing = Sequence[float]  # (row_mm, col_mm)


def _check_masks(pred: np.ndarray, gt: np.ndarray) -> None:
    """Raise unless ``pred`` and ``gt`` are bool arrays of the same 2D shape."""
    for name, mask in (("pred", pred), ("gt", gt)):
        if not isinstance(mask, np.ndarray) or mask.dtype != np.bool_:
            # Refuse to guess a threshold: a probability map cast to bool is True almost everywhere.
            got = f"dtype {mask.dtype}" if isinstance(mask, np.ndarray) else type(mask).__name__
            raise TypeError(f"{name} must be a numpy bool array (e.g. `prob > 0.5`), got {got}")
        if mask.ndim != 2:
            raise ValueError(f"{name} must be 2D (H, W), got shape {mask.shape}")
    if pred.shape != gt.shape:
        raise ValueError(f"pred and gt shapes differ: {pred.shape} vs {gt.shape}")


def _check_spacing(spacing: Spacing) -> tuple[float, float]:
    """Return ``spacing`` as two positive finite floats (row_mm, col_mm), or raise ValueError."""
    values = [float(s) for s in spacing]
    if len(values) != 2 or not all(math.isfinite(s) and s > 0 for s in values):
        raise ValueError(f"spacing must be two positive finite numbers (row_mm, col_mm), got {spacing!r}")
    return values[0], values[1]


def _check_tolerance(tolerance_mm: float) -> float:
    """Return ``tolerance_mm`` as a float >= 0, or raise ValueError."""
    tolerance_mm = float(tolerance_mm)
    if not (math.isfinite(tolerance_mm) and tolerance_mm >= 0):
        raise ValueError(f"tolerance_mm must be a finite number >= 0, got {tolerance_mm!r}")
    return tolerance_mm


def boundary(mask: np.ndarray) -> np.ndarray:
    """Inner 1-pixel contour of a 2D bool mask (H, W) -> bool (H, W).

    A mask pixel is on the boundary when one of its 4 neighbours is background or lies outside the
    image (``border_value=0``), so a single pixel is its own boundary.
    """
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def worst_case_distance(shape: Sequence[int], spacing: Spacing) -> float:
    """Distance (mm) assigned to HD/HD95/ASSD when exactly one mask is empty: the image diagonal.

    ``shape`` is (H, W); returns sqrt((H·row_mm)² + (W·col_mm)²).
    """
    row_mm, col_mm = _check_spacing(spacing)
    return math.hypot(shape[0] * row_mm, shape[1] * col_mm)


def surface_distances(pred: np.ndarray, gt: np.ndarray, spacing: Spacing) -> tuple[np.ndarray, np.ndarray]:
    """Directed boundary distances in mm between two non-empty masks.

    Args:
        pred, gt: bool (H, W), both non-empty.
        spacing: (row_mm, col_mm).

    Returns:
        ``(d_pred_to_gt, d_gt_to_pred)``: float arrays of shape (|∂pred|,) and (|∂gt|,); entry i is
        the distance from the i-th boundary pixel (row-major order) to the other mask's boundary.
    """
    _check_masks(pred, gt)
    spacing = _check_spacing(spacing)
    if not pred.any() or not gt.any():
        raise ValueError("surface_distances needs two non-empty masks; the metric functions handle empty ones")
    # Work on the bounding box of pred ∪ gt: the EDT dominates the cost and lesions are small.
    # This is exact: every boundary pixel lies inside the box, and a mask pixel on the box edge has
    # a 4-neighbour outside pred ∪ gt, so it is boundary whether or not the box is cropped.
    rows, cols = np.nonzero(pred | gt)
    box = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
    edge_pred, edge_gt = boundary(pred[box]), boundary(gt[box])
    # EDT of ~edge gives, at every pixel, the distance to the nearest edge pixel of that mask.
    to_gt = ndimage.distance_transform_edt(~edge_gt, sampling=spacing)
    to_pred = ndimage.distance_transform_edt(~edge_pred, sampling=spacing)
    return to_gt[edge_pred], to_pred[edge_gt]


def _empty_state(pred: np.ndarray, gt: np.ndarray) -> str | None:
    """'both' / 'one' when both / exactly one mask is empty, else None."""
    pred_empty, gt_empty = not pred.any(), not gt.any()
    if pred_empty and gt_empty:
        return "both"
    if pred_empty or gt_empty:
        return "one"
    return None


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice coefficient of bool (H, W) masks; 1 when both are empty."""
    _check_masks(pred, gt)
    total = int(pred.sum()) + int(gt.sum())
    if total == 0:
        return 1.0
    return 2.0 * int((pred & gt).sum()) / total


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """Intersection over union of bool (H, W) masks; 1 when both are empty."""
    _check_masks(pred, gt)
    union = int((pred | gt).sum())
    if union == 0:
        return 1.0
    return int((pred & gt).sum()) / union


def _distance_metrics(
    pred: np.ndarray, gt: np.ndarray, spacing: Spacing, tolerance_mm: float
) -> dict[str, float]:
    """HD, HD95, ASSD (mm) and NSD@tolerance_mm, with the empty-mask conventions applied."""
    _check_masks(pred, gt)
    spacing = _check_spacing(spacing)
    tolerance_mm = _check_tolerance(tolerance_mm)
    state = _empty_state(pred, gt)
    if state == "both":
        return {"hausdorff": 0.0, "hd95": 0.0, "assd": 0.0, "nsd": 1.0}
    if state == "one":
        worst = worst_case_distance(pred.shape, spacing)
        return {"hausdorff": worst, "hd95": worst, "assd": worst, "nsd": 0.0}
    d_pg, d_gp = surface_distances(pred, gt, spacing)
    pooled = np.concatenate([d_pg, d_gp])
    return {
        "hausdorff": float(pooled.max()),
        "hd95": float(max(np.percentile(d_pg, HD_PERCENTILE), np.percentile(d_gp, HD_PERCENTILE))),
        "assd": float(pooled.mean()),
        "nsd": float((pooled <= tolerance_mm).mean()),
    }


def hausdorff(pred: np.ndarray, gt: np.ndarray, spacing: Spacing) -> float:
    """Hausdorff distance (mm) between the boundaries of bool (H, W) masks (paper eq. 21)."""
    return _distance_metrics(pred, gt, spacing, DEFAULT_TOLERANCE_MM)["hausdorff"]


def hd95(pred: np.ndarray, gt: np.ndarray, spacing: Spacing) -> float:
    """95th-percentile Hausdorff distance (mm): the max of the two DIRECTED 95th percentiles."""
    return _distance_metrics(pred, gt, spacing, DEFAULT_TOLERANCE_MM)["hd95"]


def assd(pred: np.ndarray, gt: np.ndarray, spacing: Spacing) -> float:
    """Average symmetric surface distance (mm), pooled over both boundaries."""
    return _distance_metrics(pred, gt, spacing, DEFAULT_TOLERANCE_MM)["assd"]


def nsd(pred: np.ndarray, gt: np.ndarray, spacing: Spacing, tolerance_mm: float = DEFAULT_TOLERANCE_MM) -> float:
    """Normalised surface Dice at ``tolerance_mm`` (distances ≤ τ count): the paper's "Boundary Dice"."""
    return _distance_metrics(pred, gt, spacing, tolerance_mm)["nsd"]


def case_metrics(
    pred: np.ndarray, gt: np.ndarray, spacing: Spacing, tolerance_mm: float = DEFAULT_TOLERANCE_MM
) -> dict[str, float | bool]:
    """All per-case metrics for one bool (H, W) mask pair, boundary distances computed once.

    Returns:
        ``{"dice", "iou", "hausdorff", "hd95", "assd", "nsd"}`` as floats (distances in mm, NSD at
        ``tolerance_mm``) plus the bool flags ``"gt_empty"`` and ``"pred_empty"``.
    """
    out: dict[str, float | bool] = {"dice": dice(pred, gt), "iou": iou(pred, gt)}
    out.update(_distance_metrics(pred, gt, spacing, tolerance_mm))
    out["gt_empty"] = not gt.any()
    out["pred_empty"] = not pred.any()
    return out
