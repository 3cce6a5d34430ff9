"""Heat-map overlays in anomalib's visual style: a "jet" colour map blended over the image, the predicted mask outlined
in red, and an optional legend strip of text lines below. Only numpy, Pillow and scipy are needed here.

Images are (H, W, 3) uint8 RGB arrays or PIL images; maps and masks are (H, W) at the image's resolution.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

if TYPE_CHECKING:
    from vlad.result import AnomalyResult

# matplotlib's "jet" segment data: (position, value) knots per channel, linearly interpolated.
_JET_KNOTS: tuple[tuple[tuple[float, float], ...], ...] = (
    ((0.0, 0.0), (0.35, 0.0), (0.66, 1.0), (0.89, 1.0), (1.0, 0.5)),  # red
    ((0.0, 0.0), (0.125, 0.0), (0.375, 1.0), (0.64, 1.0), (0.91, 0.0), (1.0, 0.0)),  # green
    ((0.0, 0.5), (0.11, 1.0), (0.34, 1.0), (0.65, 0.0), (1.0, 0.0)),  # blue
)
_LEGEND_PADDING = 4
_LEGEND_LINE_SPACING = 2


def jet_colormap(values: np.ndarray) -> np.ndarray:
    """Maps values in [0, 1] to the classic "jet" colours (dark blue, blue, cyan, yellow, red, dark red).

    Args:
        values: array of any shape ``(...)``; values are clipped to [0, 1] and NaN maps to 0.

    Returns:
        (..., 3) uint8 RGB array; each channel is the piecewise-linear jet value times 255, rounded half up.
    """
    v = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0, posinf=1.0, neginf=0.0)
    v = np.clip(v, 0.0, 1.0)
    channels = [np.interp(v, [k[0] for k in knots], [k[1] for k in knots]) for knots in _JET_KNOTS]
    return np.floor(np.stack(channels, axis=-1) * 255.0 + 0.5).astype(np.uint8)


def normalize_map(anomaly_map: np.ndarray, threshold: float, scale: float) -> np.ndarray:
    """Maps raw anomaly-map values so the threshold lands on 0.5, for colouring consistent with the verdict.

    Args:
        anomaly_map: array of any shape, typically (H, W), in raw map units. NaN stays NaN.
        threshold: the pixel threshold in raw units; it maps to 0.5.
        scale: raw span that maps to 1.0 (positive); ``threshold +- scale / 2`` map to 1 and 0.

    Returns:
        float32 array of the same shape: ``clip((anomaly_map - threshold) / scale + 0.5, 0, 1)``.

    Raises:
        ValueError: if ``threshold`` is not finite or ``scale`` is not a finite positive number.
    """
    if not _is_finite_number(threshold):
        raise ValueError(f"threshold must be a finite number, got {threshold!r}")
    if not _is_finite_number(scale) or scale <= 0:
        raise ValueError(f"scale must be a finite positive number, got {scale!r}")
    m = np.asarray(anomaly_map, dtype=np.float64)
    return np.clip((m - float(threshold)) / float(scale) + 0.5, 0.0, 1.0).astype(np.float32)


def overlay(
    image: Image.Image | np.ndarray,
    heat: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    alpha: float = 0.5,
    contour_color: tuple[int, int, int] = (255, 0, 0),
    contour_width: int = 2,
) -> Image.Image:
    """Blends a jet-coloured heat map over an image and outlines the predicted mask.

    Args:
        image: PIL image (any mode; converted to RGB) or uint8 array of shape (H, W) or (H, W, 3).
        heat: (H, W) values in [0, 1] (clipped; NaN counts as 0), at the image's resolution.
        mask: optional (H, W) bool mask at the image's resolution; its boundary pixels (mask pixels with a
            4-neighbour outside the mask or on the image edge) are drawn in ``contour_color``. None or all-False draws
            nothing.
        alpha: heat-map weight in [0, 1]: ``out = (1 - alpha) * image + alpha * jet(heat)``.
        contour_color: RGB colour of the outline, three ints in [0, 255].
        contour_width: outline thickness in pixels (>= 1); the boundary is dilated ``contour_width - 1`` times.

    Returns:
        RGB PIL image of exactly the input image's size.

    Raises:
        ValueError: if the image, heat or mask shapes are invalid or differ, or an option is out of range.
    """
    rgb = _image_to_rgb_array(image)
    _check_overlay_options(alpha, contour_color, contour_width)
    heat_arr = np.asarray(heat)
    if heat_arr.shape != rgb.shape[:2]:
        raise ValueError(f"heat shape {heat_arr.shape} differs from image shape (H, W) = {rgb.shape[:2]}")
    blended = (1.0 - alpha) * rgb.astype(np.float64) + alpha * jet_colormap(heat_arr).astype(np.float64)
    out = np.floor(blended + 0.5).clip(0, 255).astype(np.uint8)
    if mask is not None:
        out[_contour_pixels(_check_mask(mask, rgb.shape[:2]), contour_width)] = contour_color
    return Image.fromarray(out)


def save_overlay(
    path: str | Path,
    image: Image.Image | np.ndarray,
    heat: np.ndarray,
    mask: np.ndarray | None = None,
    **kw: Any,
) -> Path:
    """Renders :func:`overlay` and writes it as a PNG, creating parent folders.

    Args:
        path: output file; written in PNG format whatever its suffix.
        image: PIL image or uint8 (H, W) / (H, W, 3) array.
        heat: (H, W) values in [0, 1] at the image's resolution.
        mask: optional (H, W) bool mask at the image's resolution.
        **kw: keyword options of :func:`overlay` (``alpha``, ``contour_color``, ``contour_width``).

    Returns:
        The path written, as a :class:`~pathlib.Path`.
    """
    out_path = Path(path)
    img = overlay(image, heat, mask, **kw)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    img.save(out_path, format="PNG")
    return out_path


def legend_strip(lines: Sequence[str], width: int) -> Image.Image:
    """Draws text lines in black on a white strip, with Pillow's default font.

    Lines longer than the strip are word-wrapped; a single word wider than the strip is cut off at the edge.

    Args:
        lines: text lines, top to bottom (embedded newlines start new lines).
        width: strip width in pixels (>= 1), normally the overlay's width.

    Returns:
        RGB PIL image of size ``(width, height)``, with height fitted to the wrapped lines plus padding.

    Raises:
        ValueError: if ``lines`` is a single string or holds non-strings, or ``width`` is not a positive int.
    """
    if isinstance(lines, str) or not all(isinstance(line, str) for line in lines):
        raise ValueError(f"lines must be a list of str, got {lines!r}")
    if isinstance(width, bool) or not isinstance(width, (int, np.integer)) or width < 1:
        raise ValueError(f"width must be a positive integer, got {width!r}")
    font = ImageFont.load_default()
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = [w for line in lines for part in line.split("\n") for w in _wrap(part, draw, font, width)]
    line_height = _line_height(draw, font)
    height = 2 * _LEGEND_PADDING + len(wrapped) * line_height
    strip = Image.new("RGB", (int(width), height), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for i, text in enumerate(wrapped):
        draw.text((_LEGEND_PADDING, _LEGEND_PADDING + i * line_height), text, fill=(0, 0, 0), font=font)
    return strip


def overlay_with_legend(overlay_img: Image.Image, lines: Sequence[str]) -> Image.Image:
    """Stacks a :func:`legend_strip` of ``lines`` below an overlay image.

    Args:
        overlay_img: the overlay, of size (W, H).
        lines: text lines for the legend; when empty, ``overlay_img`` itself is returned unchanged.

    Returns:
        RGB PIL image of size (W, H + strip height), or ``overlay_img`` when ``lines`` is empty.
    """
    if not lines:
        return overlay_img
    strip = legend_strip(lines, overlay_img.width)
    out = Image.new("RGB", (overlay_img.width, overlay_img.height + strip.height), (255, 255, 255))
    out.paste(overlay_img.convert("RGB"), (0, 0))
    out.paste(strip, (0, overlay_img.height))
    return out


def _image_to_rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """Returns an (H, W, 3) uint8 copy of a PIL image or a uint8 (H, W) / (H, W, 3) array."""
    if isinstance(image, Image.Image):
        return np.array(image.convert("RGB"), dtype=np.uint8)
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise ValueError(f"image array must be uint8, got dtype {arr.dtype}")
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] != 3 or min(arr.shape[:2]) == 0:
        raise ValueError(f"image array must have shape (H, W) or (H, W, 3) with H, W > 0, got {np.shape(image)}")
    return arr.copy()


def _check_mask(mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Validates an (H, W) mask against the image's (H, W) and returns it as bool."""
    arr = np.asarray(mask)
    if arr.shape != shape:
        raise ValueError(f"mask shape {arr.shape} differs from image shape (H, W) = {shape}")
    return arr.astype(bool, copy=False)


def _contour_pixels(mask: np.ndarray, width: int) -> np.ndarray:
    """(H, W) bool: boundary pixels of an (H, W) bool mask, thickened by ``width - 1`` dilations."""
    boundary = mask & ~ndimage.binary_erosion(mask, border_value=0)
    if width > 1 and boundary.any():  # iterations=0 would mean "until nothing changes" in scipy
        boundary = ndimage.binary_dilation(boundary, iterations=width - 1)
    return boundary


def _check_overlay_options(alpha: float, contour_color: tuple[int, int, int], contour_width: int) -> None:
    """Raises ValueError for an alpha outside [0, 1], a bad RGB colour or a non-positive contour width."""
    if not _is_finite_number(alpha) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    color = tuple(contour_color)
    if len(color) != 3 or not all(isinstance(c, (int, np.integer)) and 0 <= c <= 255 for c in color):
        raise ValueError(f"contour_color must be three ints in [0, 255], got {contour_color!r}")
    if isinstance(contour_width, bool) or not isinstance(contour_width, (int, np.integer)) or contour_width < 1:
        raise ValueError(f"contour_width must be a positive integer, got {contour_width!r}")


def _wrap(text: str, draw: ImageDraw.ImageDraw, font: Any, width: int) -> list[str]:
    """Greedy word wrap of one line so each piece fits in ``width - 2 * padding`` pixels (at least one piece)."""
    room = width - 2 * _LEGEND_PADDING
    pieces: list[str] = []
    current = ""
    for word in text.split(" "):
        candidate = word if not current else f"{current} {word}"
        if current and draw.textlength(candidate, font=font) > room:
            pieces.append(current)
            candidate = word
        current = candidate
    pieces.append(current)
    return pieces


def _line_height(draw: ImageDraw.ImageDraw, font: Any) -> int:
    """Pixel advance of one text line: the lowest ink below the drawing origin plus line spacing."""
    _, _, _, bottom = draw.textbbox((0, 0), "Ag|", font=font)
    return int(math.ceil(bottom)) + _LEGEND_LINE_SPACING


def _is_finite_number(value: object) -> bool:
    """True for a real int/float (not bool) that is finite."""
    return (
        isinstance(value, (int, float, np.integer, np.floating))
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


def render_result(image: Image.Image | np.ndarray, result: AnomalyResult, *, alpha: float = 0.5) -> Image.Image:
    """The overlay for a result: the map coloured so its pixel threshold sits at mid-scale, regions outlined in red,
    and the rule hits (if any) listed underneath."""
    heat = normalize_map(result.anomaly_map, result.pixel_threshold, float(result.meta.get("pixel_scale", 1.0)))
    img = overlay(image, heat, result.pred_mask, alpha=alpha)
    return overlay_with_legend(img, [f"rule: {hit.rule} -> {hit.effect}" for hit in result.rule_hits])
