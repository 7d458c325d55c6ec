"""Lung CT phantom: axial slices rendered in HU, then lung-windowed and min-max normalised.

A subject is a thorax (fat, muscle, ribs, spine, mediastinum, two lung fields) at 0.7 mm pixels;
lung fields carry parenchymal texture, a branching vessel tree, vessel cross-sections (round
dots, the classic nodule look-alike) and bronchial walls (small rings). Nodules are ellipsoids
with lobulated outlines: solid (soft-tissue HU) or part-solid (ground-glass halo around a solid
core), some juxtapleural, diameters 16-50 px (11-35 mm) with ~40% small ones (~20 px). The mask is
the whole nodule (halo included) inside the lung field. Three slices cross the nodule and one
does not. Window: level -600 HU, width 1500 HU, then per-image min-max.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.special import expit

from freqmedclip.data.phantoms.shapes import (
    SIZE,
    PhantomView,
    capsules,
    disk_patch,
    harmonics,
    outline,
    path_segments,
    polar,
    random_walk,
    smooth_noise,
    to_uint8,
)

DATASET = "lung"
MODALITY = "CT"
ORIGINAL_SIZE = (SIZE, SIZE)
SPACING_MM = (0.7, 0.7)
STRUCTURES = {
    "nodule": [
        "lung nodule",
        "pulmonary nodule",
        "nodule in the lung CT",
        "lung lesion",
        "pulmonary nodule on chest CT",
    ]
}
N_SLICES = 4
P_NODULE = 0.8
WINDOW = (-600.0 - 750.0, -600.0 + 750.0)
AIR, FAT, SOFT, BONE, LUNG = -1000.0, -100.0, 40.0, 700.0, -860.0


def _thorax(rng: np.random.Generator) -> dict:
    return {
        "body_cy": rng.uniform(112, 124),
        "body_ay": rng.uniform(92, 100),
        "body_ax": rng.uniform(140, 160),
        "fat": rng.uniform(5, 12),
        "lung_cy": rng.uniform(105, 115),
        "lung_dx": rng.uniform(48, 56),
        "lung_ay": rng.uniform(62, 72),
        "lung_ax": rng.uniform(34, 40),
        "lung_coeffs": [harmonics(rng, 4, 0.12), harmonics(rng, 4, 0.12)],
        "rib_phase": rng.uniform(0, 0.3),
        "heart_dy": rng.uniform(25, 40),
        "heart_dx": rng.uniform(8, 18),
        "heart_r": rng.uniform(30, 40),
    }


def _nodule(rng: np.random.Generator) -> dict:
    diameter = rng.choice([rng.uniform(16, 24), rng.uniform(24, 36), rng.uniform(36, 50)], p=[0.4, 0.4, 0.2])
    return {
        "diameter": diameter,
        "rz": diameter / 2 * rng.uniform(0.8, 1.2),
        "side": int(rng.integers(0, 2)),
        "part_solid": rng.random() < 0.4,
        "core": rng.uniform(0.35, 0.6),
        "ggo": rng.uniform(-620, -380),
        "solid": rng.uniform(10, 70),
        "coeffs": harmonics(rng, 5, rng.uniform(0.05, 0.25)),
        "juxtapleural": rng.random() < 0.25,
        "where": rng.uniform(0, 1, 2),
        "edge": rng.uniform(0.4, 1.0),
    }


def _lungs(thorax: dict, z: float) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """Lung-field mask (224, 224) bool at slice z and the two lung centres."""
    scale = 1 - 0.15 * (z / 60) ** 2
    lungs = np.zeros((SIZE, SIZE), dtype=bool)
    centres = []
    for i, side in enumerate((-1, 1)):
        cy, cx = thorax["lung_cy"], 112 + side * thorax["lung_dx"]
        r, unit = polar(cy, cx, np.pi / 2, thorax["lung_ax"] / thorax["lung_ay"])
        lungs |= r <= thorax["lung_ay"] * scale * outline(unit, thorax["lung_coeffs"][i])
        centres.append((cy, cx))
    heart, _ = polar(thorax["lung_cy"] + thorax["heart_dy"], 112 + thorax["heart_dx"])
    lungs &= heart > thorax["heart_r"] * scale  # the heart indents the medial border of the left lung
    return lungs, centres


def _vessel_tree(rng: np.random.Generator, lungs: np.ndarray, centres: list[tuple[float, float]]) -> np.ndarray:
    """Vessel coverage (224, 224) in [0, 1]: branches from each hilum plus cross-section dots."""
    segments, widths = [], []
    for cy, cx in centres:
        medial = 1 if cx < 112 else -1
        for _ in range(int(rng.integers(3, 6))):
            start = (cy + rng.normal(0, 10), cx + medial * 22)
            heading = rng.uniform(0, 2 * np.pi)
            width = rng.uniform(3.0, 5.0)
            for _generation in range(3):
                pts = random_walk(rng, start, heading, 8, 3.0, 0.2)
                segments.append(path_segments(pts))
                taper = np.linspace(width, width * 0.6, len(pts))
                widths.append(np.stack([taper[:-1], taper[1:]], axis=1))
                start, heading, width = tuple(pts[-1]), heading + rng.choice([-0.6, 0.6]), width * 0.6
    inside = np.argwhere(lungs)
    dots = inside[rng.integers(0, len(inside), int(rng.integers(8, 20)))]
    radii = rng.uniform(1.0, 3.5, len(dots))
    segments.append(np.hstack([dots, dots]).astype(np.float64))
    widths.append(np.stack([2 * radii, 2 * radii], axis=1))
    cov, _ = capsules(np.vstack(segments), np.vstack(widths))
    return cov * lungs


def _bronchi(rng: np.random.Generator, lungs: np.ndarray, hu: np.ndarray) -> None:
    """Paint bronchial cross-sections (tissue wall ring, air lumen) into ``hu`` in place."""
    inside = np.argwhere(ndimage.binary_erosion(lungs, iterations=6))
    for cy, cx in inside[rng.integers(0, len(inside), int(rng.integers(3, 8)))] if len(inside) else []:
        outer, wall = rng.uniform(2.5, 5.0), rng.uniform(1.0, 1.6)
        box, r = disk_patch(cy, cx, outer)
        patch = hu[box]
        patch[(r <= outer) & (r > outer - wall)] = 0.0
        patch[r <= outer - wall] = AIR


def _chest_wall(rng: np.random.Generator, thorax: dict) -> np.ndarray:
    """HU (224, 224) of the thorax without lungs: air, fat, muscle, ribs, spine."""
    r, _ = polar(thorax["body_cy"], 112, np.pi / 2, thorax["body_ax"] / thorax["body_ay"])
    depth = (1 - r / thorax["body_ay"]) * thorax["body_ay"]
    hu = np.full((SIZE, SIZE), AIR)
    hu[depth >= 0] = FAT
    hu[depth >= thorax["fat"]] = SOFT
    angles = np.arange(0.05, 1.0, 0.085) * 2 * np.pi + thorax["rib_phase"] + rng.normal(0, 0.02, 12)
    ry, rx = (
        thorax["body_ay"] - thorax["fat"] - 7,
        (thorax["body_ay"] - thorax["fat"] - 7) * thorax["body_ax"] / thorax["body_ay"],
    )
    # Rib cross-sections: short thick capsules along the inner chest wall.
    cy, cx = thorax["body_cy"] + ry * np.cos(angles), 112 + rx * np.sin(angles)
    half = rng.uniform(1.5, 3.0, len(angles))
    tangent = np.stack([-np.sin(angles), np.cos(angles)], axis=1)
    segments = np.stack(
        [cy - half * tangent[:, 0], cx - half * tangent[:, 1], cy + half * tangent[:, 0], cx + half * tangent[:, 1]],
        axis=1,
    )
    widths = np.repeat(rng.uniform(5, 7, (len(angles), 1)), 2, axis=1)
    ribs, _ = capsules(segments, widths)
    hu[ribs > 0.5] = BONE
    spine, _ = polar(thorax["body_cy"] + thorax["body_ay"] - 30, 112)
    hu[spine <= 15] = 350.0
    hu[(spine <= 15) & (spine > 12.5)] = BONE
    return hu


def _nodule_region(nodule: dict, z: float) -> tuple[np.ndarray, float]:
    """Normalised radius rho (224, 224) of the nodule cross-section at z, and its in-plane radius."""
    factor = np.sqrt(max(1 - ((z - nodule["zc"]) / nodule["rz"]) ** 2, 0.0))
    radius = nodule["diameter"] / 2 * factor
    cy, cx = nodule["centre"]
    r, unit = polar(cy, cx)
    return r / np.maximum(radius * outline(unit, nodule["coeffs"]), 1e-6), radius


def _place_nodule(nodule: dict, lungs: np.ndarray) -> None:
    """Choose the nodule centre inside the lung field (touching the pleura when juxtapleural)."""
    half = nodule["diameter"] / 2
    dist = ndimage.distance_transform_edt(lungs)
    side = np.zeros_like(lungs)
    side[:, : SIZE // 2] = nodule["side"] == 0
    side[:, SIZE // 2 :] = nodule["side"] == 1
    band = (dist >= 0.4 * half) & (dist <= 0.7 * half) if nodule["juxtapleural"] else dist >= half + 3
    candidates = np.argwhere(band & side)
    if not len(candidates):
        candidates = np.argwhere((dist >= 0.5 * half) & side)
    if not len(candidates):
        candidates = np.argwhere(dist == dist.max())
    pick = int(nodule["where"][0] * len(candidates)) % len(candidates)
    nodule["centre"] = tuple(float(v) for v in candidates[pick])


def _slice(rng: np.random.Generator, thorax: dict, nodule: dict | None, z: float) -> PhantomView:
    lungs, centres = _lungs(thorax, z)
    hu = _chest_wall(rng, thorax)
    hu[lungs] = LUNG + 25 * smooth_noise(rng, 1.5)[lungs]
    vessels = _vessel_tree(rng, lungs, centres)
    hu = hu + vessels * (SOFT - hu)
    _bronchi(rng, lungs, hu)
    mask = np.zeros((SIZE, SIZE), dtype=bool)
    if nodule is not None:
        rho, radius = _nodule_region(nodule, z)
        if radius > 2:
            edge = nodule["edge"] / max(radius, 1e-6)
            inside = expit((1 - rho) / edge) * lungs
            level = nodule["ggo"] if nodule["part_solid"] else nodule["solid"]
            hu = hu + inside * (np.maximum(level, hu) - hu)
            if nodule["part_solid"]:
                core = expit((nodule["core"] - rho) / edge) * lungs
                hu = hu + core * (nodule["solid"] - hu)
            mask = (rho <= 1) & lungs
    hu = ndimage.gaussian_filter(hu + rng.normal(0, rng.uniform(20, 45), hu.shape), 0.7)
    windowed = np.clip(hu, *WINDOW)
    image = to_uint8(windowed, windowed.min(), windowed.max())
    present = mask.sum() >= 30
    if not present:
        return PhantomView("", image, {}, "lung CT without nodule")
    kind = "part-solid" if nodule["part_solid"] else "solid"
    size_mm = 2 * np.sqrt(mask.sum() / np.pi) * SPACING_MM[0]
    side = "right" if nodule["centre"][1] < 112 else "left"  # radiological convention: patient right on image left
    descriptors = [f"{kind} nodule", f"{size_mm:.0f} mm {kind} nodule in the {side} lung"]
    if nodule["juxtapleural"]:
        descriptors.append("juxtapleural nodule")
    return PhantomView(
        "", image, {"nodule": mask}, f"lung CT with a {size_mm:.0f} mm {kind} nodule", {"nodule": descriptors}
    )


def render_subject(rng: np.random.Generator) -> list[PhantomView]:
    """``N_SLICES`` axial slices; with a nodule, three cross it and one lies outside it."""
    thorax = _thorax(rng)
    nodule = _nodule(rng) if rng.random() < P_NODULE else None
    if nodule is None:
        zs = sorted(rng.uniform(-50, 50, N_SLICES))
    else:
        nodule["zc"] = rng.uniform(-30, 30)
        lungs, _ = _lungs(thorax, nodule["zc"])
        _place_nodule(nodule, lungs)
        inside = nodule["zc"] + nodule["rz"] * rng.uniform(-0.6, 0.6, N_SLICES - 1)
        gap = nodule["rz"] + rng.uniform(3, 15)
        zs = sorted([*inside, nodule["zc"] + (gap if rng.random() < 0.5 else -gap)])
    views = []
    for i, z in enumerate(zs):
        view = _slice(rng, thorax, nodule, z)
        view.view = f"z{i}"
        views.append(view)
    return views
