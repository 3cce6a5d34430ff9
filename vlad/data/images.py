"""Safe image and mask loading, and expansion of command-line inputs into image files.

Every failure raises :class:`vlad.errors.ImageLoadError` with a one-line message naming the file, so a batch run can
report the bad file and carry on. Size limits are checked from the file header before any pixel data is decoded.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vlad.errors import ConfigError, ImageLoadError

__all__ = [
    "ALPHA_BACKGROUND",
    "IMAGE_EXTENSIONS",
    "MAX_ASPECT_RATIO",
    "MAX_PIXELS",
    "MIN_SIDE",
    "ImageLike",
    "as_pil",
    "expand_inputs",
    "load_image",
    "load_mask",
]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif")
"""File extensions (lower case) treated as images when a directory is expanded (a GIF is read as its first frame)."""

HEIF_EXTENSIONS: tuple[str, ...] = (".heic", ".heif")
"""Read when the optional ``pillow-heif`` package is installed (``pip install 'vlad[heic]'``)."""

_NOT_READABLE: dict[str, str] = {
    ".svg": "an SVG is a vector drawing, not a photo: rasterise it (e.g. to PNG) first",
    ".pdf": "a PDF is not an image: export its pages as PNG first",
    ".raw": "a camera RAW file: convert it to PNG or TIFF first",
    ".dng": "a camera RAW file: convert it to PNG or TIFF first",
}

MAX_PIXELS = 64_000_000
"""Largest accepted ``width * height``; bigger images are refused before decoding."""

MAX_ASPECT_RATIO = 20.0
"""Largest accepted ``long side / short side``."""

MIN_SIDE = 8
"""Smallest accepted width or height in pixels."""

ALPHA_BACKGROUND: tuple[int, int, int] = (128, 128, 128)
"""Neutral mid-grey that transparent pixels are composited onto (black would paint fake dark specks and edges)."""

ImageLike = str | Path | Image.Image | np.ndarray
"""What scorers accept as an image: a path, a PIL image or an (H, W[, 3|4]) uint8 array."""

_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError)
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})
_ALPHA_MODES = frozenset({"LA", "La", "RGBA", "RGBa", "PA"})


def load_image(path: str | Path) -> Image.Image:
    """Load an image file as an 8-bit RGB Pillow image with its EXIF orientation applied.

    Mode handling: ``L`` and ``1`` are replicated to three channels; images with alpha (``LA``, ``RGBA``, ``PA`` and
    ``P`` with a transparent colour) are composited onto a neutral **mid-grey** (:data:`ALPHA_BACKGROUND`, (128, 128,
    128)) so transparent pixels are always that grey rather than whatever colour happens to be stored under them. Not
    black: a cut-out part on black gets hard dark edges and black holes that the scorer and the overlay show as fake
    specks, while mid-grey sits in the middle of the value range and draws no contrast of its own. ``CMYK`` and other
    colour modes go through Pillow's conversion. 16-bit modes (``I;16*``) are scaled by the full 16-bit range (value /
    257, so 65535 -> 255 and relative brightness is kept across images); 32-bit integer ``I`` images are scaled the same
    way when all values lie in 0..65535 and min-max normalised otherwise; 32-bit float ``F`` images are min-max
    normalised to 0..255.

    Args:
        path: Image file.

    Returns:
        Pillow image of mode ``"RGB"``; ``np.asarray`` of it is uint8 (H, W, 3).

    Raises:
        ImageLoadError: The file is missing, a directory, empty, not an image, corrupt or truncated, larger than
            ``MAX_PIXELS``, more elongated than ``MAX_ASPECT_RATIO``, or has a side shorter than ``MIN_SIDE``.
    """
    p = Path(path)
    return _to_rgb(_open_checked(p), p)


def as_pil(image: ImageLike) -> Image.Image:
    """Load a path (with vlad's checks) or wrap an array; always RGB."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=-1)
        if image.ndim != 3 or image.shape[-1] not in (3, 4):
            raise ConfigError(f"image arrays must be (H, W), (H, W, 3) or (H, W, 4), got {image.shape}")
        if image.dtype != np.uint8:
            raise ConfigError(f"image arrays must be uint8, got {image.dtype}")
        return Image.fromarray(image[..., :3])
    return load_image(image)


def load_mask(path: str | Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """Load a ground-truth mask as a boolean array.

    The mask's EXIF orientation is applied (as for images) and it is converted to 8-bit grey. Label-style masks whose
    largest value is 1..127 (e.g. raw VisA masks storing small instance/class indices) are first mapped to 0/255 (any
    non-zero value is anomalous). The grey mask is then resized with bilinear interpolation to ``size`` if given and
    binarised with ``value > 127``.

    Args:
        path: Mask image file.
        size: Target ``(width, height)``; None keeps the file's size.

    Returns:
        Boolean array of shape (H, W); True marks anomalous pixels.

    Raises:
        ImageLoadError: The file cannot be loaded (same cases as :func:`load_image`).
        ConfigError: ``size`` is not a pair of positive integers.
    """
    p = Path(path)
    target = _check_size(size)
    im = _open_checked(p)
    grey = np.asarray(_to_rgb(im, p).convert("L"))
    peak = int(grey.max()) if grey.size else 0
    if 0 < peak <= 127:
        grey = np.where(grey > 0, 255, 0).astype(np.uint8)
    mask_im = Image.fromarray(grey)
    if target is not None and target != mask_im.size:
        mask_im = mask_im.resize(target, resample=Image.Resampling.BILINEAR)
    return np.asarray(mask_im) > 127


def expand_inputs(
    inputs: Sequence[str | Path] | str | Path, *, recursive: bool = True
) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Turn files and directories given by the user into a list of image files plus a list of problems.

    Directories are expanded to the files inside them whose extension is in ``IMAGE_EXTENSIONS`` (case-insensitive),
    sorted, descending into subdirectories when ``recursive``; every other entry gets a problem saying why it is
    skipped (not an image, HEIC without pillow-heif, SVG, a symlink loop or broken link, a linked folder, a pipe);
    hidden entries (names starting with ".", OS and tool metadata) are left out.
    A file given explicitly is kept whatever its extension (:func:`load_image` decides whether it is an image).
    Duplicates (same resolved path) are dropped, keeping the first occurrence and the input order.

    Args:
        inputs: Files and/or directories. A single str or Path is treated as a one-element list.
        recursive: Descend into subdirectories when expanding a directory.

    Returns:
        ``(files, problems)``: the files to process, and ``(path, message)`` pairs for inputs that were skipped
        ("image not found: PATH", or "directory contains no images (looked for ...)").
    """
    items = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    files: list[Path] = []
    problems: list[tuple[Path, str]] = []
    seen: set[Path] = set()
    for item in items:
        p = Path(item)
        if not p.exists():
            problems.append((p, _missing(p)))
            continue
        if p.is_dir():
            found, skipped = _entries(p, recursive)
            problems += skipped
            if not found and not skipped:
                problems.append((p, f"directory contains no images (looked for {', '.join(IMAGE_EXTENSIONS)})"))
        else:
            found = [p]
        for f in found:
            key = f.resolve()
            if key not in seen:
                seen.add(key)
                files.append(f)
    # an entry skipped in a folder but also given explicitly is read, not reported
    problems = [(f, msg) for f, msg in problems if not (f.exists() and f.resolve() in seen)]
    return files, problems


def _missing(p: Path) -> str:
    """Why a path that does not exist does not: a symlink loop, a broken link, or nothing there."""
    if p.is_symlink():
        try:
            p.resolve(strict=True)
        except RuntimeError:
            return f"symlink loop: {p} points back to itself"
        except OSError:
            return f"broken symlink: {p} points to {os.readlink(p)}, which does not exist"
    return f"image not found: {p}"


def _entries(directory: Path, recursive: bool) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The image files in ``directory`` (sorted; recursively if asked) and a reason for every other entry.

    Hidden entries (names starting with ".": OS and tool metadata) are left out; folders are descended into, not
    reported; linked folders are not followed (give them explicitly)."""
    candidates = directory.rglob("*") if recursive else directory.iterdir()
    files, skipped = [], []
    for f in sorted(candidates):
        if any(part.startswith(".") for part in f.relative_to(directory).parts):
            continue
        reason = _skip_reason(f)
        if reason is None:
            files.append(f)
        elif reason:
            skipped.append((f, reason))
    return files, skipped


def _skip_reason(f: Path) -> str | None:
    """None for an image file to read, "" for an entry that needs no row (a folder), else why it is skipped."""
    suffix = f.suffix.lower()
    if f.is_symlink() and not f.exists():
        return _missing(f)
    if f.is_dir():
        return f"linked folder not followed: {f} (give it as an input to scan it)" if f.is_symlink() else ""
    if not f.is_file():
        return f"not a regular file (a pipe, socket or device): {f}"
    if suffix in IMAGE_EXTENSIONS:
        return None
    if suffix in HEIF_EXTENSIONS:
        if _heif_available():
            return None
        return f"HEIC/HEIF image: {f}; convert it to PNG or JPEG, or install the heic extra: pip install 'vlad[heic]'"
    if suffix in _NOT_READABLE:
        return f"{_NOT_READABLE[suffix]}: {f}"
    return f"not an image file: {f} (vlad reads {', '.join(IMAGE_EXTENSIONS)})"


def _heif_available() -> bool:
    """True when pillow-heif is installed; registers its HEIC/HEIF opener with Pillow (once)."""
    global _HEIF_REGISTERED
    if _HEIF_REGISTERED is None:
        try:
            import pillow_heif  # type: ignore[import-not-found]

            pillow_heif.register_heif_opener()
            _HEIF_REGISTERED = True
        except ImportError:
            _HEIF_REGISTERED = False
    return _HEIF_REGISTERED


_HEIF_REGISTERED: bool | None = None


def _check_size(size: tuple[int, int] | None) -> tuple[int, int] | None:
    """Validate a ``(width, height)`` pair."""
    if size is None:
        return None
    ok = isinstance(size, (tuple, list)) and len(size) == 2
    ok = ok and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in size)
    if not ok:
        raise ConfigError(f"mask size must be a (width, height) pair of positive integers, got {size!r}")
    return int(size[0]), int(size[1])


def _open_checked(p: Path) -> Image.Image:
    """Open ``p``, check its header-declared size and shape, decode it fully and apply its EXIF orientation.

    Raises:
        ImageLoadError: See :func:`load_image`.
    """
    _check_file(p)
    if p.suffix.lower() in HEIF_EXTENSIONS and not _heif_available():
        raise ImageLoadError(
            f"HEIC/HEIF image: {p}; convert it to PNG or JPEG, or install the heic extra: pip install 'vlad[heic]'"
        )
    try:
        fh = p.open("rb")
    except OSError as exc:
        raise ImageLoadError(f"cannot open image file: {p} ({_one_line(exc)})") from None
    with fh:  # we own the handle, so it is closed on every path, multi-frame files included
        im = _open_header(fh, p)
        _check_dimensions(im.size, p)
        if getattr(im, "n_frames", 1) > 1:
            logger.warning("%s has %d frames (an animation); vlad scores its first frame", p, im.n_frames)
        _decode(im, p)
        _exif_transpose(im, p)
    return im


def _decode(im: Image.Image, p: Path) -> None:
    """Decode the pixel data of an opened image, turning decoder failures into ImageLoadError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _bomb_error(p, exc) from None
    except _DECODE_ERRORS as exc:
        raise ImageLoadError(f"corrupt or truncated image: {p} ({_one_line(exc)})") from None


def _check_file(p: Path) -> None:
    """Raise if ``p`` is missing, a directory or an empty file."""
    if not p.exists():
        raise ImageLoadError(_missing(p))
    if p.is_dir():
        raise ImageLoadError(f"expected an image file but got a directory: {p}")
    if p.stat().st_size == 0:
        raise ImageLoadError(f"empty file (0 bytes), not an image: {p}")


def _open_header(fh: BinaryIO, p: Path) -> Image.Image:
    """``Image.open`` on an open file (reads the header only) with Pillow's errors turned into ImageLoadError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(fh)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _bomb_error(p, exc) from None
    except UnidentifiedImageError:
        raise ImageLoadError(f"not an image file: {p} (Pillow cannot identify it)") from None
    except _DECODE_ERRORS as exc:
        raise ImageLoadError(f"cannot read image header: {p} ({_one_line(exc)})") from None


def _check_dimensions(size: tuple[int, int], p: Path) -> None:
    """Refuse images that are too large, too small or too elongated, using the header size only."""
    w, h = size
    if w * h > MAX_PIXELS:
        raise ImageLoadError(
            f"image too large: {p} is {w}x{h} = {w * h:,} pixels, over the limit of {MAX_PIXELS:,} pixels; "
            "downscale it first"
        )
    if min(w, h) < MIN_SIDE:
        raise ImageLoadError(f"image too small: {p} is {w}x{h}; each side must be at least {MIN_SIDE} pixels")
    ratio = max(w, h) / min(w, h)
    if ratio > MAX_ASPECT_RATIO:
        raise ImageLoadError(
            f"extreme aspect ratio: {p} is {w}x{h} (ratio {ratio:.1f}, limit {MAX_ASPECT_RATIO:g}); "
            "crop or tile it into less elongated pieces"
        )


def _bomb_error(p: Path, exc: BaseException) -> ImageLoadError:
    """ImageLoadError for an image Pillow itself flags as a decompression bomb (its message carries the size)."""
    found = re.search(r"\((\d+) pixels\)", str(exc))
    size = f"has {int(found.group(1)):,} pixels" if found else f"is flagged by Pillow ({_one_line(exc)})"
    return ImageLoadError(f"image too large: {p} {size}, over the limit of {MAX_PIXELS:,} pixels; downscale it first")


def _one_line(exc: BaseException) -> str:
    """Exception text squeezed onto one line."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _exif_transpose(im: Image.Image, p: Path) -> None:
    """Apply the EXIF orientation tag in place; a malformed EXIF block is ignored with a warning."""
    try:
        ImageOps.exif_transpose(im, in_place=True)
    except _DECODE_ERRORS + (KeyError, ZeroDivisionError) as exc:
        logger.warning("ignoring unreadable EXIF orientation in %s (%s)", p, _one_line(exc))


def _to_rgb(im: Image.Image, p: Path) -> Image.Image:
    """Convert any supported Pillow mode to 8-bit RGB (see :func:`load_image` for the rules)."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in _SIXTEEN_BIT_MODES or mode == "I" or mode == "F":
        return Image.fromarray(_numeric_to_uint8(np.asarray(im), mode)).convert("RGB")
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in _ALPHA_MODES:
        return _composite_on_grey(im)
    try:
        return im.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageLoadError(f"unsupported image mode {mode!r}: {p} ({_one_line(exc)})") from None


def _composite_on_grey(im: Image.Image) -> Image.Image:
    """Composite an image with alpha onto the :data:`ALPHA_BACKGROUND` grey; returns RGB."""
    rgba = im.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _numeric_to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """Scale a 16-bit, 32-bit integer or float single-channel array (H, W) to uint8 (H, W).

    16-bit data (and ``I`` data within 0..65535) is divided by 257 (full 16-bit range to full 8-bit range); other
    ``I`` data and ``F`` data are min-max normalised; NaN becomes 0 and a constant image becomes all zeros.
    """
    data = np.asarray(arr, dtype=np.float64)
    if mode != "F" and data.size and data.min() >= 0 and data.max() <= 65535:
        return np.clip(np.rint(data / 257.0), 0, 255).astype(np.uint8)
    finite = np.isfinite(data)
    if not finite.any():
        return np.zeros(data.shape, dtype=np.uint8)
    lo, hi = float(data[finite].min()), float(data[finite].max())
    if hi <= lo:
        return np.zeros(data.shape, dtype=np.uint8)
    scaled = (np.where(finite, data, lo) - lo) / (hi - lo) * 255.0
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
