"""Synthetic textures and DRAEM-style planted anomalies (numpy only, deterministic given a ``np.random.Generator``).

Used to build tiny MVTec-layout datasets for tests and for adapter training: :func:`make_texture` draws "normal
product" images, :func:`perlin_mask` draws blob-shaped defect regions, :func:`synthesize_anomaly` plants a defect
inside such a region, and :func:`make_synthetic_dataset` writes a complete dataset to disk.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from vlad.data.images import MIN_SIDE
from vlad.errors import ConfigError, DatasetError

__all__ = [
    "ANOMALY_MODES",
    "TEXTURE_BETA",
    "TEXTURE_KINDS",
    "make_synthetic_dataset",
    "make_texture",
    "perlin_mask",
    "perlin_noise",
    "synthesize_anomaly",
]

TEXTURE_KINDS: tuple[str, ...] = ("noise", "stripes", "grid", "blobs")
"""Texture kinds drawn by :func:`make_texture`."""

ANOMALY_MODES: tuple[str, ...] = ("texture", "colour", "dark", "bright")
"""Defect kinds planted by :func:`synthesize_anomaly`."""

TEXTURE_BETA = 0.8
"""Default opacity of the foreign texture in ``mode="texture"`` (strong, so defects are clearly visible)."""

_MASK_RETRIES = 30
_MIN_CONTRAST = 60.0  # minimum mean-intensity gap between a planted texture and the image it replaces


# --------------------------------------------------------------------------------------------------- Perlin noise


def perlin_noise(shape: tuple[int, int], res: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Classic 2-D gradient (Perlin) noise.

    A lattice of ``(res_y + 1) x (res_x + 1)`` random unit gradients spans the image; each pixel blends the dot
    products with its four surrounding gradients using the fade curve ``6t^5 - 15t^4 + 10t^3``. Lattice cells are
    ``H / res_y`` by ``W / res_x`` pixels and need not be whole numbers, so ``shape`` need not be divisible by
    ``res``. The result is scaled by sqrt(2) as in DRAEM, so it lies in [-1, 1].

    Args:
        shape: Output ``(H, W)``.
        res: Number of lattice cells ``(res_y, res_x)``; larger means finer noise.
        rng: Random generator (consumes ``(res_y + 1) * (res_x + 1)`` uniform draws).

    Returns:
        Float64 array (H, W) in [-1, 1].

    Raises:
        ConfigError: ``shape`` or ``res`` is not a pair of positive integers.
    """
    h, w = _positive_pair(shape, "shape")
    ry, rx = _positive_pair(res, "res")
    angles = 2.0 * np.pi * rng.random((ry + 1, rx + 1))
    grad_y, grad_x = np.sin(angles), np.cos(angles)
    y = np.arange(h) * (ry / h)
    x = np.arange(w) * (rx / w)
    iy, ix = np.floor(y).astype(np.int64)[:, None], np.floor(x).astype(np.int64)[None, :]
    fy, fx = y[:, None] - iy, x[None, :] - ix

    def corner(dy: int, dx: int) -> np.ndarray:
        return grad_y[iy + dy, ix + dx] * (fy - dy) + grad_x[iy + dy, ix + dx] * (fx - dx)

    ty, tx = _fade(fy), _fade(fx)
    top = corner(0, 0) * (1 - tx) + corner(0, 1) * tx
    bottom = corner(1, 0) * (1 - tx) + corner(1, 1) * tx
    return np.clip(math.sqrt(2.0) * (top * (1 - ty) + bottom * ty), -1.0, 1.0)


def perlin_mask(
    shape: tuple[int, int],
    rng: np.random.Generator,
    *,
    min_scale: int = 0,
    max_scale: int = 6,
    threshold: float = 0.5,
    min_area_fraction: float = 0.005,
    max_area_fraction: float = 0.25,
) -> np.ndarray:
    """Random blob-shaped defect region from thresholded Perlin noise (as in DRAEM).

    Per try, the lattice resolution per axis is ``2**k`` with ``k`` drawn from ``min_scale .. max_scale - 1`` (capped
    so a lattice cell is at least 4 pixels), and the mask is ``noise > threshold``. Tries repeat until the mask covers
    between ``min_area_fraction`` and ``max_area_fraction`` of the image; after a bounded number of failures a random
    ellipse with an area inside the bounds is returned instead.

    Args:
        shape: Mask ``(H, W)``.
        rng: Random generator.
        min_scale: Smallest exponent ``k``.
        max_scale: Exclusive upper bound of ``k``.
        threshold: Noise threshold in [-1, 1).
        min_area_fraction: Smallest accepted covered fraction, in [0, 1).
        max_area_fraction: Largest accepted covered fraction, in (min_area_fraction, 1].

    Returns:
        Boolean array (H, W); True marks the defect region.

    Raises:
        ConfigError: An argument is out of range.
    """
    h, w = _positive_pair(shape, "shape")
    _check_mask_options(min_scale, max_scale, threshold, min_area_fraction, max_area_fraction)
    for _ in range(_MASK_RETRIES):
        res = tuple(min(2 ** int(rng.integers(min_scale, max_scale)), max(1, side // 4)) for side in (h, w))
        mask = perlin_noise((h, w), res, rng) > threshold
        if min_area_fraction <= mask.mean() <= max_area_fraction:
            return mask
    return _ellipse_mask((h, w), rng, min_area_fraction, max_area_fraction)


def _fade(t: np.ndarray) -> np.ndarray:
    """Perlin's fade curve 6t^5 - 15t^4 + 10t^3."""
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def _positive_pair(value: tuple[int, int], name: str) -> tuple[int, int]:
    """Validate a pair of positive integers."""
    ok = isinstance(value, (tuple, list)) and len(value) == 2
    ok = ok and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in value)
    if not ok:
        raise ConfigError(f"{name} must be a pair of positive integers, got {value!r}")
    return int(value[0]), int(value[1])


def _check_mask_options(min_scale: int, max_scale: int, threshold: float, lo: float, hi: float) -> None:
    """Validate :func:`perlin_mask` options."""
    if not (isinstance(min_scale, int) and isinstance(max_scale, int) and 0 <= min_scale < max_scale <= 12):
        raise ConfigError(f"perlin scales need 0 <= min_scale < max_scale <= 12, got {min_scale!r}, {max_scale!r}")
    if not -1.0 <= threshold < 1.0:
        raise ConfigError(f"perlin threshold must be in [-1, 1), got {threshold!r}")
    if not 0.0 <= lo < hi <= 1.0:
        raise ConfigError(f"area fractions need 0 <= min_area_fraction < max_area_fraction <= 1, got {lo!r}, {hi!r}")


def _ellipse_mask(shape: tuple[int, int], rng: np.random.Generator, lo: float, hi: float) -> np.ndarray:
    """Random axis-aligned ellipse covering roughly a fraction in the middle of [lo, hi] of the image."""
    h, w = shape
    fraction = rng.uniform(lo + 0.25 * (hi - lo), lo + 0.75 * (hi - lo))
    aspect = rng.uniform(0.5, 2.0)
    ry = math.sqrt(fraction * h * w / (math.pi * aspect))
    ry, rx = min(max(ry, 0.5), h / 2), min(max(ry * aspect, 0.5), w / 2)
    cy, cx = rng.uniform(ry, max(ry, h - ry)), rng.uniform(rx, max(rx, w - rx))
    yy, xx = np.ogrid[:h, :w]
    mask = ((yy + 0.5 - cy) / ry) ** 2 + ((xx + 0.5 - cx) / rx) ** 2 <= 1.0
    if not mask.any():
        mask[min(int(cy), h - 1), min(int(cx), w - 1)] = True
    return mask


# --------------------------------------------------------------------------------------------------- textures


def make_texture(size: int, rng: np.random.Generator, kind: str = "noise") -> np.ndarray:
    """Draw a plausible defect-free industrial texture.

    Each kind has a fixed style (palette, scale, orientation) with small random variation (phase, exact period,
    colour jitter, sensor noise), so images of one kind look like different shots of the same product:
    ``noise`` grainy brushed metal, ``stripes`` oriented sinusoidal stripes, ``grid`` a woven mesh, ``blobs`` smooth
    mottled patches.

    Args:
        size: Side length in pixels.
        rng: Random generator.
        kind: One of ``TEXTURE_KINDS``.

    Returns:
        uint8 array (size, size, 3).

    Raises:
        ConfigError: ``size`` is not a positive integer or ``kind`` is unknown.
    """
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ConfigError(f"texture size must be a positive integer, got {size!r}")
    if kind not in TEXTURE_KINDS:
        raise ConfigError(f"unknown texture kind {kind!r}; allowed: {', '.join(TEXTURE_KINDS)}")
    drawer = {"noise": _noise_texture, "stripes": _stripe_texture, "grid": _grid_texture, "blobs": _blob_texture}
    image = drawer[kind](int(size), rng) + rng.normal(0.0, 3.0, (int(size), int(size), 1))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _jitter(colour: tuple[float, float, float], rng: np.random.Generator, amount: float = 8.0) -> np.ndarray:
    """Colour (3,) with a small random offset."""
    return np.asarray(colour, dtype=np.float64) + rng.uniform(-amount, amount, 3)


def _two_tone(weight: np.ndarray, dark: np.ndarray, light: np.ndarray) -> np.ndarray:
    """Blend two colours (3,) by a weight map (H, W) in [0, 1]; returns float (H, W, 3)."""
    return dark + weight[..., None] * (light - dark)


def _noise_texture(size: int, rng: np.random.Generator) -> np.ndarray:
    """Grainy grey metal: fine anisotropic grain over a gentle shading; float (size, size, 3)."""
    grain = perlin_noise((size, size), (max(1, size // 4), max(1, size // 16)), rng)
    shading = perlin_noise((size, size), (2, 2), rng)
    base = _jitter((150.0, 150.0, 156.0), rng)
    return base + (22.0 * grain + 10.0 * shading)[..., None]


def _stripe_texture(size: int, rng: np.random.Generator) -> np.ndarray:
    """Blue-grey stripes at about 20 degrees with a period of about size/8; float (size, size, 3)."""
    period = max(4.0, size / 8.0) * rng.uniform(0.92, 1.08)
    angle = math.radians(20.0 + rng.uniform(-3.0, 3.0))
    yy, xx = np.mgrid[:size, :size].astype(np.float64)
    phase = (xx * math.cos(angle) + yy * math.sin(angle)) * (2 * math.pi / period) + rng.uniform(0, 2 * math.pi)
    weight = 0.5 + 0.5 * np.sin(phase)
    return _two_tone(weight, _jitter((60.0, 72.0, 95.0), rng), _jitter((170.0, 180.0, 200.0), rng))


def _grid_texture(size: int, rng: np.random.Generator) -> np.ndarray:
    """Brown woven mesh: darker threads every ~size/6 pixels in both directions; float (size, size, 3)."""
    period = max(4.0, size / 6.0) * rng.uniform(0.95, 1.05)
    yy, xx = np.mgrid[:size, :size].astype(np.float64)
    offy, offx = rng.uniform(0, period, 2)
    dist = np.minimum(_line_distance(yy + offy, period), _line_distance(xx + offx, period))
    weight = np.clip(dist / (0.18 * period), 0.0, 1.0)
    return _two_tone(weight, _jitter((70.0, 55.0, 40.0), rng), _jitter((175.0, 150.0, 115.0), rng))


def _line_distance(coord: np.ndarray, period: float) -> np.ndarray:
    """Distance (pixels) from each coordinate to the nearest multiple of ``period``."""
    r = np.mod(coord, period)
    return np.minimum(r, period - r)


def _blob_texture(size: int, rng: np.random.Generator) -> np.ndarray:
    """Green mottled surface from soft-thresholded low-frequency noise; float (size, size, 3)."""
    noise = perlin_noise((size, size), (4, 4), rng) + 0.3 * perlin_noise((size, size), (8, 8), rng)
    weight = 1.0 / (1.0 + np.exp(-5.0 * noise))
    return _two_tone(weight, _jitter((80.0, 115.0, 70.0), rng), _jitter((150.0, 175.0, 115.0), rng))


# --------------------------------------------------------------------------------------------------- anomalies


def synthesize_anomaly(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    mask: np.ndarray | None = None,
    mode: str = "texture",
    beta: float = TEXTURE_BETA,
) -> tuple[np.ndarray, np.ndarray]:
    """Plant a synthetic defect in an image; pixels outside the mask are left untouched.

    Modes:
        ``texture``: blend a foreign texture (another :func:`make_texture` draw, or the image's own content rotated,
        shifted and colour-jittered) into the mask with opacity ``beta``; the source's mean intensity is pushed at
        least 60 grey levels away from the covered region so the defect is clearly visible.
        ``colour``: add a random colour cast of 50..90 levels (one channel up, one down, one random) inside the mask.
        ``dark``: scale intensities inside the mask by 0.25..0.5.
        ``bright``: move intensities inside the mask 50..80 % of the way to white.

    Args:
        image: uint8 array (H, W, 3).
        rng: Random generator.
        mask: Boolean (H, W) defect region; None draws one with :func:`perlin_mask`.
        mode: One of ``ANOMALY_MODES``.
        beta: Opacity of the foreign texture for ``mode="texture"``, in (0, 1].

    Returns:
        ``(anomalous, mask)``: uint8 array (H, W, 3) and boolean array (H, W) of the defect region.

    Raises:
        ConfigError: Bad image, mask, mode or beta.
    """
    _check_image(image)
    if mode not in ANOMALY_MODES:
        raise ConfigError(f"unknown anomaly mode {mode!r}; allowed: {', '.join(ANOMALY_MODES)}")
    if not 0.0 < beta <= 1.0:
        raise ConfigError(f"texture anomaly beta must be in (0, 1], got {beta!r}")
    region = perlin_mask(image.shape[:2], rng) if mask is None else _check_mask(mask, image.shape[:2])
    if not region.any():
        return image.copy(), region
    changed = _PLANTERS[mode](image.astype(np.float64), region, rng, beta)
    out = np.clip(np.rint(changed), 0, 255).astype(np.uint8)
    out[~region] = image[~region]
    return out, region


def _check_image(image: np.ndarray) -> None:
    """Raise ConfigError unless ``image`` is a uint8 (H, W, 3) array."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ConfigError(f"image must be a uint8 array of shape (H, W, 3), got {got}")


def _check_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Return ``mask`` as bool (H, W) or raise ConfigError if its shape does not match the image."""
    arr = np.asarray(mask)
    if arr.shape != tuple(shape):
        raise ConfigError(f"mask shape {arr.shape} does not match the image shape {tuple(shape)}")
    return arr.astype(bool)


def _plant_texture(img: np.ndarray, region: np.ndarray, rng: np.random.Generator, beta: float) -> np.ndarray:
    """Blend a contrast-boosted foreign texture into the region; float (H, W, 3)."""
    source = _foreign_source(img, rng)
    gap = source[region].mean() - img[region].mean()
    if abs(gap) < _MIN_CONTRAST:
        direction = 1.0 if img[region].mean() < 128.0 else -1.0
        source = np.clip(source + direction * _MIN_CONTRAST - gap, 0.0, 255.0)
    blended = (1.0 - beta) * img + beta * source
    return np.where(region[..., None], blended, img)


def _foreign_source(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A texture unlike the image: a fresh random-kind texture (70 %) or the image rotated, rolled and recoloured."""
    h, w = img.shape[:2]
    if rng.random() < 0.7:
        kind = TEXTURE_KINDS[int(rng.integers(len(TEXTURE_KINDS)))]
        return make_texture(max(h, w), rng, kind)[:h, :w].astype(np.float64)
    k = int(rng.integers(1, 4)) if h == w else 2
    moved = np.roll(np.rot90(img, k), (int(rng.integers(h)), int(rng.integers(w))), axis=(0, 1))
    gains = rng.uniform(0.6, 1.4, 3)
    return np.clip(moved[..., rng.permutation(3)] * gains + rng.uniform(-40, 40, 3), 0.0, 255.0)


def _plant_colour(img: np.ndarray, region: np.ndarray, rng: np.random.Generator, beta: float) -> np.ndarray:
    """Add a colour cast (one channel up, one down, one random) inside the region; float (H, W, 3)."""
    cast = rng.permutation(np.array([1.0, -1.0, rng.uniform(-1.0, 1.0)])) * rng.uniform(50.0, 90.0)
    return np.where(region[..., None], img + cast, img)


def _plant_dark(img: np.ndarray, region: np.ndarray, rng: np.random.Generator, beta: float) -> np.ndarray:
    """Darken the region by a factor of 0.25..0.5; float (H, W, 3)."""
    return np.where(region[..., None], img * rng.uniform(0.25, 0.5), img)


def _plant_bright(img: np.ndarray, region: np.ndarray, rng: np.random.Generator, beta: float) -> np.ndarray:
    """Brighten the region 50..80 % of the way to white; float (H, W, 3)."""
    return np.where(region[..., None], img + (255.0 - img) * rng.uniform(0.5, 0.8), img)


_PLANTERS = {"texture": _plant_texture, "colour": _plant_colour, "dark": _plant_dark, "bright": _plant_bright}


# --------------------------------------------------------------------------------------------------- dataset writer


def make_synthetic_dataset(
    root: str | Path,
    category: str = "tex",
    *,
    n_train: int = 8,
    n_good: int = 4,
    n_bad: int = 4,
    size: int = 64,
    kind: str = "stripes",
    seed: int = 0,
    modes: Sequence[str] = ("texture",),
    overwrite: bool = False,
) -> Path:
    """Write a small MVTec-layout dataset of one texture kind with planted defects.

    Files: ``root/category/train/good/NNN.png`` (n_train), ``test/good/NNN.png`` (n_good),
    ``test/synthetic/NNN.png`` (n_bad) and ``ground_truth/synthetic/NNN_mask.png`` (0/255 L masks). Defect regions
    cover 2..25 % of the image; defect ``i`` uses ``modes[i % len(modes)]``. Output depends only on the arguments.

    Args:
        root: Dataset root; created if missing.
        category: Category folder name.
        n_train: Normal training images.
        n_good: Normal test images.
        n_bad: Anomalous test images.
        size: Image side in pixels (at least ``MIN_SIDE``).
        kind: Texture kind, one of ``TEXTURE_KINDS``.
        seed: Random seed.
        modes: Anomaly modes to cycle through, each one of ``ANOMALY_MODES``.
        overwrite: Replace the ``train``, ``test`` and ``ground_truth`` folders of an existing non-empty category
            folder instead of refusing.

    Returns:
        The category folder ``root/category``.

    Raises:
        ConfigError: Bad counts, size, kind, mode or category name.
        DatasetError: The category folder exists, is not empty and ``overwrite`` is False.
    """
    _check_dataset_options(category, (n_train, n_good, n_bad), size, kind, modes)
    cat_dir = _prepare_category_dir(Path(root) / category, overwrite)
    rng = np.random.default_rng(seed)
    for i in range(n_train):
        _save(make_texture(size, rng, kind), cat_dir / "train" / "good" / f"{i:03d}.png")
    for i in range(n_good):
        _save(make_texture(size, rng, kind), cat_dir / "test" / "good" / f"{i:03d}.png")
    for i in range(n_bad):
        region = perlin_mask((size, size), rng, min_area_fraction=0.02, max_area_fraction=0.25)
        bad, region = synthesize_anomaly(make_texture(size, rng, kind), rng, mask=region, mode=modes[i % len(modes)])
        _save(bad, cat_dir / "test" / "synthetic" / f"{i:03d}.png")
        _save(region.astype(np.uint8) * 255, cat_dir / "ground_truth" / "synthetic" / f"{i:03d}_mask.png")
    return cat_dir


def _check_dataset_options(
    category: str, counts: tuple[int, int, int], size: int, kind: str, modes: Sequence[str]
) -> None:
    """Validate :func:`make_synthetic_dataset` options."""
    if not category or not isinstance(category, str) or "/" in category or "\\" in category or category in (".", ".."):
        raise ConfigError(f"category must be a plain folder name, got {category!r}")
    if any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in counts):
        raise ConfigError(f"n_train, n_good and n_bad must be non-negative integers, got {counts!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < MIN_SIDE:
        raise ConfigError(f"size must be an integer >= {MIN_SIDE}, got {size!r}")
    if kind not in TEXTURE_KINDS:
        raise ConfigError(f"unknown texture kind {kind!r}; allowed: {', '.join(TEXTURE_KINDS)}")
    if isinstance(modes, str) or not modes or any(m not in ANOMALY_MODES for m in modes):
        raise ConfigError(f"modes must be a non-empty list of {', '.join(ANOMALY_MODES)}; got {modes!r}")


def _prepare_category_dir(cat_dir: Path, overwrite: bool) -> Path:
    """Create the category folder, refusing (or clearing, with ``overwrite``) a non-empty one."""
    if cat_dir.exists() and not cat_dir.is_dir():
        raise DatasetError(f"cannot write synthetic dataset: {cat_dir} exists and is not a directory")
    if cat_dir.is_dir() and any(cat_dir.iterdir()):
        if not overwrite:
            raise DatasetError(f"refusing to write synthetic dataset into non-empty {cat_dir}; pass overwrite=True")
        for sub in ("train", "test", "ground_truth"):
            if (cat_dir / sub).is_dir():
                shutil.rmtree(cat_dir / sub)
    cat_dir.mkdir(parents=True, exist_ok=True)
    return cat_dir


def _save(array: np.ndarray, path: Path) -> None:
    """Save a uint8 (H, W, 3) or (H, W) array as PNG, creating parent folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
