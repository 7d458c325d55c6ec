"""Vectorised 2D drawing primitives for the phantom benchmark (see ``phantoms.py``).

Shapes are star-shaped regions ``r <= R(theta)`` with R a short Fourier series, so one set of
harmonics describes a lesion in every slice or view (cross-sections of one 3D object share their
outline and only scale). Thin structures (spicules, vessels, ligaments, ribs) are rasterised as
capsules by an exact point-to-segment distance evaluated inside each segment's bounding box.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from scipy import ndimage

SIZE = 224


@dataclass
class PhantomView:
    """One rendered image: ``image`` uint8 (224, 224) or (224, 224, 3); ``masks`` holds only the
    structures present, as bool (224, 224); ``descriptors`` adds instance-specific prompts."""

    view: str
    image: np.ndarray
    masks: dict[str, np.ndarray]
    caption: str
    descriptors: dict[str, list[str]] = field(default_factory=dict)


@lru_cache(maxsize=4)
def grid(size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (yy, xx), each float64 (size, size)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    yy.flags.writeable = False
    xx.flags.writeable = False
    return yy, xx


def harmonics(rng: np.random.Generator, n: int, amplitude: float, decay: float = 1.0) -> np.ndarray:
    """Random outline harmonics (n, 3): rows (k, a_k, phase_k) for k = 2..n+1, a_k ~ amplitude / k^decay."""
    k = np.arange(2, n + 2, dtype=np.float64)
    a = amplitude * rng.uniform(0.3, 1.0, n) / k**decay
    phase = rng.uniform(0, 2 * np.pi, n)
    return np.stack([k, a, phase], axis=1)


def polar(
    cy: float, cx: float, angle: float = 0.0, aspect: float = 1.0, size: int = SIZE
) -> tuple[np.ndarray, np.ndarray]:
    """Radius (size, size) float and unit direction (size, size) complex around (cy, cx).

    The u axis is rotated by ``angle`` from the image x axis and the v axis is divided by
    ``aspect``, so ``r <= R`` is an ellipse with semi-axes R (along u) and aspect * R. The
    direction is returned as a complex number rather than an angle: outlines are then
    polynomials in it (see ``outline``), avoiding a transcendental call per harmonic.
    """
    yy, xx = grid(size)
    dy, dx = yy - cy, xx - cx
    c, s = np.cos(angle), np.sin(angle)
    w = (c * dx + s * dy) + 1j * ((c * dy - s * dx) / aspect)
    r = np.abs(w)
    return r, w / np.maximum(r, 1e-12)


def outline(unit: np.ndarray, coeffs: np.ndarray) -> np.ndarray:
    """Relative radius 1 + sum_k a_k cos(k theta + phase_k) for unit = exp(i theta), by Horner's rule."""
    kmax = int(coeffs[:, 0].max())
    poly = np.zeros(kmax + 1, dtype=np.complex128)
    for k, a, phase in coeffs:
        poly[int(k)] += a * np.exp(1j * phase)
    acc = np.full(unit.shape, poly[kmax])
    for k in range(kmax - 1, -1, -1):
        acc *= unit
        acc += poly[k]
    return 1.0 + acc.real


def disk_patch(cy: float, cx: float, radius: float, size: int = SIZE) -> tuple[tuple[slice, slice], np.ndarray]:
    """Bounding-box slices of a disk and the distance (h, w) to its centre inside that box,
    for drawing small round objects without touching the whole image."""
    r0, r1 = max(int(cy - radius - 1), 0), min(int(cy + radius + 2), size)
    c0, c1 = max(int(cx - radius - 1), 0), min(int(cx + radius + 2), size)
    yy, xx = np.arange(r0, r1, dtype=np.float64)[:, None], np.arange(c0, c1, dtype=np.float64)[None, :]
    return (slice(r0, r1), slice(c0, c1)), np.hypot(yy - cy, xx - cx)


def capsules(segments: np.ndarray, widths: np.ndarray, size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Rasterise segments as capsules.

    Args:
        segments: (N, 4) rows (y0, x0, y1, x1) in pixels.
        widths: (N, 2) full width at the start and at the end of each segment (linear taper).
    Returns:
        coverage (size, size) float in [0, 1] (1 inside, linear 1-px ramp at the edge) and the
        index (size, size) int of the segment that covers each pixel (-1 where none).
    """
    coverage = np.zeros((size, size))
    owner = np.full((size, size), -1, dtype=np.int64)
    for i, ((y0, x0, y1, x1), (w0, w1)) in enumerate(zip(segments, widths)):
        pad = max(w0, w1) / 2 + 2
        r0, r1 = int(max(min(y0, y1) - pad, 0)), int(min(max(y0, y1) + pad + 1, size))
        c0, c1 = int(max(min(x0, x1) - pad, 0)), int(min(max(x0, x1) + pad + 1, size))
        if r0 >= r1 or c0 >= c1:
            continue
        yy, xx = np.arange(r0, r1, dtype=np.float64)[:, None], np.arange(c0, c1, dtype=np.float64)[None, :]
        dy, dx = y1 - y0, x1 - x0
        t = np.clip(((yy - y0) * dy + (xx - x0) * dx) / max(dy * dy + dx * dx, 1e-9), 0, 1)
        dist = np.hypot(yy - (y0 + t * dy), xx - (x0 + t * dx))
        cov = np.clip((w0 + (w1 - w0) * t) / 2 - dist + 0.5, 0, 1)
        window = coverage[r0:r1, c0:c1]
        better = cov > window
        window[better] = cov[better]
        owner[r0:r1, c0:c1][better] = i
    return coverage, owner


def random_walk(
    rng: np.random.Generator, start: tuple[float, float], heading: float, steps: int, step: float, turn: float
) -> np.ndarray:
    """Points (steps + 1, 2) of a smoothly turning path (curvilinear vessels, ligaments)."""
    headings = heading + np.cumsum(rng.normal(0, turn, steps))
    moves = step * np.stack([np.sin(headings), np.cos(headings)], axis=1)
    return np.vstack([start, np.asarray(start) + np.cumsum(moves, axis=0)])


def path_segments(points: np.ndarray) -> np.ndarray:
    """Consecutive point pairs (N-1, 4) as (y0, x0, y1, x1)."""
    return np.hstack([points[:-1], points[1:]])


def power_law_noise(rng: np.random.Generator, beta: float, size: int = SIZE) -> np.ndarray:
    """Gaussian field (size, size) with power spectrum 1/f^beta, zero mean and unit std.

    beta ~ 3 is the classical model of mammographic parenchyma (Burgess et al. 2001)."""
    f = np.hypot(*np.meshgrid(np.fft.fftfreq(size), np.fft.rfftfreq(size), indexing="ij"))
    f[0, 0] = 1.0
    spectrum = (rng.normal(size=f.shape) + 1j * rng.normal(size=f.shape)) * f ** (-beta / 2)
    spectrum[0, 0] = 0.0
    field = np.fft.irfft2(spectrum, s=(size, size))
    return (field - field.mean()) / (field.std() + 1e-12)


def smooth_noise(rng: np.random.Generator, sigma: float, size: int = SIZE) -> np.ndarray:
    """Gaussian-filtered white noise (size, size), unit std."""
    field = ndimage.gaussian_filter(rng.normal(size=(size, size)), sigma, mode="wrap")
    return field / (field.std() + 1e-12)


def bias_field(rng: np.random.Generator, strength: float, size: int = SIZE) -> np.ndarray:
    """Smooth multiplicative field (size, size) around 1: exp of a random quadratic surface."""
    yy, xx = grid(size)
    y, x = yy / size - 0.5, xx / size - 0.5
    c = rng.normal(0, 1, 5)
    surface = c[0] * x + c[1] * y + c[2] * x * y + c[3] * x * x + c[4] * y * y
    surface = surface / (np.abs(surface).max() + 1e-12)
    return np.exp(strength * surface)


def to_uint8(image: np.ndarray, low: float, high: float) -> np.ndarray:
    """Linear map of [low, high] to [0, 255] with clipping; uint8, same shape."""
    scaled = (np.asarray(image, dtype=np.float64) - low) / max(high - low, 1e-12)
    return np.round(np.clip(scaled, 0, 1) * 255).astype(np.uint8)
