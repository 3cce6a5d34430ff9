"""Heat-map overlays an operator can read, in anomalib's visual style. Only numpy, Pillow and scipy are needed here.

:func:`render_result` draws the overlay of a result: the anomaly map in the "jet" colour map (its pixel threshold at
mid-scale) blended over the image, the predicted mask outlined in red, a red box around a region that comes from the
map's peak (``source: peak``, no pixel over the threshold), and every region numbered 1, 2, ... in the order of the
result's ``regions``, which is the order of ``regions`` in a ``report.jsonl`` row and of the explainer's region
``index``: a white number on a black tile just above the region's top-left corner (:func:`region_labels` is the
layout the renderer uses).

Size: the overlay has exactly the input's size, nothing is stacked onto it, so it lines up pixel for pixel with the
photo. Inputs whose longer side exceeds :data:`OVERLAY_MAX_SIDE` (2048 px) are drawn at a bounded size instead, the
longer side 2048 px and the aspect ratio kept, unless ``full_res=True`` (``vlad detect --full-res-overlay``): the image
and the map are resized *first* and only the bounded picture is coloured and blended, so a 4200 x 4200 input costs
what a 2048 x 2048 one does. Blending runs in blocks of rows, so memory stays bounded even at full size.

Legend: a separate strip, :func:`render_legend` (``vlad detect`` saves it as ``<name>_legend.png`` next to
``<name>_overlay.png``), :data:`LEGEND_WIDTH` px wide: a caption with the verdict, the image score, its threshold and
the normalised score; the colour bar with the pixel threshold marked and the raw map values at both ends; the
numbered regions (position, area, peak); the rule hits; and a note when the overlay was drawn at a bounded size.
Drawing the legend inside the overlay would hide part of the photo (all of it on small inputs) and break the
pixel-for-pixel match with the input.

Fonts are Pillow's own default font (``ImageFont.load_default``), at a chosen size where the installed Pillow
supports it (10.1 and later, with FreeType), otherwise its fixed bitmap font: no font files are needed.

Images are (H, W, 3) uint8 RGB arrays or PIL images; maps and masks are (H, W) at the image's resolution.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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
_BLEND_BLOCK_PIXELS = 1 << 18  # pixels blended per block of rows: about 25 MB of float64 temporaries

OVERLAY_MAX_SIDE = 2048
"""Longer side, in pixels, above which :func:`render_result` draws a bounded overlay (aspect kept) unless
``full_res=True``."""

LEGEND_WIDTH = 480
"""Width in pixels of the legend strip drawn by :func:`render_legend`."""

LEGEND_MAX_REGIONS = 10
"""The legend lists at most this many regions; the rest are counted ("... 3 more regions in the report")."""

LABEL_BACKGROUND = (0, 0, 0)
"""Colour of the tile behind a region number (the number is white)."""


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
    _check_threshold_scale(threshold, scale)
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
    out = _blend_rows(rgb, lambda rows: heat_arr[rows], alpha)
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


def _blend_rows(rgb: np.ndarray, heat_rows: Callable[[slice], np.ndarray], alpha: float) -> np.ndarray:
    """Blends ``jet(heat)`` into the (H, W, 3) uint8 array in place, a block of rows at a time, and returns it.

    ``heat_rows(rows)`` gives the (len(rows), W) heat values of a slice of rows; per pixel the result is
    ``floor((1 - alpha) * image + alpha * jet(heat) + 0.5)``, computed in float64, whatever the block size.
    """
    height, width = rgb.shape[:2]
    step = max(1, _BLEND_BLOCK_PIXELS // width)
    for top in range(0, height, step):
        rows = slice(top, min(top + step, height))
        colours = jet_colormap(heat_rows(rows)).astype(np.float64)
        blended = (1.0 - alpha) * rgb[rows].astype(np.float64) + alpha * colours
        rgb[rows] = np.floor(blended + 0.5).clip(0, 255).astype(np.uint8)
    return rgb


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


def _check_threshold_scale(threshold: float, scale: float) -> None:
    """Raises ValueError for a non-finite threshold or a scale that is not a finite positive number."""
    if not _is_finite_number(threshold):
        raise ValueError(f"threshold must be a finite number, got {threshold!r}")
    if not _is_finite_number(scale) or scale <= 0:
        raise ValueError(f"scale must be a finite positive number, got {scale!r}")


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


# ---------------------------------------------------------------------------------------------------------------------
# the overlay of a result


def overlay_size(
    width: int, height: int, *, full_res: bool = False, max_side: int = OVERLAY_MAX_SIDE
) -> tuple[int, int]:
    """The (width, height) at which :func:`render_result` draws an input of ``width x height``.

    Args:
        width: input width in pixels (>= 1).
        height: input height in pixels (>= 1).
        full_res: always the input's size.
        max_side: the bound on the longer side (>= 1).

    Returns:
        The input's size when ``full_res`` or when its longer side is at most ``max_side``; otherwise the longer side
        becomes ``max_side`` and the shorter one is scaled by the same factor (rounded, at least 1).
    """
    for name, value in (("width", width), ("height", height), ("max_side", max_side)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    long_side = max(width, height)
    if full_res or long_side <= max_side:
        return int(width), int(height)
    short = max(1, round(min(width, height) * max_side / long_side))
    return (int(max_side), short) if width >= height else (short, int(max_side))


@dataclass(frozen=True)
class RegionLabel:
    """Where :func:`render_result` draws the number of one region.

    Attributes:
        number: the region's 1-based index in ``result.regions`` (= its place in the report's ``regions``).
        box: ``(x0, y0, x1, y1)`` of the number's tile in overlay pixels, ends exclusive.
        region_box: the region's bounding box scaled to overlay pixels, ends exclusive.
        font_size: the font size the number is drawn with (see :func:`label_tile`).
    """

    number: int
    box: tuple[int, int, int, int]
    region_box: tuple[int, int, int, int]
    font_size: int


def label_font_size(size: tuple[int, int]) -> int:
    """Font size of region numbers on an overlay of ``size = (width, height)``: 1/48 of the longer side, 12 to 40."""
    return int(min(max(round(max(size) / 48), 12), 40))


def label_tile(number: int, font_size: int) -> Image.Image:
    """The tile :func:`render_result` pastes for a region number: the number in white on :data:`LABEL_BACKGROUND`,
    with a margin of a quarter of the font size (at least 2 px)."""
    font = _font(font_size)
    text = str(number)
    left, top, right, bottom = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), text, font=font)
    margin = max(2, font_size // 4)
    size = (int(math.ceil(right - left)) + 2 * margin, int(math.ceil(bottom - top)) + 2 * margin)
    tile = Image.new("RGB", size, LABEL_BACKGROUND)
    ImageDraw.Draw(tile).text((margin - left, margin - top), text, fill=(255, 255, 255), font=font)
    return tile


def region_labels(result: AnomalyResult, size: tuple[int, int]) -> list[RegionLabel]:
    """The layout of the region numbers on an overlay of ``size = (width, height)`` (the renderer uses it).

    Regions are numbered 1, 2, ... in the order of ``result.regions``. Each bounding box is scaled from the input's
    pixels to the overlay's (outward, so it still covers the region). The tile goes just above the box's top-left
    corner, or under its bottom-left corner when there is no room above, or inside its top-left corner when there is
    room for neither; it is then shifted inside the overlay.

    Returns:
        One :class:`RegionLabel` per region, in the result's order.
    """
    width, height = size
    in_w, in_h = result.image_size
    sx, sy = width / in_w, height / in_h
    font_size = label_font_size(size)
    labels = []
    for number, region in enumerate(result.regions, start=1):
        x0, y0, x1, y1 = region.bbox
        rbox = (
            min(int(math.floor(x0 * sx)), width - 1),
            min(int(math.floor(y0 * sy)), height - 1),
            max(min(int(math.ceil(x1 * sx)), width), 1),
            max(min(int(math.ceil(y1 * sy)), height), 1),
        )
        tw, th = label_tile(number, font_size).size
        if rbox[1] - th >= 0:
            top = rbox[1] - th
        elif rbox[3] + th <= height:
            top = rbox[3]
        else:
            top = rbox[1]
        left = max(0, min(rbox[0], width - tw))
        top = max(0, min(top, height - th))
        labels.append(RegionLabel(number, (left, top, left + tw, top + th), rbox, font_size))
    return labels


def render_result(
    image: Image.Image | np.ndarray,
    result: AnomalyResult,
    *,
    alpha: float = 0.5,
    full_res: bool = False,
    max_side: int = OVERLAY_MAX_SIDE,
) -> Image.Image:
    """The overlay of a result (see the module docstring): heat map, red outlines and numbered regions.

    Args:
        image: the input (PIL image or uint8 (H, W) / (H, W, 3) array), at the result's size.
        result: the result to draw.
        alpha: heat-map weight in [0, 1].
        full_res: draw at the input's size however large it is.
        max_side: the bound on the longer side when not ``full_res`` (default :data:`OVERLAY_MAX_SIDE`).

    Returns:
        RGB PIL image of :func:`overlay_size` of the input: the input's size up to ``max_side``.

    Raises:
        ValueError: if the image's size differs from the result's or an option is out of range.
    """
    if isinstance(image, Image.Image):
        pil = image if image.mode == "RGB" else image.convert("RGB")  # never modified: resize and np.array copy it
    else:
        pil = Image.fromarray(_image_to_rgb_array(image))
    if pil.size != result.image_size:
        raise ValueError(f"image size {pil.size} differs from the result's map size {result.image_size}")
    size = overlay_size(*pil.size, full_res=full_res, max_side=max_side)
    amap, mask = result.anomaly_map, result.pred_mask
    if size != pil.size:  # resize first: only the bounded picture is coloured and blended
        pil = pil.resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0)
        amap = np.asarray(Image.fromarray(amap).resize(size, Image.Resampling.BILINEAR), dtype=np.float32)
        mask = _shrink_mask(mask, size)
    threshold, scale = result.pixel_threshold, float(result.meta.get("pixel_scale", 1.0))
    _check_threshold_scale(threshold, scale)
    _check_overlay_options(alpha, (255, 0, 0), 1)
    rgb = _blend_rows(np.array(pil, dtype=np.uint8), lambda rows: normalize_map(amap[rows], threshold, scale), alpha)
    line = max(2, round(max(size) / 700))
    if mask.any():
        rgb[_contour_pixels(mask, line)] = (255, 0, 0)
    out = Image.fromarray(rgb)
    draw = ImageDraw.Draw(out)
    labels = region_labels(result, size)
    for label, region in zip(labels, result.regions, strict=True):
        if region.source == "peak":  # no mask pixels to outline: box the area around the peak
            x0, y0, x1, y1 = label.region_box
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=(255, 0, 0), width=line)
    for label in labels:  # after all boxes, so no outline crosses a number
        out.paste(label_tile(label.number, label.font_size), label.box[:2])
    return out


def _shrink_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The (H, W) bool mask at ``size = (width, height)``: an output pixel is set when any input pixel under it is (a
    box filter over 0/255, then > 0), so a one-pixel defect stays visible after shrinking."""
    if not mask.any():
        return np.zeros(size[::-1], dtype=bool)
    grey = Image.fromarray(mask.view(np.uint8) * np.uint8(255))
    return np.asarray(grey.resize(size, Image.Resampling.BOX)) > 0


# ---------------------------------------------------------------------------------------------------------------------
# the legend strip of a result


def legend_lines(result: AnomalyResult, *, overlay_size: tuple[int, int] | None = None) -> list[str]:
    """The text of :func:`render_legend`, top to bottom (the colour bar goes after the first line).

    Lines: the caption (verdict in capitals, image score, threshold and its source, normalised score); the regions
    as ``"<n>. <position>: <area> % of the image, peak <value>"`` numbered as on the overlay and in the report (at
    most :data:`LEGEND_MAX_REGIONS`, then a count of the rest), or ``"no regions"``; one ``"rule: ... -> ..."`` line
    per rule hit; and, when ``overlay_size`` differs from the input's size, a note saying so.
    """
    lines = [
        f"{result.verdict.upper()}  score {result.pred_score:.4f}  threshold {result.threshold:.4f} "
        f"({result.threshold_source})  normalised {result.normalized_score:.2f}"
    ]
    for number, region in enumerate(result.regions[:LEGEND_MAX_REGIONS], start=1):
        note = " (around the map's peak: no pixel over the pixel threshold)" if region.source == "peak" else ""
        lines.append(
            f"{number}. {region.position}: {_percent(region.area_fraction)} of the image, "
            f"peak {region.peak_score:.4g}{note}"
        )
    hidden = len(result.regions) - LEGEND_MAX_REGIONS
    if hidden > 0:
        lines.append(f"... {hidden} more region{'s' if hidden > 1 else ''} in the report")
    if not result.regions:
        lines.append("no regions")
    lines.extend(f"rule: {hit.rule} -> {hit.effect}" for hit in result.rule_hits)
    if overlay_size is not None and tuple(overlay_size) != result.image_size:
        (w, h), (iw, ih) = overlay_size, result.image_size
        lines.append(f"overlay drawn at {w} x {h} (input {iw} x {ih}); --full-res-overlay draws it at full size")
    return lines


def colour_bar_labels(result: AnomalyResult) -> tuple[str, str, str]:
    """The colour bar's labels: the raw map value at its left end, at the threshold mark (mid-scale), at its right
    end (values beyond the ends take the end colours)."""
    t, s = result.pixel_threshold, float(result.meta.get("pixel_scale", 1.0))
    return f"<= {t - s / 2:.4g}", f"pixel threshold {t:.4g}", f">= {t + s / 2:.4g}"


def render_legend(
    result: AnomalyResult, *, width: int = LEGEND_WIDTH, overlay_size: tuple[int, int] | None = None
) -> Image.Image:
    """The legend strip of a result: the caption in the verdict's colour (red for anomalous, green for normal), the
    jet colour bar of the heat map with a black mark at the pixel threshold and :func:`colour_bar_labels` under it,
    then the other :func:`legend_lines` in black, on white.

    Args:
        result: the result the overlay shows.
        width: strip width in pixels (>= 64).
        overlay_size: the overlay's (width, height), to note a bounded overlay.

    Returns:
        RGB PIL image ``width`` wide, as tall as its content.
    """
    if isinstance(width, bool) or not isinstance(width, (int, np.integer)) or width < 64:
        raise ValueError(f"width must be an integer >= 64, got {width!r}")
    pad, font, small = 8, _font(14), _font(12)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    caption, *rest = legend_lines(result, overlay_size=overlay_size)
    line_h, small_h = _text_height(measure, font), _text_height(measure, small)
    caption_lines = _wrap_to(caption, measure, font, width - 2 * pad)
    rest_lines = [piece for line in rest for piece in _wrap_to(line, measure, font, width - 2 * pad)]
    bar_h, mark = 16, 4
    bar_top = pad + len(caption_lines) * line_h + pad + mark
    text_top = bar_top + bar_h + mark + 2 + small_h + pad
    strip = Image.new("RGB", (int(width), text_top + len(rest_lines) * line_h + pad), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    colour = (198, 40, 40) if result.pred_label else (46, 125, 50)
    for i, text in enumerate(caption_lines):
        draw.text((pad, pad + i * line_h), text, fill=colour, font=font)
    bar_w = int(width) - 2 * pad
    bar = np.broadcast_to(jet_colormap(np.linspace(0.0, 1.0, bar_w))[None], (bar_h, bar_w, 3))
    strip.paste(Image.fromarray(np.ascontiguousarray(bar)), (pad, bar_top))
    mid = pad + (bar_w - 1) // 2
    draw.rectangle((mid - 1, bar_top - mark, mid + 1, bar_top + bar_h + mark - 1), fill=(0, 0, 0))
    low, at, high = colour_bar_labels(result)
    label_y = bar_top + bar_h + mark + 2
    draw.text((pad, label_y), low, fill=(0, 0, 0), font=small)
    draw.text((mid - measure.textlength(at, font=small) / 2, label_y), at, fill=(0, 0, 0), font=small)
    draw.text((width - pad - measure.textlength(high, font=small), label_y), high, fill=(0, 0, 0), font=small)
    for i, text in enumerate(rest_lines):
        draw.text((pad, text_top + i * line_h), text, fill=(0, 0, 0), font=font)
    return strip


def _percent(fraction: float) -> str:
    """A fraction as a percentage with two decimals; "< 0.01 %" for a tiny positive one."""
    return "< 0.01 %" if 0 < fraction < 5e-5 else f"{100 * fraction:.2f} %"


@functools.lru_cache(maxsize=16)
def _font(size: int) -> Any:
    """Pillow's default font at ``size`` (Pillow >= 10.1 with FreeType), else its fixed bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: no size argument
        return ImageFont.load_default()


def _text_height(draw: ImageDraw.ImageDraw, font: Any) -> int:
    """Line advance for ``font``: the lowest ink of "Ag|" below the origin plus line spacing."""
    return int(math.ceil(draw.textbbox((0, 0), "Ag|", font=font)[3])) + _LEGEND_LINE_SPACING


def _wrap_to(text: str, draw: ImageDraw.ImageDraw, font: Any, room: int) -> list[str]:
    """Greedy word wrap of one line into pieces at most ``room`` pixels wide (a longer single word stays whole)."""
    return _wrap(text, draw, font, room + 2 * _LEGEND_PADDING)
