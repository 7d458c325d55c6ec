"""Brain MRI phantom: glioma in three contrasts (FLAIR, T1ce, T2 as R, G, B), BraTS-like regions.

Each subject is an analytic 3D head (elliptical layers: scalp, skull, CSF, cortex with sulci,
white matter, ventricles) with an optional glioma made of ellipsoids sharing one irregular
outline across slices: enhancing rim (BraTS label 4) around a necrotic core (label 1), inside a
larger lobulated oedema (label 2). Low-grade tumours have a non-enhancing core and no rim, so
``enhancing_tumour`` is absent while ``tumour_core`` is present. Distractors with strong edges:
skull, ventricles, sulci, the falx, and enhancing vessels / choroid plexus that are bright in T1ce
like the tumour rim. Images get partial-volume blur, a per-contrast bias field and Rician noise,
then the BraTS normalisation: z-score inside the head per contrast, clip to [-3, 3], map to
[0, 255], background 0.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from freqmedclip.data.phantoms.shapes import (
    SIZE,
    PhantomView,
    bias_field,
    capsules,
    disk_patch,
    grid,
    harmonics,
    outline,
    path_segments,
    polar,
    random_walk,
    smooth_noise,
    to_uint8,
)

DATASET = "brain"
MODALITY = "MRI"
ORIGINAL_SIZE = (240, 240)
SPACING_MM = (240.0 / SIZE, 240.0 / SIZE)  # 240 mm field of view, 1 mm voxels, resized 240 -> 224
STRUCTURES = {
    "whole_tumour": [
        "whole tumour",
        "whole brain tumour including oedema",
        "glioma with surrounding oedema",
        "entire tumour region in brain MRI",
        "whole tumor",
    ],
    "tumour_core": ["tumour core", "necrotic core and enhancing tumour", "solid core of the glioma", "tumor core"],
    "enhancing_tumour": [
        "enhancing tumour",
        "contrast-enhancing tumour rim",
        "gadolinium-enhancing tumor",
        "enhancing rim on T1ce",
    ],
    "oedema": ["peritumoral oedema", "oedema around the tumour", "peritumoral edema", "FLAIR hyperintense oedema"],
}
N_SLICES = 4
P_TUMOUR = 0.8
P_LOW_GRADE = 0.25
Z_RANGE = (-45.0, 75.0)  # slice positions in pixels relative to the ventricle level

BG, SCALP, SKULL, CSF, GM, WM, DEEP_GM, VESSEL, PLEXUS, OEDEMA, NCR, NET, ET = range(13)
# Mean intensity per label in (FLAIR, T1ce, T2); oedema FLAIR/T2 are scaled per subject (contrast).
TABLE = np.array(
    [
        [0.00, 0.00, 0.00],  # background
        [0.55, 0.80, 0.55],  # scalp (fat bright on T1)
        [0.05, 0.05, 0.07],  # skull
        [0.10, 0.14, 1.00],  # CSF: suppressed on FLAIR, bright on T2
        [0.56, 0.46, 0.56],  # grey matter
        [0.44, 0.62, 0.38],  # white matter
        [0.52, 0.50, 0.50],  # deep grey nuclei
        [0.40, 0.95, 0.25],  # enhancing vessel / dura
        [0.35, 0.90, 0.70],  # choroid plexus (enhances)
        [0.90, 0.52, 0.82],  # oedema
        [0.35, 0.16, 0.88],  # necrosis
        [0.78, 0.40, 0.76],  # non-enhancing tumour (low grade)
        [0.66, 0.97, 0.62],  # enhancing tumour
    ]
)


def _head(rng: np.random.Generator) -> dict:
    return {
        "cy": 112 + rng.normal(0, 2),
        "cx": 112 + rng.normal(0, 2),
        "ay": rng.uniform(92, 102),
        "ax": rng.uniform(76, 86),
        "angle": rng.normal(0, 0.08),
        "coeffs": harmonics(rng, 4, 0.04),
        "scalp": rng.uniform(4, 7),
        "skull": rng.uniform(3, 5),
        "gap": rng.uniform(1.5, 3),
        "gm": rng.uniform(3.5, 5.5),
        "n_sulci": int(rng.integers(22, 34)),
        "sulcus_phase": rng.uniform(0, 1),
        "sulcus_wobble": harmonics(rng, 6, 0.15),
        "sulcus_depth": rng.uniform(7, 14),
        "sulcus_factors": rng.uniform(0.3, 1.4, 40),
        "vent_sep": rng.uniform(8, 12),
        "vent_len": rng.uniform(22, 30),
        "vent_width": rng.uniform(4, 8),
    }


def _tumour(rng: np.random.Generator, head: dict) -> dict:
    low_grade = rng.random() < P_LOW_GRADE
    rc = rng.uniform(7, 22)
    phi, frac = rng.uniform(0, 2 * np.pi), rng.uniform(0.2, 0.55)
    return {
        "cy": head["cy"] + frac * head["ay"] * np.sin(phi),
        "cx": head["cx"] + frac * head["ax"] * np.cos(phi),
        "zc": rng.uniform(-5, 35),
        "rc": rc,
        "rz": rc * rng.uniform(0.8, 1.3),
        "angle": rng.uniform(0, np.pi),
        "core_coeffs": harmonics(rng, 5, 0.25),
        "rim": 0.0 if low_grade else rng.uniform(1.5, 4.0),
        "rim_coeffs": harmonics(rng, 4, 0.8, 0.5),
        "extra": rng.uniform(5, 22),
        "extra_z": rng.uniform(4, 14),
        "oedema_coeffs": harmonics(rng, 7, 0.45, 0.7),
        "contrast": rng.uniform(0.35, 1.0),
        "low_grade": low_grade,
    }


def _anatomy(rng: np.random.Generator, head: dict, z: float) -> np.ndarray:
    """Label map (224, 224) int of the healthy head at slice z."""
    yy, xx = grid()
    scale = np.sqrt(max(1 - ((z - 15) / 95) ** 2, 0.05))
    ay, ax = head["ay"] * scale, head["ax"] * scale
    c, s = np.cos(head["angle"]), np.sin(head["angle"])
    dy, dx = c * (yy - head["cy"]) - s * (xx - head["cx"]), s * (yy - head["cy"]) + c * (xx - head["cx"])
    w = dx / ax + 1j * dy / ay
    rn = np.abs(w)
    unit = w / np.maximum(rn, 1e-12)
    depth = (outline(unit, head["coeffs"]) - rn) * (ay + ax) / 2  # pixels inward from the head edge
    labels = np.zeros((SIZE, SIZE), dtype=np.int64)
    labels[depth >= 0] = SCALP
    labels[depth >= head["scalp"]] = SKULL
    inner = head["scalp"] + head["skull"]
    labels[depth >= inner] = CSF
    brain_depth = depth - inner - head["gap"]
    brain = brain_depth >= 0
    labels[brain] = WM
    # Sulci: CSF clefts at quasi-periodic angles, their depth varying along the cortex.
    phase = (
        head["n_sulci"] * np.angle(unit) / (2 * np.pi) + head["sulcus_phase"] + outline(unit, head["sulcus_wobble"]) - 1
    )
    arc = np.abs(phase - np.floor(phase) - 0.5) * 2 * np.pi * np.maximum(rn * (ay + ax) / 2, 1) / head["n_sulci"]
    # Each sulcus (integer part of the phase) gets its own depth, so the pattern is not a clock face.
    sulcus_id = np.floor(phase).astype(np.int64) % len(head["sulcus_factors"])
    sulcus_depth = head["sulcus_depth"] * scale * head["sulcus_factors"][sulcus_id]
    csf = brain & (arc < 0.8) & (brain_depth < sulcus_depth)
    csf |= brain & (np.abs(dx) < 1.1) & (brain_depth < 28 * scale)  # interhemispheric fissure
    v = 1 - ((z - 5) / 22) ** 2
    if v > 0:
        for side in (-1, 1):
            aspect = head["vent_width"] / head["vent_len"]
            r, _ = polar(
                head["cy"] - 4,
                head["cx"] + side * head["vent_sep"] * np.sqrt(v),
                np.pi / 2 + head["angle"] + side * 0.25,
                aspect,
            )
            csf |= r <= head["vent_len"] * np.sqrt(v)
            r, _ = polar(head["cy"] + 6, head["cx"] + side * (head["vent_sep"] + 16), 0, 1.6)
            labels[brain & (r < 9 * np.sqrt(v))] = DEEP_GM
    tissue = brain & ~csf
    gm = tissue & (ndimage.distance_transform_edt(tissue) < head["gm"])
    labels[gm] = GM
    labels[csf] = CSF
    if v > 0:
        for side in (-1, 1):
            box, r = disk_patch(head["cy"] + rng.uniform(-8, 8), head["cx"] + side * head["vent_sep"] * np.sqrt(v), 3.0)
            labels[box][csf[box] & (r < rng.uniform(1.5, 3.0))] = PLEXUS
    # Enhancing cortical vessels: thin T1ce-bright curves along the surface, an ET-rim look-alike.
    n_vessels = int(rng.integers(3, 7))
    edge = np.argwhere(brain & (brain_depth < 2))
    segments, widths = [], []
    for y0, x0 in edge[rng.integers(0, len(edge), n_vessels)] if len(edge) else []:
        pts = random_walk(rng, (y0, x0), rng.uniform(0, 2 * np.pi), 10, 1.5, 0.35)
        segments.append(path_segments(pts))
        widths.append(np.full((len(pts) - 1, 2), rng.uniform(1.0, 1.8)))
    if segments:
        cov, _ = capsules(np.vstack(segments), np.vstack(widths))
        labels[(cov > 0.5) & (labels >= CSF)] = VESSEL
    return labels


def _add_tumour(labels: np.ndarray, tumour: dict, z: float) -> None:
    """Paint oedema, core and rim of the slice at z into ``labels`` in place."""
    dz = z - tumour["zc"]
    s_core = np.sqrt(max(1 - (dz / tumour["rz"]) ** 2, 0.0))
    s_oed = np.sqrt(max(1 - (dz / (tumour["rz"] + tumour["extra_z"])) ** 2, 0.0))
    if s_oed == 0:
        return
    r, unit = polar(tumour["cy"], tumour["cx"], tumour["angle"])
    brain = (labels >= CSF) & (labels != SKULL)
    r_oed = (tumour["rc"] * s_core + tumour["extra"] * s_oed) * outline(unit, tumour["oedema_coeffs"])
    labels[(r <= r_oed) & np.isin(labels, (GM, WM, DEEP_GM, VESSEL))] = OEDEMA
    r_core = tumour["rc"] * s_core * outline(unit, tumour["core_coeffs"])
    core = brain & (r <= r_core) & (r_core >= 3)
    if tumour["low_grade"]:
        labels[core] = NET
        return
    rim = core & (r > r_core - tumour["rim"] * np.clip(outline(unit, tumour["rim_coeffs"]), 0.5, 1.6))
    labels[core] = NCR
    labels[rim] = ET


def _clean_small(labels: np.ndarray) -> None:
    """Fold sub-regions below a visible size into their parent, so masks stay meaningful."""
    if 0 < (labels == ET).sum() < 8:
        labels[labels == ET] = NCR
    core = np.isin(labels, (NCR, NET, ET))
    if 0 < core.sum() < 12:
        labels[core] = OEDEMA
    if 0 < (labels == OEDEMA).sum() < 8:
        labels[labels == OEDEMA] = WM


def _render(rng: np.random.Generator, labels: np.ndarray, contrast: float) -> np.ndarray:
    """uint8 (224, 224, 3) image (FLAIR, T1ce, T2) from a label map."""
    table = TABLE.copy()
    table[OEDEMA, [0, 2]] = table[WM, [0, 2]] + contrast * (TABLE[OEDEMA, [0, 2]] - table[WM, [0, 2]])
    image = table[labels]
    image *= (1 + 0.05 * smooth_noise(rng, 1.5))[..., None]
    tumour = np.isin(labels, (OEDEMA, NCR, NET, ET))
    image[tumour] *= (1 + 0.08 * smooth_noise(rng, 2.5))[tumour][:, None]
    image = ndimage.gaussian_filter(image, (0.8, 0.8, 0))
    image *= np.stack([bias_field(rng, rng.uniform(0.1, 0.3)) for _ in range(3)], axis=-1)
    sigma = rng.uniform(0.015, 0.045)
    image = np.hypot(image + rng.normal(0, sigma, image.shape), rng.normal(0, sigma, image.shape))
    head = labels > BG
    out = np.zeros(image.shape, dtype=np.uint8)
    for ch in range(3):
        values = image[..., ch][head]
        zscore = (image[..., ch] - values.mean()) / (values.std() + 1e-8)
        out[..., ch] = np.where(head, to_uint8(zscore, -3, 3), 0)
    return out


def _slice_positions(rng: np.random.Generator, tumour: dict | None) -> list[float]:
    if tumour is None:
        return sorted(rng.uniform(*Z_RANGE, N_SLICES))
    half = tumour["rz"] + tumour["extra_z"]
    inside = tumour["zc"] + half * rng.uniform(-0.8, 0.8, N_SLICES - 1)
    below, above = tumour["zc"] - half - rng.uniform(4, 12), tumour["zc"] + half + rng.uniform(4, 12)
    outside = below if (rng.random() < 0.5 and below >= Z_RANGE[0]) or above > Z_RANGE[1] else above
    return sorted([*inside, outside])


def _caption(labels: np.ndarray) -> str:
    parts = [
        name
        for code, name in (
            (ET, "enhancing tumour"),
            (NCR, "necrotic core"),
            (NET, "non-enhancing tumour core"),
            (OEDEMA, "oedema"),
        )
        if (labels == code).any()
    ]
    if not parts:
        return "brain MRI (FLAIR, T1ce, T2) without tumour"
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"brain MRI (FLAIR, T1ce, T2) with glioma: {listed}"


def render_subject(rng: np.random.Generator) -> list[PhantomView]:
    """All slices of one subject: ``N_SLICES`` views, at least one without tumour."""
    head = _head(rng)
    tumour = _tumour(rng, head) if rng.random() < P_TUMOUR else None
    views, used = [], set()
    for z in _slice_positions(rng, tumour):
        labels = _anatomy(rng, head, z)
        if tumour is not None:
            _add_tumour(labels, tumour, z)
            _clean_small(labels)
        image = _render(rng, labels, tumour["contrast"] if tumour else 1.0)
        masks = {
            "whole_tumour": np.isin(labels, (OEDEMA, NCR, NET, ET)),
            "tumour_core": np.isin(labels, (NCR, NET, ET)),
            "enhancing_tumour": labels == ET,
            "oedema": labels == OEDEMA,
        }
        zi = int(round(z - Z_RANGE[0]))
        while zi in used:
            zi += 1
        used.add(zi)
        descriptors = {"tumour_core": ["non-enhancing tumour core"]} if tumour and tumour["low_grade"] else {}
        views.append(
            PhantomView(f"z{zi:03d}", image, {k: m for k, m in masks.items() if m.any()}, _caption(labels), descriptors)
        )
    return views
