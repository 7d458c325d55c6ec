"""Golden-value tests for freqmedclip.evaluation.metrics and freqmedclip.evaluation.summary.

Every expected number is computed by hand in the comments (or by an independent brute-force
implementation), never by calling the code under test.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from freqmedclip.evaluation import metrics as M
from freqmedclip.evaluation import summary as S


def square(shape: tuple[int, int] = (40, 40), top: int = 10, left: int = 10, size: int = 20) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[top:top + size, left:left + size] = True
    return mask


def pixel(shape: tuple[int, int], row: int, col: int) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[row, col] = True
    return mask


# ---------------------------------------------------------------------------------------------
# Shifted square (DATA.md §4.3 known answer)
# ---------------------------------------------------------------------------------------------
# A = 20x20 square at rows 10..29, cols 10..29; B = A shifted by 2 px. Take a column shift (B at
# cols 12..31); a row shift is the same by symmetry. The boundary of each is its 76-pixel ring.
# Directed distances ∂A -> ∂B in pixels:
#   top row (20 px): cols 12..29 lie on B's top row -> 0 (18 px); col 11 -> 1; col 10 -> 2
#   bottom row: same -> 18 x 0, one 1, one 2
#   left column, rows 11..28 (18 px): nearest is B's left column 2 px to the right -> 2
#   right column, rows 11..28 (18 px): inside B; nearest ∂B is B's right column (2 px) or
#     B's top/bottom row (r-10 or 29-r px) -> rows 11 and 28 give 1, rows 12..27 give 2
#   => 36 zeros, 4 ones, 36 twos; sum = 4 + 72 = 76 px. ∂B -> ∂A is the mirror image.
# At 0.5 mm/px: HD = 2 px = 1.0 mm; P95 of 76 sorted values sits at index 0.95*75 = 71.25,
#   inside the 36 twos (indices 40..75) -> HD95 = 1.0 mm; ASSD = (76 + 76) / 152 = 1 px = 0.5 mm.
# NSD: distances are 0, 0.5, 1.0 mm; at τ = 0.99 mm 40 of 76 count per side -> 80/152 = 10/19;
#   at τ = 1.0 (≤ counts) and 1.01 mm everything counts -> 1.
# Overlap: |A∩B| = 20*18 = 360, |A|+|B| = 800 -> Dice = 720/800 = 0.9;
#   |A∪B| = 20*22 = 440 -> IoU = 360/440 = 9/11.

@pytest.mark.parametrize("shift", [(2, 0), (0, 2), (-2, 0), (0, -2)])
def test_shifted_square_golden(shift):
    gt = square()
    pred = square(top=10 + shift[0], left=10 + shift[1])
    out = M.case_metrics(pred, gt, spacing=(0.5, 0.5))
    assert out["dice"] == pytest.approx(0.9)
    assert out["iou"] == pytest.approx(9 / 11)
    assert out["hausdorff"] == pytest.approx(1.0)
    assert out["hd95"] == pytest.approx(1.0)
    assert out["assd"] == pytest.approx(0.5)
    assert out["gt_empty"] is False and out["pred_empty"] is False


def test_shifted_square_directed_distances():
    d_pg, d_gp = M.surface_distances(square(left=12), square(), spacing=(0.5, 0.5))
    for d in (d_pg, d_gp):
        values, counts = np.unique(d, return_counts=True)
        assert values.tolist() == [0.0, 0.5, 1.0]
        assert counts.tolist() == [36, 4, 36]


@pytest.mark.parametrize("tolerance, expected", [(0.99, 10 / 19), (1.0, 1.0), (1.01, 1.0), (0.0, 72 / 152)])
def test_shifted_square_nsd_around_the_shift(tolerance, expected):
    # τ = 0 counts only the 36 zero distances per side: 72/152.
    assert M.nsd(square(left=12), square(), (0.5, 0.5), tolerance_mm=tolerance) == pytest.approx(expected)


def test_metrics_are_symmetric():
    pred, gt = square(top=7, left=13, size=15), square()
    a, b = M.case_metrics(pred, gt, (0.7, 1.3)), M.case_metrics(gt, pred, (0.7, 1.3))
    for name in M.METRIC_NAMES:
        assert a[name] == pytest.approx(b[name])


# ---------------------------------------------------------------------------------------------
# Single pixels and anisotropic spacing
# ---------------------------------------------------------------------------------------------

def test_identical_single_pixel_is_perfect():
    p = pixel((9, 9), 4, 4)
    assert M.case_metrics(p, p.copy(), (1.0, 1.0)) == {
        "dice": 1.0, "iou": 1.0, "hausdorff": 0.0, "hd95": 0.0, "assd": 0.0, "nsd": 1.0,
        "gt_empty": False, "pred_empty": False,
    }


def test_single_pixels_three_apart():
    # A single pixel is its own boundary, so every distance is the centre-to-centre 3 mm.
    pred, gt = pixel((9, 9), 4, 1), pixel((9, 9), 4, 4)
    out = M.case_metrics(pred, gt, (1.0, 1.0), tolerance_mm=2.0)
    assert (out["dice"], out["iou"]) == (0.0, 0.0)
    assert out["hausdorff"] == pytest.approx(3.0)
    assert out["hd95"] == pytest.approx(3.0)
    assert out["assd"] == pytest.approx(3.0)
    assert out["nsd"] == 0.0
    assert M.nsd(pred, gt, (1.0, 1.0), tolerance_mm=3.0) == 1.0


def test_single_pixels_euclidean_with_anisotropic_spacing():
    # (0,0) vs (3,4): 3 rows * 2 mm = 6 mm, 4 cols * 2 mm = 8 mm -> sqrt(36 + 64) = 10 mm.
    assert M.hausdorff(pixel((5, 5), 0, 0), pixel((5, 5), 3, 4), (2.0, 2.0)) == pytest.approx(10.0)
    # Spacing (2.0, 0.5): sqrt(6² + 2²) = sqrt(40).
    assert M.hausdorff(pixel((5, 5), 0, 0), pixel((5, 5), 3, 4), (2.0, 0.5)) == pytest.approx(math.sqrt(40))


# Spacing (row 2.0 mm, col 0.5 mm), the 20x20 square shifted by 2 px.
# Column shift (B at cols 12..31, 2 px = 1.0 mm), same walk as the isotropic case:
#   top row: 18 x 0, col 11 -> 0.5, col 10 -> 1.0; bottom row the same;
#   left column rows 11..28 -> 1.0 each (B's left column);
#   right column rows 11..28 -> min(1.0 to B's right column, 2.0*(r-10) or 2.0*(29-r) to B's
#   top/bottom row) = 1.0 each; the corner rows no longer give a smaller value, as rows are 2 mm.
#   Per side 1.5 + 1.5 + 18 + 18 = 39 mm -> ASSD = 78/152 = 39/76 mm; HD = HD95 = 1.0 mm.
# Row shift (B at rows 12..31, 2 px = 4.0 mm): left column rows 12..29 -> 0 (18 px), row 11 ->
#   2.0, row 10 -> 4.0; right column the same; top row cols 11..28 (18 px) -> 4.0 (B's top row,
#   anything else is farther); bottom row cols 11..28 lies inside B, c = col-10 = 1..18:
#   min(4.0 to B's bottom row, 0.5*c to B's left column, 0.5*(19-c) to B's right column)
#   -> 0.5, 1.0, ..., 3.5, 4.0, 4.0, 4.0, 4.0, 3.5, ..., 0.5, sum 2*14 + 16 = 44.
#   Per side: 6 + 6 + 72 + 44 = 128 mm -> ASSD = 128/76 mm; HD = 4.0 mm; the 4.0 mm values
#   number 1 + 1 + 18 + 4 = 24 of 76, so the P95 index 71.25 falls among them -> HD95 = 4.0 mm.

def test_anisotropic_spacing_row_vs_column_shift():
    spacing = (2.0, 0.5)
    col = M.case_metrics(square(left=12), square(), spacing)
    row = M.case_metrics(square(top=12), square(), spacing)
    assert col["hausdorff"] == pytest.approx(1.0) and col["hd95"] == pytest.approx(1.0)
    assert col["assd"] == pytest.approx(39 / 76)
    assert row["hausdorff"] == pytest.approx(4.0) and row["hd95"] == pytest.approx(4.0)
    assert row["assd"] == pytest.approx(128 / 76)
    # Overlap metrics do not depend on spacing.
    assert col["dice"] == row["dice"] == pytest.approx(0.9)


# ---------------------------------------------------------------------------------------------
# Empty masks (DATA.md §4.3 conventions)
# ---------------------------------------------------------------------------------------------

def test_both_empty_is_perfect():
    empty = np.zeros((10, 20), dtype=bool)
    assert M.case_metrics(empty, empty.copy(), (0.5, 2.0)) == {
        "dice": 1.0, "iou": 1.0, "hausdorff": 0.0, "hd95": 0.0, "assd": 0.0, "nsd": 1.0,
        "gt_empty": True, "pred_empty": True,
    }


@pytest.mark.parametrize("empty_side", ["pred", "gt"])
def test_one_empty_is_worst_case(empty_side):
    # Image 10 x 20 at (0.5, 2.0) mm: diagonal = sqrt(5² + 40²) = sqrt(1625) ≈ 40.31 mm.
    empty, full = np.zeros((10, 20), dtype=bool), square((10, 20), 2, 3, 4)
    pred, gt = (empty, full) if empty_side == "pred" else (full, empty)
    out = M.case_metrics(pred, gt, (0.5, 2.0))
    worst = math.sqrt(1625)
    assert M.worst_case_distance((10, 20), (0.5, 2.0)) == pytest.approx(worst)
    assert (out["dice"], out["iou"], out["nsd"]) == (0.0, 0.0, 0.0)
    assert out["hausdorff"] == out["hd95"] == out["assd"] == pytest.approx(worst)
    assert out["pred_empty"] is (empty_side == "pred") and out["gt_empty"] is (empty_side == "gt")


def test_worst_case_exceeds_any_real_distance():
    # Opposite corner pixels are the farthest pair a 240x240 image can hold: 239*sqrt(2) < 240*sqrt(2).
    far = M.hausdorff(pixel((240, 240), 0, 0), pixel((240, 240), 239, 239), (1.0, 1.0))
    assert far == pytest.approx(239 * math.sqrt(2))
    worst = M.worst_case_distance((240, 240), (1.0, 1.0))
    assert worst == pytest.approx(339.411, abs=1e-3)   # DATA.md §4.3: "about 339.4 mm"
    assert worst > far


def test_surface_distances_refuses_empty_masks():
    with pytest.raises(ValueError, match="non-empty"):
        M.surface_distances(np.zeros((5, 5), bool), pixel((5, 5), 2, 2), (1.0, 1.0))


# ---------------------------------------------------------------------------------------------
# HD95 vs HD
# ---------------------------------------------------------------------------------------------
# GT = 20x20 square at rows/cols 10..29 in 60x60; pred = GT plus an isolated pixel at (20, 40).
# ∂pred = GT's 76-pixel ring + the outlier; the outlier's nearest ∂GT pixel is (20, 29): 11 px.
# pred -> GT: 76 zeros and one 11; P95 index 0.95*76 = 72.2 lies among the zeros -> 0.
# GT -> pred: all 76 zeros. So HD = 11, HD95 = 0, ASSD = 11 / (77 + 76) = 11/153,
# Dice = 2*400 / (401 + 400) = 800/801.

def test_hd95_ignores_one_outlier_pixel_but_hd_does_not():
    gt = square((60, 60))
    pred = gt.copy()
    pred[20, 40] = True
    out = M.case_metrics(pred, gt, (1.0, 1.0))
    assert out["hausdorff"] == pytest.approx(11.0)
    assert out["hd95"] == pytest.approx(0.0)
    assert out["assd"] == pytest.approx(11 / 153)
    assert out["dice"] == pytest.approx(800 / 801)


# Same GT; pred = GT plus a far 3x3 blob at rows 18..20, cols 40..42 (DATA.md §4.2 in miniature).
# The blob's boundary is its 8 outer pixels; their nearest ∂GT pixel is on GT's right column
# (col 29, same row): col 40 -> 11 (x3), col 41 -> 12 (x2, centre excluded), col 42 -> 13 (x3).
# pred -> GT: 76 zeros + [11, 11, 11, 12, 12, 13, 13, 13]; P95 index 0.95*83 = 78.85 lies
#   between sorted[78] = 11 and sorted[79] = 12 -> 11.85. GT -> pred: 76 zeros -> 0.
# HD95 (max of directed) = 11.85 and HD = 13, whereas the pooled P95 of medpy / seg-metrics
# (160 values, index 0.95*159 = 151.05 between 0 and 11) would be 0.55 and hide the blob.

def test_hd95_is_max_of_directed_percentiles_not_pooled():
    gt = square((60, 60))
    pred = gt.copy()
    pred[18:21, 40:43] = True
    out = M.case_metrics(pred, gt, (1.0, 1.0))
    assert out["hd95"] == pytest.approx(11.85)
    assert out["hausdorff"] == pytest.approx(13.0)
    d_pg, d_gp = M.surface_distances(pred, gt, (1.0, 1.0))
    assert np.percentile(np.concatenate([d_pg, d_gp]), 95) == pytest.approx(0.55)


# ---------------------------------------------------------------------------------------------
# Brute-force cross-check on random masks
# ---------------------------------------------------------------------------------------------

def brute_boundary(mask: np.ndarray) -> np.ndarray:
    """Mask pixels with a 4-neighbour that is background or outside the image (independent of scipy)."""
    padded = np.pad(mask, 1, constant_values=False)
    neighbours_all_in = (padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])
    return mask & ~neighbours_all_in


def brute_directed(a: np.ndarray, b: np.ndarray, spacing: tuple[float, float]) -> np.ndarray:
    """For each boundary pixel of a, the min Euclidean mm distance to b's boundary (all pairs)."""
    pa = np.argwhere(brute_boundary(a)) * np.asarray(spacing)
    pb = np.argwhere(brute_boundary(b)) * np.asarray(spacing)
    return np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1)).min(axis=1)


def random_mask(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Scattered noise or a union of rectangles; both touch the image edge now and then."""
    if rng.random() < 0.5:
        mask = rng.random(shape) < rng.uniform(0.1, 0.7)
    else:
        mask = np.zeros(shape, dtype=bool)
        for _ in range(rng.integers(1, 4)):
            r, c = rng.integers(0, shape[0]), rng.integers(0, shape[1])
            mask[r:r + rng.integers(1, 8), c:c + rng.integers(1, 8)] = True
    if not mask.any():
        mask[rng.integers(0, shape[0]), rng.integers(0, shape[1])] = True
    return mask


@pytest.mark.parametrize("seed", range(25))
def test_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    shape = (int(rng.integers(4, 17)), int(rng.integers(4, 17)))
    spacing = (float(rng.uniform(0.3, 2.5)), float(rng.uniform(0.3, 2.5)))
    pred, gt = random_mask(rng, shape), random_mask(rng, shape)
    assert np.array_equal(M.boundary(pred), brute_boundary(pred))

    d_pg, d_gp = brute_directed(pred, gt, spacing), brute_directed(gt, pred, spacing)
    got_pg, got_gp = M.surface_distances(pred, gt, spacing)
    np.testing.assert_allclose(got_pg, d_pg, atol=1e-9)
    np.testing.assert_allclose(got_gp, d_gp, atol=1e-9)

    pooled = np.concatenate([d_pg, d_gp])
    # Tolerances chosen off the lattice of pixel distances so that rounding cannot flip a count.
    tolerance = float(rng.uniform(0.1, 4.0))
    out = M.case_metrics(pred, gt, spacing, tolerance_mm=tolerance)
    assert out["hausdorff"] == pytest.approx(pooled.max())
    assert out["hd95"] == pytest.approx(max(np.percentile(d_pg, 95), np.percentile(d_gp, 95)))
    assert out["assd"] == pytest.approx(pooled.mean())
    assert out["nsd"] == pytest.approx(np.mean(pooled <= tolerance))
    inter, a, b = (pred & gt).sum(), pred.sum(), gt.sum()
    assert out["dice"] == pytest.approx(2 * inter / (a + b))
    assert out["iou"] == pytest.approx(inter / (a + b - inter))


@pytest.mark.parametrize("seed", range(10))
def test_never_nan_and_within_bounds_including_empty_masks(seed):
    rng = np.random.default_rng(100 + seed)
    shape, spacing = (12, 9), (0.8, 1.7)
    masks = [random_mask(rng, shape), random_mask(rng, shape), np.zeros(shape, dtype=bool)]
    worst = M.worst_case_distance(shape, spacing)
    for pred in masks:
        for gt in masks:
            out = M.case_metrics(pred, gt, spacing)
            for name in M.METRIC_NAMES:
                assert math.isfinite(out[name]), name
            for name in ("dice", "iou", "nsd"):
                assert 0.0 <= out[name] <= 1.0
            for name in ("hausdorff", "hd95", "assd"):
                assert 0.0 <= out[name] <= worst
            assert out["hd95"] <= out["hausdorff"] + 1e-12
            assert out["assd"] <= out["hausdorff"] + 1e-12
            assert out["iou"] == pytest.approx(out["dice"] / (2 - out["dice"]))


def test_distances_do_not_depend_on_the_surrounding_background():
    # Only the worst-case value depends on the image size; real distances must not (the
    # implementation crops to the masks' bounding box, and a mask touching the image edge keeps
    # that edge as boundary).
    rng = np.random.default_rng(7)
    pred, gt = random_mask(rng, (9, 11)), random_mask(rng, (9, 11))
    big_pred, big_gt = np.zeros((30, 40), dtype=bool), np.zeros((30, 40), dtype=bool)
    big_pred[0:9, 29:40], big_gt[0:9, 29:40] = pred, gt      # same corner of the image
    small, big = M.case_metrics(pred, gt, (0.9, 1.1)), M.case_metrics(big_pred, big_gt, (0.9, 1.1))
    for name in M.METRIC_NAMES:
        assert small[name] == pytest.approx(big[name])


def test_single_metric_functions_agree_with_case_metrics():
    pred, gt, spacing = square(top=8, left=12, size=17), square(), (0.6, 0.9)
    out = M.case_metrics(pred, gt, spacing, tolerance_mm=1.5)
    assert M.dice(pred, gt) == out["dice"]
    assert M.iou(pred, gt) == out["iou"]
    assert M.hausdorff(pred, gt, spacing) == out["hausdorff"]
    assert M.hd95(pred, gt, spacing) == out["hd95"]
    assert M.assd(pred, gt, spacing) == out["assd"]
    assert M.nsd(pred, gt, spacing, tolerance_mm=1.5) == out["nsd"]


# ---------------------------------------------------------------------------------------------
# Input validation
# ---------------------------------------------------------------------------------------------

def test_rejects_bad_inputs():
    ok = square((10, 10), 2, 2, 4)
    with pytest.raises(TypeError, match="bool"):
        M.dice(ok.astype(np.uint8), ok)
    with pytest.raises(TypeError, match="bool"):
        M.iou(ok, ok.tolist())
    with pytest.raises(ValueError, match="shapes differ"):
        M.dice(ok, ok[:5])
    with pytest.raises(ValueError, match="2D"):
        M.dice(ok[None], ok[None])
    for spacing in [(1.0,), (1.0, 1.0, 1.0), (0.0, 1.0), (-1.0, 1.0), (float("nan"), 1.0)]:
        with pytest.raises(ValueError, match="spacing"):
            M.hausdorff(ok, ok, spacing)
    with pytest.raises(ValueError, match="tolerance"):
        M.nsd(ok, ok, (1.0, 1.0), tolerance_mm=-1.0)


# ---------------------------------------------------------------------------------------------
# Summaries and subject-level bootstrap
# ---------------------------------------------------------------------------------------------

def case_row(subject, dice, method="m", dataset="d", structure="s", gt_empty=False, pred_empty=False):
    """A per-case row; metrics other than Dice are filled with a fixed dummy value."""
    row = {name: 0.5 for name in M.METRIC_NAMES}
    row.update(method=method, dataset=dataset, structure=structure, subject_id=subject, dice=dice,
               gt_empty=gt_empty, pred_empty=pred_empty)
    return row


def test_summarize_hand_values():
    # Dice 0.8, 0.6 (subject a) and 1.0 (subject b).
    # mean 0.8; sd (ddof=1) = sqrt((0 + 0.04 + 0.04) / 2) = 0.2; median 0.8; q1 0.7, q3 0.9.
    # Bootstrap replicates draw 2 subjects with replacement and average all their CASES:
    #   {a, a}: (0.8+0.6+0.8+0.6)/4 = 0.7 (prob 1/4); {b, b}: 1.0 (1/4);
    #   {a, b}: (0.8+0.6+1.0)/3 = 0.8 (1/2) -- not 0.85, the mean of subject means.
    # So the 2.5th percentile is 0.7 and the 97.5th is 1.0.
    rows = [case_row("a", 0.8, gt_empty=False, pred_empty=False),
            case_row("a", 0.6, gt_empty=True, pred_empty=True),
            case_row("b", 1.0, gt_empty=True, pred_empty=False)]
    (out,) = S.summarize(rows)
    assert (out["method"], out["dataset"], out["structure"]) == ("m", "d", "s")
    assert (out["n_cases"], out["n_subjects"]) == (3, 2)
    assert (out["n_gt_empty"], out["n_pred_empty"], out["n_both_empty"], out["n_one_empty"]) == (2, 1, 1, 1)
    assert out["dice_mean"] == pytest.approx(0.8)
    assert out["dice_sd"] == pytest.approx(0.2)
    assert out["dice_median"] == pytest.approx(0.8)
    assert (out["dice_q1"], out["dice_q3"]) == (pytest.approx(0.7), pytest.approx(0.9))
    assert out["dice_ci_lo"] == pytest.approx(0.7)
    assert out["dice_ci_hi"] == pytest.approx(1.0)
    assert out["hd95_mean"] == pytest.approx(0.5) and out["hd95_sd"] == pytest.approx(0.0)
    # The 40th and 60th percentiles fall in the {a, b} half of the replicates: 0.8, the case mean.
    lo, hi = S.subject_bootstrap_ci([0.8, 0.6, 1.0], ["a", "a", "b"], confidence=0.2)
    assert (lo, hi) == (pytest.approx(0.8), pytest.approx(0.8))


def test_summarize_groups_and_single_case():
    rows = [case_row("a", 0.9, method="x"), case_row("a", 0.3, method="y"), case_row("b", 0.5, method="x")]
    out = S.summarize(rows)
    assert [r["method"] for r in out] == ["x", "y"]                    # first-seen order
    y = out[1]
    assert y["n_cases"] == 1 and y["dice_sd"] == 0.0                   # no NaN for one case
    assert y["dice_ci_lo"] == y["dice_ci_hi"] == y["dice_mean"] == pytest.approx(0.3)


def test_summarize_rejects_missing_keys_and_nan():
    row = case_row("a", 0.5)
    del row["subject_id"]
    with pytest.raises(KeyError, match="subject_id"):
        S.summarize([row])
    with pytest.raises(ValueError, match="non-finite"):
        S.summarize([case_row("a", float("nan"))])


def random_cohort(rng, n_subjects, cases_per_subject=3):
    """Per-case Dice with a subject effect (sd 0.1) and case noise (sd 0.05)."""
    values, subjects = [], []
    for s in range(n_subjects):
        effect = rng.normal(0.8, 0.1)
        values += list(effect + rng.normal(0, 0.05, cases_per_subject))
        subjects += [s] * cases_per_subject
    return np.array(values), subjects


def test_bootstrap_ci_contains_mean_and_shrinks_with_more_subjects():
    rng = np.random.default_rng(0)
    widths = []
    for n in (8, 200):
        values, subjects = random_cohort(rng, n)
        lo, hi = S.subject_bootstrap_ci(values, subjects, seed=1)
        assert lo < values.mean() < hi
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 3   # ~ sqrt(200/8) = 5x narrower in expectation


def test_bootstrap_is_deterministic_for_a_seed():
    values, subjects = random_cohort(np.random.default_rng(3), 20)
    assert S.subject_bootstrap_ci(values, subjects, seed=7) == S.subject_bootstrap_ci(values, subjects, seed=7)
    assert S.subject_bootstrap_ci(values, subjects, seed=7) != S.subject_bootstrap_ci(values, subjects, seed=8)
    rows = [case_row(s, v) for v, s in zip(values, subjects)]
    assert S.summarize(rows, seed=5) == S.summarize(list(rows), seed=5)


def test_bootstrap_resamples_subjects_not_cases():
    values, subjects = random_cohort(np.random.default_rng(4), 30, cases_per_subject=1)
    base = S.subject_bootstrap_ci(values, subjects, seed=0)
    # Each subject's case duplicated: same subjects, twice the cases -> the CI must not change.
    duplicated = S.subject_bootstrap_ci(np.repeat(values, 2), np.repeat(subjects, 2).tolist(), seed=0)
    assert duplicated == pytest.approx(base, abs=1e-12)
    # Control: the same duplicated cases presented as independent subjects do narrow the CI,
    # which is what a case-level bootstrap would wrongly report.
    fake_subjects = list(range(len(values) * 2))
    lo, hi = S.subject_bootstrap_ci(np.repeat(values, 2), fake_subjects, seed=0)
    assert hi - lo < 0.8 * (base[1] - base[0])


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------

def summary_row(method, dataset, structure="lesion", n_cases=10, n_one_empty=0, **means):
    """A hand-made summary row: each metric's CI is mean ± 0.01."""
    row = {"method": method, "dataset": dataset, "structure": structure, "n_cases": n_cases,
           "n_one_empty": n_one_empty}
    for name, value in means.items():
        row.update({f"{name}_mean": value, f"{name}_ci_lo": value - 0.01, f"{name}_ci_hi": value + 0.01})
    return row


def parse(markdown: str) -> list[list[str]]:
    """Markdown table -> list of rows of stripped cells, separator line dropped."""
    lines = markdown.strip().splitlines()
    assert set(lines[1].replace("|", "").split()) <= {"---", "---:"}
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in (lines[0], *lines[2:])]


def test_overlap_table():
    summary = [
        summary_row("Base", "brain", dice=0.800, iou=0.700),
        summary_row("Base", "lung", dice=0.600, iou=0.500),
        summary_row("Ours", "brain", dice=0.900, iou=0.800),
        summary_row("Ours", "lung", dice=0.700, iou=0.600),
    ]
    table = parse(S.overlap_table(summary))
    assert table[0] == ["Method", "brain Dice", "brain IoU", "lung Dice", "lung IoU", "Average Dice", "Average IoU"]
    # Averages are the unweighted means over datasets: Base (0.8+0.6)/2 = 0.7, Ours 0.8.
    assert table[1] == ["Base", "0.800 [0.790, 0.810]", "0.700 [0.690, 0.710]", "0.600 [0.590, 0.610]",
                        "0.500 [0.490, 0.510]", "0.700", "0.600"]
    assert table[2] == ["Ours", "**0.900** [0.890, 0.910]", "**0.800** [0.790, 0.810]",
                        "**0.700** [0.690, 0.710]", "**0.600** [0.590, 0.610]", "**0.800**", "**0.700**"]
    plain = parse(S.overlap_table(summary, methods=["Ours"], show_ci=False, bold_best=False))
    assert plain[1:] == [["Ours", "0.900", "0.800", "0.700", "0.600", "0.800", "0.700"]]


def test_overlap_table_missing_dataset_and_duplicate_structures():
    summary = [summary_row("A", "brain", dice=0.8, iou=0.7), summary_row("A", "lung", dice=0.6, iou=0.5),
               summary_row("B", "brain", dice=0.9, iou=0.8)]
    table = parse(S.overlap_table(summary, show_ci=False))
    assert table[2] == ["B", "**0.900**", "**0.800**", "n/a", "n/a", "n/a", "n/a"]
    summary.append(summary_row("A", "brain", structure="ET", dice=0.5, iou=0.4))
    with pytest.raises(ValueError, match="one structure"):
        S.overlap_table(summary)


def test_ablation_table_deltas():
    # Full model averages (0.90 + 0.834)/2 = 0.867; "w/o FreqEnc" (0.85 + 0.80)/2 = 0.825 -> Δ -0.042;
    # "w/o FFBI" (0.86 + 0.814)/2 = 0.837 -> Δ -0.030.
    summary = [
        summary_row("w/o FFBI", "brain", dice=0.86), summary_row("w/o FFBI", "lung", dice=0.814),
        summary_row("Full", "brain", dice=0.90), summary_row("Full", "lung", dice=0.834),
        summary_row("w/o FreqEnc", "brain", dice=0.85), summary_row("w/o FreqEnc", "lung", dice=0.80),
    ]
    table = parse(S.ablation_table(summary, full="Full", variants=["w/o FreqEnc", "w/o FFBI"]))
    assert table == [
        ["", "Full", "w/o FreqEnc", "w/o FFBI"],
        ["Avg Dice", "0.867", "0.825", "0.837"],
        ["Δ", "—", "-0.042", "-0.030"],
    ]
    # Default order: full first, then the others as first seen.
    assert parse(S.ablation_table(summary, full="Full"))[0] == ["", "Full", "w/o FFBI", "w/o FreqEnc"]
    with pytest.raises(ValueError, match="lacks"):
        S.ablation_table(summary + [summary_row("w/o TCA", "brain", dice=0.9)], full="Full")
    with pytest.raises(ValueError, match="full model"):
        S.ablation_table(summary, full="Nope")


def test_boundary_table():
    summary = [
        summary_row("Sem", "brain", n_cases=10, n_one_empty=1, hausdorff=8.0, hd95=5.0, nsd=0.70),
        summary_row("Sem", "lung", n_cases=20, n_one_empty=2, hausdorff=8.4, hd95=5.5, nsd=0.784),
        summary_row("Ours", "brain", n_cases=10, n_one_empty=0, hausdorff=2.0, hd95=1.5, nsd=0.80),
        summary_row("Ours", "lung", n_cases=20, n_one_empty=1, hausdorff=2.2, hd95=1.6, nsd=0.862),
    ]
    # Sem: HD (8.0+8.4)/2 = 8.2, NSD (0.70+0.784)/2 = 0.742; Ours: 2.1, 0.831; worst-case 3/30, 1/30.
    table = parse(S.boundary_table(summary, tolerance_mm=2.0))
    assert table == [
        ["Method", "Avg HD (mm)", "Boundary Dice (NSD @ 2 mm)", "Worst-case cases"],
        ["Sem", "8.20", "0.742", "3/30"],
        ["Ours", "**2.10**", "**0.831**", "1/30"],
    ]
    wide = parse(S.boundary_table(summary, tolerance_mm=1.5, with_hd95=True, bold_best=False))
    assert wide[0][2:4] == ["Avg HD95 (mm)", "Boundary Dice (NSD @ 1.5 mm)"]
    assert wide[1][2] == "5.25" and wide[2][2] == "1.55"


def test_efficiency_table():
    # 8294.4 MiB / 1024 = 8.1 GiB; 10956.8 MiB / 1024 = 10.7 GiB.
    rows = [{"method": "BiomedCLIP", "time_ms": 52.0, "peak_memory_mb": 8294.4},
            {"method": "FreqMedCLIP", "time_ms": 81.26, "time_ms_sd": 2.04, "peak_memory_mb": 10956.8}]
    assert parse(S.efficiency_table(rows)) == [
        ["Method", "Inference time (ms)", "Peak memory (GiB)"],
        ["BiomedCLIP", "52.0", "8.10"],
        ["FreqMedCLIP", "81.3 ± 2.0", "10.70"],
    ]
    with pytest.raises(KeyError, match="peak_memory_mb"):
        S.efficiency_table([{"method": "x", "time_ms": 1.0}])


def test_end_to_end_case_metrics_to_tables():
    # Two methods, one dataset, three subjects with two slices each; "bad" misses one lesion.
    rows = []
    gt = square()
    for subject in range(3):
        for slice_idx in range(2):
            for method, pred in (("good", square(left=12)), ("bad", np.zeros_like(gt) if slice_idx else gt)):
                rows.append({**M.case_metrics(pred, gt, (0.5, 0.5)), "method": method, "dataset": "brain",
                             "structure": "WT", "subject_id": f"s{subject}"})
    summary = S.summarize(rows, n_boot=200)
    by_method = {r["method"]: r for r in summary}
    assert by_method["good"]["hausdorff_mean"] == pytest.approx(1.0)
    assert by_method["good"]["dice_ci_lo"] == pytest.approx(0.9) == by_method["good"]["dice_ci_hi"]
    assert by_method["bad"]["n_pred_empty"] == 3 and by_method["bad"]["n_one_empty"] == 3
    # Bad: half the cases perfect (HD 0), half worst case (diagonal 40*0.5*sqrt(2) mm).
    assert by_method["bad"]["hausdorff_mean"] == pytest.approx(10 * math.sqrt(2))
    assert parse(S.boundary_table(summary))[1:] == [["good", "**1.00**", "**1.000**", "0/6"],
                                                    ["bad", "14.14", "0.500", "3/6"]]


# ---------------------------------------------------------------------------------------------
# MONAI as an independent oracle (test-only dependency): same numbers where our conventions agree,
# the differences shown with both values where they differ on purpose (README "Metric conventions")
# ---------------------------------------------------------------------------------------------

def _monai(pred: np.ndarray, gt: np.ndarray, spacing: tuple[float, float], tolerance: float,
           **nsd_options) -> dict[str, float]:
    import torch
    from monai.metrics import (compute_average_surface_distance, compute_hausdorff_distance,
                               compute_surface_dice)

    p, g = (torch.from_numpy(m[None, None]).float() for m in (pred, gt))   # (batch, class, H, W), one class
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # MONAI warns on empty masks (the case below that shows nan / inf)
        return {
            "hausdorff": compute_hausdorff_distance(p, g, include_background=True, spacing=spacing).item(),
            "hd95": compute_hausdorff_distance(p, g, include_background=True, percentile=95, spacing=spacing).item(),
            "assd": compute_average_surface_distance(p, g, include_background=True, symmetric=True,
                                                     spacing=spacing).item(),
            "nsd": compute_surface_dice(p, g, [tolerance], include_background=True, spacing=spacing,
                                        **nsd_options).item(),
        }


# MONAI returns float32 (relative round-off 2^-24 on distances computed in float64): rel=1e-6 is 16 ulps.
MONAI_REL = 1e-6


@pytest.mark.parametrize("seed", range(12))
def test_distance_metrics_match_monai_on_random_masks_with_anisotropic_spacing(seed):
    pytest.importorskip("monai")   # the independent oracle (a test-only requirement); absent, nothing to compare
    rng = np.random.default_rng(500 + seed)
    shape = (int(rng.integers(6, 25)), int(rng.integers(6, 25)))
    spacing = (float(rng.uniform(0.3, 2.5)), float(rng.uniform(0.3, 2.5)))
    assert abs(spacing[0] - spacing[1]) > 1e-3                    # anisotropic, so a swapped axis would show
    pred, gt = random_mask(rng, shape), random_mask(rng, shape)
    tolerance = float(rng.uniform(0.1, 4.0))                       # off the pixel-distance lattice (see above)
    ours, theirs = M.case_metrics(pred, gt, spacing, tolerance_mm=tolerance), _monai(pred, gt, spacing, tolerance)
    for name in ("hausdorff", "hd95", "assd", "nsd"):
        assert ours[name] == pytest.approx(theirs[name], rel=MONAI_REL, abs=1e-6), name


def test_monai_agrees_on_the_hand_computed_fixtures():
    # shifted squares (golden values above): HD = HD95 = 1, ASSD = 0.5 at 1 mm; anisotropic: golden 4.0 / 128/76
    for pred, spacing, golden in ((square(top=11), (1.0, 1.0), {"hausdorff": 1.0, "hd95": 1.0, "assd": 0.5}),
                                  (square(left=12), (0.5, 2.0), {"hausdorff": 4.0, "hd95": 4.0, "assd": 128 / 76})):
        theirs = _monai(pred, square(), spacing, 2.0)
        for name, value in golden.items():
            assert theirs[name] == pytest.approx(value, rel=MONAI_REL), name
            assert M.case_metrics(pred, square(), spacing)[name] == pytest.approx(value)


def test_hd95_convention_is_monais_directed_maximum_not_the_pooled_percentile():
    # The far-blob pair of test_hd95_is_max_of_directed_percentiles_not_pooled: MONAI's percentile=95 takes
    # the max of the two directed 95th percentiles like ours (11.85 mm); the pooled 95th percentile of medpy /
    # seg-metrics would be 0.55 mm and hide the blob.
    gt = square((60, 60))
    pred = gt.copy()
    pred[18:21, 40:43] = True
    theirs = _monai(pred, gt, (1.0, 1.0), 2.0)
    assert theirs["hd95"] == pytest.approx(11.85, rel=MONAI_REL) == M.hd95(pred, gt, (1.0, 1.0))
    d_pg, d_gp = M.surface_distances(pred, gt, (1.0, 1.0))
    assert np.percentile(np.concatenate([d_pg, d_gp]), 95) == pytest.approx(0.55) != theirs["hd95"]


def test_empty_mask_convention_differs_from_monai():
    # MONAI: nan when the reference is empty (HD, HD95, NSD), inf ASSD; ours: finite by design (module docstring):
    # both empty -> distances 0, NSD 1; one empty -> the image diagonal, NSD 0.
    shape, spacing = (12, 9), (0.8, 1.7)
    empty, some = np.zeros(shape, bool), square(shape, top=2, left=2, size=4)
    worst = M.worst_case_distance(shape, spacing)
    assert worst == pytest.approx(math.hypot(12 * 0.8, 9 * 1.7))
    both = _monai(empty, empty, spacing, 2.0)
    assert all(math.isnan(both[name]) for name in ("hausdorff", "hd95", "nsd")), both
    ours = M.case_metrics(empty, empty, spacing)
    assert (ours["hausdorff"], ours["hd95"], ours["assd"], ours["nsd"]) == (0.0, 0.0, 0.0, 1.0)
    missed = _monai(empty, some, spacing, 2.0)              # prediction empty, reference not
    assert math.isinf(missed["hausdorff"]) and math.isinf(missed["assd"]) and missed["nsd"] == 0.0, missed
    ours = M.case_metrics(empty, some, spacing)
    assert (ours["hausdorff"], ours["hd95"], ours["assd"], ours["nsd"]) == (worst, worst, worst, 0.0)


def test_nsd_counts_boundary_pixels_not_monais_subvoxel_surface_lengths():
    # Ours = MONAI's default (use_subvoxels=False): the fraction of boundary PIXELS within tolerance, 0.5 here.
    # MONAI use_subvoxels=True weighs each surface element by its length at the given spacing, so the long
    # (1.3 mm) and short (0.7 mm) sides count differently: 0.6292 on the same pair.
    pred, gt, spacing = square(left=12), square(), (0.7, 1.3)
    assert M.nsd(pred, gt, spacing, tolerance_mm=1.0) == pytest.approx(0.5)
    assert _monai(pred, gt, spacing, 1.0)["nsd"] == pytest.approx(0.5, rel=MONAI_REL)
    subvoxel = _monai(pred, gt, spacing, 1.0, use_subvoxels=True)["nsd"]
    assert subvoxel == pytest.approx(0.6292, abs=1e-4) and abs(subvoxel - 0.5) > 0.1
