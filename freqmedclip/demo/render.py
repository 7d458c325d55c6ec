"""Rendering for the demo: colour-mapped overlays, colour bars, contours and markers, all as uint8 arrays.

Colours come from matplotlib colormaps (as 256-entry lookup tables), text from PIL's built-in font, so a panel
costs a few milliseconds and no matplotlib figure. Colour bars are cached per (height, colormap, labels).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

VIEW_MAX_SIDE = 512
BAR_HEIGHT = 32
GREEN, RED, BLUE, YELLOW = (0, 200, 0), (230, 30, 30), (40, 90, 255), (255, 220, 0)


@lru_cache(maxsize=16)
def colormap_lut(name: str) -> np.ndarray:
    """(256, 3) uint8 lookup table of a matplotlib colormap."""
    import matplotlib

    return np.round(matplotlib.colormaps[name](np.linspace(0.0, 1.0, 256))[:, :3] * 255).astype(np.uint8)


def apply_colormap(values: np.ndarray, name: str) -> np.ndarray:
    """values: (H, W) in [0, 1] (clipped) -> (H, W, 3) uint8."""
    index = np.round(np.clip(np.nan_to_num(values), 0.0, 1.0) * 255).astype(np.uint8)
    return colormap_lut(name)[index]


def view_size(height: int, width: int, max_side: int = VIEW_MAX_SIDE) -> tuple[int, int]:
    """(h, w) of the display copy: the longer side at most ``max_side``, aspect ratio kept."""
    scale = min(1.0, max_side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize_rgb(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 -> (h, w, 3) uint8, bilinear."""
    if image.shape[:2] == tuple(size):
        return image
    return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR))


def resize_map(values: np.ndarray, size: tuple[int, int], nearest: bool = False) -> np.ndarray:
    """(H, W) float or bool -> (h, w) of the same kind (bilinear for floats, nearest for masks)."""
    if values.shape == tuple(size):
        return values
    if values.dtype == bool:
        resized = Image.fromarray(values.astype(np.uint8) * 255).resize((size[1], size[0]), Image.NEAREST)
        return np.asarray(resized) > 127
    method = Image.NEAREST if nearest else Image.BILINEAR
    return np.asarray(Image.fromarray(values.astype(np.float32)).resize((size[1], size[0]), method))


def blend(base: np.ndarray, colour: np.ndarray, alpha: float | np.ndarray) -> np.ndarray:
    """base, colour: (H, W, 3) uint8; alpha: scalar or (H, W) in [0, 1] -> (H, W, 3) uint8."""
    alpha = np.asarray(alpha, dtype=np.float32)
    if alpha.ndim == 2:
        alpha = alpha[..., None]
    mixed = base.astype(np.float32) * (1.0 - alpha) + colour.astype(np.float32) * alpha
    return np.round(mixed).astype(np.uint8)


def heat_overlay(base: np.ndarray, heat: np.ndarray, cmap: str = "jet", alpha: float = 0.5) -> np.ndarray:
    """A [0, 1] map (any size, resized bilinearly) colour-mapped over base (h, w, 3) uint8."""
    heat = resize_map(heat.astype(np.float32), base.shape[:2])
    return blend(base, apply_colormap(heat, cmap), alpha)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


@lru_cache(maxsize=64)
def colorbar(width: int, cmap: str, high: str, low: str, middle: str = "") -> np.ndarray:
    """A horizontal colour bar (BAR_HEIGHT, width, 3) uint8: ``low`` on the left, ``high`` on the right.

    It goes below a panel, where Gradio overlays no label or button.
    """
    canvas = np.full((BAR_HEIGHT, width, 3), 255, dtype=np.uint8)
    left, right = 4, max(5, width - 4)
    canvas[3:13, left:right] = apply_colormap(np.linspace(0.0, 1.0, right - left)[None].repeat(10, axis=0), cmap)
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    font = _font(12)
    draw.text((left, 15), low, fill=(0, 0, 0), font=font)
    draw.text((right, 15), high, fill=(0, 0, 0), font=font, anchor="ra")
    if middle:
        draw.text(((left + right) // 2, 15), middle, fill=(0, 0, 0), font=font, anchor="ma")
    return np.asarray(image)


def with_colorbar(image: np.ndarray, cmap: str, high: str, low: str, middle: str = "") -> np.ndarray:
    """image (H, W, 3) uint8 with a colour bar below it: (H + BAR_HEIGHT, W, 3)."""
    return np.concatenate([image, colorbar(image.shape[1], cmap, high, low, middle)], axis=0)


def heat_panel(base: np.ndarray, heat: np.ndarray, cmap: str = "jet", alpha: float = 0.5,
               high: str = "1", low: str = "0") -> np.ndarray:
    """A [0, 1] map over the image plus its colour bar: (h + BAR_HEIGHT, w, 3) uint8."""
    return with_colorbar(heat_overlay(base, heat, cmap, alpha), cmap, high, low)


def signed_panel(values: np.ndarray, scale: float, size: tuple[int, int], cmap: str = "RdBu_r") -> np.ndarray:
    """A signed map shown on its own on a symmetric scale [-scale, scale] (clipped beyond):
    (h + BAR_HEIGHT, w, 3) uint8."""
    unit = 0.5 + 0.5 * values / max(scale, 1e-12)
    rgb = apply_colormap(resize_map(unit.astype(np.float32), size, nearest=True), cmap)
    return with_colorbar(rgb, cmap, f"+{scale:.3g}", f"-{scale:.3g}", "0")


def gray_panel(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A map min-max scaled to gray, with a colour bar of its range: (h + BAR_HEIGHT, w, 3) uint8."""
    low, high = float(values.min()), float(values.max())
    unit = (values - low) / (high - low) if high > low else np.zeros_like(values)
    rgb = apply_colormap(resize_map(unit.astype(np.float32), size, nearest=True), "gray")
    return with_colorbar(rgb, "gray", f"{high:.3g}", f"{low:.3g}")


def outline(mask: np.ndarray, thickness: int = 1) -> np.ndarray:
    """Inner boundary of a (H, W) bool mask, ``thickness`` pixels wide."""
    eroded = ndimage.binary_erosion(mask, iterations=thickness, border_value=0)
    return mask & ~eroded


def mask_overlay(base: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int] = RED,
                 alpha: float = 0.35) -> np.ndarray:
    """Translucent fill and a solid contour of a (H, W) bool mask over base (H, W, 3) uint8."""
    mask = resize_map(mask, base.shape[:2])
    if not mask.any():
        return base.copy()
    paint = np.empty_like(base)
    paint[:] = colour
    out = blend(base, paint, mask.astype(np.float32) * alpha)
    out[outline(mask, max(1, round(max(base.shape[:2]) / 256)))] = colour
    return out


def contours(base: np.ndarray, masks: list[tuple[np.ndarray, tuple[int, int, int]]]) -> np.ndarray:
    """Solid contours of several masks (each (H, W) bool, resized to base) over base (H, W, 3) uint8."""
    out = base.copy()
    thickness = max(1, round(max(base.shape[:2]) / 200))
    for mask, colour in masks:
        out[outline(resize_map(mask, base.shape[:2]), thickness)] = colour
    return out


def mark(image: np.ndarray, x: float, y: float, colour: tuple[int, int, int] = YELLOW) -> np.ndarray:
    """A cross at pixel (x, y) on image (H, W, 3) uint8."""
    out = Image.fromarray(image.copy())
    draw = ImageDraw.Draw(out)
    arm = max(4, round(max(image.shape[:2]) / 40))
    for width, fill in ((5, (0, 0, 0)), (2, colour)):
        draw.line([(x - arm, y), (x + arm, y)], fill=fill, width=width)
        draw.line([(x, y - arm), (x, y + arm)], fill=fill, width=width)
    return np.asarray(out)


def halo_outline(base: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int] = YELLOW) -> np.ndarray:
    """A (H, W) bool mask as a two-tone contour (dark halo, bright line) over base (H, W, 3) uint8: visible on
    gray and on pseudo-coloured images alike, and it hides no pixel inside the mask."""
    mask = resize_map(mask, base.shape[:2])
    out = base.copy()
    if not mask.any():
        return out
    line = max(1, round(max(base.shape[:2]) / 256))
    outer = ndimage.binary_dilation(mask, iterations=line + 1) & ~ndimage.binary_erosion(mask, iterations=line + 1,
                                                                                        border_value=0)
    out[outer] = (0, 0, 0)
    out[outline(mask, line)] = colour
    return out


def titled(image: np.ndarray, title: str, height: int = 18) -> np.ndarray:
    """image (H, W, 3) uint8 with a white title strip above it: (H + height, W, 3)."""
    strip = Image.fromarray(np.full((height, image.shape[1], 3), 255, dtype=np.uint8))
    ImageDraw.Draw(strip).text((4, 2), title, fill=(0, 0, 0), font=_font(12))
    return np.concatenate([np.asarray(strip), image], axis=0)


def notice_panel(base: np.ndarray, lines: list[str]) -> np.ndarray:
    """The image dimmed to gray with ``lines`` of text on it and no heat map: an explicit empty state
    (h + BAR_HEIGHT, w, 3), the same size as a heat panel."""
    gray = base.mean(axis=2, keepdims=True).repeat(3, axis=2)
    dimmed = Image.fromarray(np.round(gray * 0.35 + 150).astype(np.uint8))
    draw = ImageDraw.Draw(dimmed)
    font = _font(14)
    for i, line in enumerate(lines):
        draw.text((base.shape[1] // 2, base.shape[0] // 2 + 18 * (i - len(lines) / 2)), line, fill=(0, 0, 0),
                  font=font, anchor="ma")
    return np.concatenate([np.asarray(dimmed), np.full((BAR_HEIGHT, base.shape[1], 3), 255, np.uint8)], axis=0)


def scaled_heat_panel(base: np.ndarray, values: np.ndarray, scale: float, unit: str,
                      cmap: str = "inferno") -> np.ndarray:
    """A map >= 0 on the fixed scale [0, scale] (saturating above), drawn with an opacity that grows with the
    value, so a map near 0 leaves the image visible instead of painting it: (h + BAR_HEIGHT, w, 3) uint8."""
    unit_values = np.clip(resize_map(values.astype(np.float32), base.shape[:2]) / scale, 0.0, 1.0)
    heat = blend(base, apply_colormap(unit_values, cmap), 0.8 * unit_values)
    return with_colorbar(heat, cmap, f"{scale:.3g} {unit}", "0")


RATIO_RANGE = 8.0   # FFBI panels: the colour scale runs from 1/8 to 8 times uniform attention (log scale)


def ratio_colours(ratio: np.ndarray, cmap: str = "RdBu_r") -> np.ndarray:
    """(H, W) ratios to uniform -> (H, W, 3) uint8 on a diverging log scale centred on 1 (white)."""
    unit = 0.5 + 0.5 * np.log(np.clip(ratio, 1e-6, None)) / np.log(RATIO_RANGE)
    return apply_colormap(unit.astype(np.float32), cmap)


def ratio_panel(base: np.ndarray, ratio: np.ndarray, cmap: str = "RdBu_r", alpha: float = 0.65) -> np.ndarray:
    """An attention map as its ratio to uniform (14, 14 -> resized nearest) over base: a uniform map gives one
    flat colour (white), (h + BAR_HEIGHT, w, 3) uint8."""
    colours = ratio_colours(resize_map(ratio.astype(np.float32), base.shape[:2], nearest=True), cmap)
    return with_colorbar(blend(base, colours, alpha), cmap, f"{RATIO_RANGE:g}x uniform",
                         f"1/{RATIO_RANGE:g}x", "uniform")
