"""Mammography phantom: 512x512 ROI crops at 0.1 mm, stored at 224x224, with round, lobulated or
spiculated masses.

Parenchyma is a power-law Gaussian field (1/f^beta, beta ~ 3, Burgess et al. 2001) thresholded
into fatty and fibroglandular tissue, plus curvilinear ligaments/vessels. Masses are denser
star-shaped regions with a dome profile and circumscribed, ill-defined or spiculated margins; the
mask covers the spicules. Distractors: benign dense islands with textured margins, calcification
clusters (tiny, very bright, strong edges), the skin line and the pectoral muscle edge. A subject
has four views (left/right x CC/MLO); with a mass, both views of the affected breast show it and
the contralateral views are negatives. Stored as min-max after a [0.5, 99.5] percentile clip.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.special import expit

from freqmedclip.data.phantoms.shapes import (
    SIZE,
    PhantomView,
    capsules,
    grid,
    harmonics,
    outline,
    path_segments,
    polar,
    power_law_noise,
    random_walk,
    smooth_noise,
    to_uint8,
)

DATASET = "breast"
MODALITY = "MG"
ORIGINAL_SIZE = (512, 512)
SPACING_MM = (0.1 * 512 / SIZE, 0.1 * 512 / SIZE)  # 0.1 mm detector pixels, 512 crop -> 224
STRUCTURES = {
    "mass": ["breast mass", "breast lesion", "breast cancer lesion", "mass in the mammogram", "suspicious breast mass"]
}
VIEWS = ("lcc", "lmlo", "rcc", "rmlo")
P_MASS = 0.8
SHAPES = ("round", "lobulated", "spiculated")


def _mass(rng: np.random.Generator) -> dict:
    shape = SHAPES[int(rng.integers(0, 3))]
    amplitude = {"round": 0.05, "lobulated": 0.22, "spiculated": 0.15}[shape]
    return {
        "shape": shape,
        "side": "l" if rng.random() < 0.5 else "r",
        "radius": rng.uniform(12, 40),
        "aspect": rng.uniform(0.7, 1.0),
        "coeffs": harmonics(rng, 4 if shape == "lobulated" else 6, amplitude, 0.5 if shape == "lobulated" else 1.0),
        "margin": rng.uniform(0.6, 1.2) if shape != "round" or rng.random() < 0.5 else rng.uniform(1.5, 3.5),
        "contrast": rng.uniform(0.06, 0.3),
        "base": rng.uniform(0.45, 0.6),
        "spicules": rng.uniform(0, 2 * np.pi, int(rng.integers(8, 20))),
        "spicule_len": rng.uniform(0.4, 1.3, 20),
        "spicule_width": rng.uniform(1.0, 2.2, 20),
    }


def _mass_layer(rng: np.random.Generator, mass: dict, density: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Density (224, 224) with the mass placed near the crop centre (CBIS crops are centred on the
    ROI; the same lesion is rotated differently in CC and MLO), and the mask (224, 224) bool.

    The mass is denser than fibroglandular tissue: over fat it stands out, over dense tissue it
    only adds half its contrast, as masses hidden in dense breasts do."""
    cy, cx = 112 + rng.normal(0, 12, 2)
    angle = rng.uniform(0, 2 * np.pi)
    radius = mass["radius"] * rng.uniform(0.9, 1.1)
    r, unit = polar(cy, cx, angle, mass["aspect"])
    rho = r / (radius * outline(unit, mass["coeffs"]))
    dome = np.sqrt(np.clip(1 - rho**2, 0, 1)) * 0.5 + 0.5
    weight = expit(-(rho - 1) * radius / mass["margin"])
    mask = rho <= 1
    if mass["shape"] == "spiculated":
        n = len(mass["spicules"])
        phi = mass["spicules"] + angle
        inner, outer = 0.7 * radius, radius * (1 + mass["spicule_len"][:n])
        segments = np.stack(
            [cy + inner * np.sin(phi), cx + inner * np.cos(phi), cy + outer * np.sin(phi), cx + outer * np.cos(phi)],
            axis=1,
        )
        widths = np.stack([mass["spicule_width"][:n], np.full(n, 0.6)], axis=1)
        cov, _ = capsules(segments, widths)
        weight = np.maximum(weight, 0.8 * cov)
        mask = mask | (cov >= 0.5)
    target = mass["base"] + mass["contrast"] * dome + 0.03 * smooth_noise(rng, 1.5)
    lift = np.maximum(target - density, 0.5 * mass["contrast"] * dome)
    return density + weight * lift, mask


def _calcifications(rng: np.random.Generator) -> np.ndarray:
    """Additive (224, 224) layer with one cluster of tiny bright specks."""
    layer = np.zeros((SIZE, SIZE))
    cy, cx = rng.uniform(30, 194, 2)
    n = int(rng.integers(4, 16))
    ys = np.clip(np.round(cy + rng.normal(0, 7, n)), 0, SIZE - 1).astype(int)
    xs = np.clip(np.round(cx + rng.normal(0, 7, n)), 0, SIZE - 1).astype(int)
    layer[ys, xs] = rng.uniform(2.0, 6.0, n)
    return ndimage.gaussian_filter(layer, 0.6)


def _ligaments(rng: np.random.Generator) -> np.ndarray:
    """Curvilinear thin structures (224, 224) in [0, 1]: Cooper's ligaments and vessels."""
    segments, widths = [], []
    for _ in range(int(rng.integers(4, 10))):
        pts = random_walk(rng, tuple(rng.uniform(0, SIZE, 2)), rng.uniform(0, 2 * np.pi), 40, 3.0, 0.12)
        segments.append(path_segments(pts))
        widths.append(np.full((len(pts) - 1, 2), rng.uniform(0.8, 2.0)))
    cov, _ = capsules(np.vstack(segments), np.vstack(widths))
    return cov


def _view(rng: np.random.Generator, subject: dict, view: str, mass: dict | None) -> PhantomView:
    yy, xx = grid()
    texture = power_law_noise(rng, subject["beta"])
    fibro = expit((texture - subject["threshold"]) / 0.6)
    for _ in range(int(rng.integers(0, 3))):
        # Benign dense island: a denser patch whose margin follows the texture, not a compact shape.
        r, unit = polar(*rng.uniform(30, 194, 2), rng.uniform(0, np.pi), rng.uniform(0.4, 0.9))
        island = r / (rng.uniform(15, 35) * outline(unit, harmonics(rng, 8, 0.4, 0.5))) + 0.25 * texture
        fibro = np.maximum(fibro, 0.8 * expit((1 - island) * 8))
    fine = power_law_noise(rng, 2.0)
    density = 0.22 + 0.38 * fibro * (1 + 0.15 * fine) + 0.03 * smooth_noise(rng, 1.0) + 0.12 * _ligaments(rng)
    mask = np.zeros((SIZE, SIZE), dtype=bool)
    if mass is not None:
        density, mask = _mass_layer(rng, mass, density)
    if rng.random() < 0.5:
        density = density + _calcifications(rng)
    if view.endswith("mlo") and rng.random() < 0.6:
        # Pectoral muscle: a bright wedge with a straight edge in the upper chest-wall corner.
        side = 0 if view[0] == "l" else SIZE - 1
        offset = rng.uniform(40, 140)
        wedge = (np.abs(xx - side) * rng.uniform(0.6, 1.6) + yy) < offset
        density = np.where(wedge, 0.75 + 0.05 * texture, density)
    breast = np.ones((SIZE, SIZE))
    if rng.random() < 0.4:
        # Skin line: the crop reaches the breast edge, beyond it air (dark).
        # The breast outline is a large arc whose centre lies towards the chest wall.
        chest = -150.0 if view[0] == "l" else SIZE + 150.0
        distance = rng.uniform(290, 350) - np.hypot(yy - rng.uniform(0, SIZE), xx - chest)
        breast = expit(distance / 1.5)
        mask &= breast > 0.5
        density = density * breast + 0.04 + 0.08 * np.exp(-(distance**2) / 8)
    density = ndimage.gaussian_filter(density, 0.6) + rng.normal(0, rng.uniform(0.008, 0.02), (SIZE, SIZE))
    low, high = np.percentile(density, [0.5, 99.5])
    image = to_uint8(density, low, high)
    present = mask.sum() >= 30
    extras = []
    caption = (
        f"mammogram ({view[1:].upper()} view) with a {mass['shape']} mass"
        if present
        else f"mammogram ({view[1:].upper()} view) without mass"
    )
    if present:
        extras = [
            f"{mass['shape']} breast mass",
            f"{mass['shape']} mass in the {'left' if view[0] == 'l' else 'right'} breast",
        ]
    return PhantomView(view, image, {"mass": mask} if present else {}, caption, {"mass": extras} if extras else {})


def render_subject(rng: np.random.Generator) -> list[PhantomView]:
    """Four views (left/right CC/MLO); a mass appears in both views of one breast."""
    subject = {"beta": rng.uniform(2.8, 3.2), "threshold": rng.uniform(-0.6, 0.9)}
    mass = _mass(rng) if rng.random() < P_MASS else None
    return [_view(rng, subject, view, mass if mass is not None and view[0] == mass["side"] else None) for view in VIEWS]
