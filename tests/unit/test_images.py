"""Tests for vlad.data.images: safe loading of every bad input and every image mode, masks, input expansion."""

from __future__ import annotations

import io
import struct
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlad.data import images
from vlad.data.images import IMAGE_EXTENSIONS, expand_inputs, load_image, load_mask
from vlad.errors import ConfigError, ImageLoadError


def _save(im: Image.Image, path: Path, **kwargs: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, **kwargs)
    return path


def _random_rgb(size: tuple[int, int] = (32, 32), seed: int = 0) -> Image.Image:
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(arr)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _header_only_png(path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose header claims ``width x height`` (1-bit grey) but whose data is a few bytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    data = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")
    path.write_bytes(data)
    return path


def _load_array(path: Path) -> np.ndarray:
    im = load_image(path)
    assert im.mode == "RGB"
    arr = np.asarray(im)
    assert arr.dtype == np.uint8
    assert arr.ndim == 3
    assert arr.shape[2] == 3
    return arr


# --------------------------------------------------------------------------------------------------- bad inputs


def test_load_plain_rgb_png(tmp_path: Path) -> None:
    src = _random_rgb((40, 24))
    arr = _load_array(_save(src, tmp_path / "ok.png"))
    assert arr.shape == (24, 40, 3)
    np.testing.assert_array_equal(arr, np.asarray(src))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageLoadError, match=r"image not found: .*nope\.png"):
        load_image(tmp_path / "nope.png")


def test_directory(tmp_path: Path) -> None:
    d = tmp_path / "folder.png"
    d.mkdir()
    with pytest.raises(ImageLoadError, match=r"directory.*folder\.png"):
        load_image(d)


def test_zero_byte_file(tmp_path: Path) -> None:
    p = tmp_path / "empty.png"
    p.write_bytes(b"")
    with pytest.raises(ImageLoadError, match=r"empty file.*empty\.png"):
        load_image(p)


def test_text_file_named_png(tmp_path: Path) -> None:
    p = tmp_path / "notes.png"
    p.write_text("hello, I am not a picture\n")
    with pytest.raises(ImageLoadError, match=r"not an image file: .*notes\.png \(Pillow cannot identify it\)"):
        load_image(p)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_image(tmp_path: Path, fmt: str) -> None:
    buf = io.BytesIO()
    _random_rgb((64, 64)).save(buf, format=fmt)
    p = tmp_path / f"cut.{fmt.lower()}"
    p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageLoadError, match=r"corrupt or truncated image: .*cut\.") as info:
        load_image(p)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("width", "height"),
    [
        (30000, 30000),  # Pillow's own DecompressionBombError at open
        (10000, 9000),  # Pillow's DecompressionBombWarning, escalated
        (9000, 9000),  # under Pillow's limits, over vlad's MAX_PIXELS
    ],
)
def test_decompression_bomb_rejected_from_header(tmp_path: Path, width: int, height: int) -> None:
    p = _header_only_png(tmp_path / "bomb.png", width, height)
    assert p.stat().st_size < 1000
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(ImageLoadError, match=r"image too large: .*bomb\.png") as info:
            load_image(p)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - start < 2.0
    assert peak < 5_000_000  # nothing near width * height bytes was allocated
    message = str(info.value)
    assert "\n" not in message
    assert "downscale" in message
    assert f"{images.MAX_PIXELS:,}" in message
    assert f"{width * height:,} pixels" in message  # the size, read from the header


def test_own_pixel_limit_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(images, "MAX_PIXELS", 1000)
    p = _save(_random_rgb((40, 30)), tmp_path / "big.png")
    with pytest.raises(ImageLoadError, match=r"image too large: .*big\.png is 40x30 = 1,200 pixels.*1,000.*downscale"):
        load_image(p)


def test_extreme_aspect_ratio(tmp_path: Path) -> None:
    p = _save(Image.new("L", (250, 10), 128), tmp_path / "strip.png")
    with pytest.raises(ImageLoadError, match=r"aspect ratio: .*strip\.png.*ratio 25\.0, limit 20.*crop or tile"):
        load_image(p)


def test_aspect_ratio_at_limit_is_accepted(tmp_path: Path) -> None:
    p = _save(Image.new("L", (200, 10), 128), tmp_path / "ok_strip.png")
    assert load_image(p).size == (200, 10)


def test_side_too_small(tmp_path: Path) -> None:
    p = _save(Image.new("RGB", (7, 20)), tmp_path / "tiny.png")
    with pytest.raises(ImageLoadError, match=r"too small: .*tiny\.png is 7x20.*at least 8"):
        load_image(p)


# --------------------------------------------------------------------------------------------------- modes


def test_mode_l(tmp_path: Path) -> None:
    arr = _load_array(_save(Image.new("L", (8, 8), 100), tmp_path / "l.png"))
    assert (arr == 100).all()


def test_mode_1_bilevel(tmp_path: Path) -> None:
    bits = np.zeros((8, 8), dtype=bool)
    bits[:, 4:] = True
    arr = _load_array(_save(Image.fromarray(bits), tmp_path / "one.png"))
    assert (arr[:, :4] == 0).all()
    assert (arr[:, 4:] == 255).all()


def test_mode_la_composited_on_grey(tmp_path: Path) -> None:
    la = np.zeros((8, 8, 2), dtype=np.uint8)
    la[..., 0] = 200
    la[:, :4, 1] = 255  # opaque left half
    la[:, 4:, 1] = 0  # transparent right half
    arr = _load_array(_save(Image.fromarray(la, "LA"), tmp_path / "la.png"))
    assert (arr[:, :4] == 200).all()
    assert (arr[:, 4:] == 128).all()  # neutral grey, not black (black paints fake specks)


def test_mode_rgba_composited_on_grey(tmp_path: Path) -> None:
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[:, :, :3] = (10, 20, 30)
    rgba[:, :4, 3] = 255
    rgba[:, 4:6, :] = (255, 0, 0, 0)  # fully transparent red -> mid-grey
    rgba[:, 6:, :] = (200, 100, 50, 128)  # half transparent
    arr = _load_array(_save(Image.fromarray(rgba, "RGBA"), tmp_path / "rgba.png"))
    assert (arr[:, :4] == (10, 20, 30)).all()
    assert (arr[:, 4:6] == 128).all()
    a = 128 / 255
    np.testing.assert_allclose(arr[0, 7], np.array([200, 100, 50]) * a + 128 * (1 - a), atol=1.5)


def test_mode_p_palette(tmp_path: Path) -> None:
    im = Image.new("P", (8, 8), 1)
    im.putpalette([0, 0, 0, 10, 200, 30] + [0, 0, 0] * 254)
    arr = _load_array(_save(im, tmp_path / "p.png"))
    assert (arr == (10, 200, 30)).all()


def test_mode_p_with_transparency(tmp_path: Path) -> None:
    idx = np.ones((8, 8), dtype=np.uint8)
    idx[:, 4:] = 2
    im = Image.fromarray(idx, "L").convert("P")
    im.putpalette([0, 0, 0, 10, 200, 30, 255, 255, 255] + [0, 0, 0] * 253)
    im.info["transparency"] = 2
    arr = _load_array(_save(im, tmp_path / "pt.png", transparency=2))
    assert (arr[:, :4] == (10, 200, 30)).all()
    assert (arr[:, 4:] == 128).all()


def test_mode_pa(tmp_path: Path) -> None:
    pa = np.zeros((8, 8, 2), dtype=np.uint8)
    pa[..., 0] = 1
    pa[:, :4, 1] = 255
    im = Image.frombytes("PA", (8, 8), pa.tobytes())
    im.putpalette([0, 0, 0, 10, 200, 30] + [0, 0, 0] * 254)
    arr = _load_array(_save(im, tmp_path / "pa.tif"))
    assert (arr[:, :4] == (10, 200, 30)).all()
    assert (arr[:, 4:] == 128).all()


def test_mode_cmyk(tmp_path: Path) -> None:
    cmyk = np.zeros((8, 8, 4), dtype=np.uint8)
    cmyk[:, 4:, 0] = 255  # pure cyan on the right
    arr = _load_array(_save(Image.fromarray(cmyk, "CMYK"), tmp_path / "cmyk.tif"))
    assert (arr[:, :4] == 255).all()
    assert (arr[:, 4:] == (0, 255, 255)).all()


@pytest.mark.parametrize(("mode", "suffix"), [("I;16", ".png"), ("I;16B", ".tif"), ("I", ".tif")])
def test_sixteen_bit_full_range_scaled_not_clipped(tmp_path: Path, mode: str, suffix: str) -> None:
    values = np.array([0, 257, 32896, 65535] * 16, dtype=np.int64).reshape(8, 8)
    if mode == "I":
        im = Image.fromarray(values.astype(np.int32))
    else:
        im = Image.new(mode, (8, 8))
        im.putdata(values.ravel().tolist())
    path = _save(im, tmp_path / f"deep{suffix}")
    with Image.open(path) as reopened:
        assert reopened.mode.startswith("I")
    arr = _load_array(path)
    np.testing.assert_array_equal(arr[..., 0], np.array([0, 1, 128, 255] * 16).reshape(8, 8))
    assert (arr[..., 0] == arr[..., 2]).all()


def test_mode_i_outside_16_bit_is_min_max_normalised(tmp_path: Path) -> None:
    values = np.tile(np.array([-1000, 0, 99000, 199000], dtype=np.int32), (8, 2))
    arr = _load_array(_save(Image.fromarray(values), tmp_path / "wide.tif"))
    np.testing.assert_array_equal(arr[0, :4, 0], [0, 1, 128, 255])


def test_mode_f_min_max(tmp_path: Path) -> None:
    values = np.tile(np.array([-1.0, 0.0, 1.0, 3.0], dtype=np.float32), (8, 2))
    arr = _load_array(_save(Image.fromarray(values), tmp_path / "float.tif"))
    np.testing.assert_array_equal(arr[0, :4, 1], [0, 64, 128, 255])


def test_mode_f_constant_is_black(tmp_path: Path) -> None:
    arr = _load_array(_save(Image.fromarray(np.full((8, 8), 5.0, np.float32)), tmp_path / "flat.tif"))
    assert (arr == 0).all()


def test_exif_orientation_applied(tmp_path: Path) -> None:
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:, :20] = (255, 0, 0)  # left half red
    arr[:, 20:] = (0, 0, 255)  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    p = _save(Image.fromarray(arr), tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=95)
    out = _load_array(p)
    assert out.shape == (40, 20, 3)  # width and height swapped
    assert out[5, 10, 0] > 200
    assert out[5, 10, 2] < 60
    assert out[35, 10, 2] > 200
    assert out[35, 10, 0] < 60


# --------------------------------------------------------------------------------------------------- masks


def test_load_mask_binarises(tmp_path: Path) -> None:
    m = np.zeros((16, 16), dtype=np.uint8)
    m[4:12, 4:12] = 255
    m[0, 0] = 100  # below the threshold
    mask = load_mask(_save(Image.fromarray(m), tmp_path / "m.png"))
    assert mask.dtype == bool
    assert mask.shape == (16, 16)
    assert mask.sum() == 64
    assert not mask[0, 0]


def test_load_mask_resize_takes_width_height(tmp_path: Path) -> None:
    m = np.zeros((16, 32), dtype=np.uint8)
    m[:, 16:] = 255
    mask = load_mask(_save(Image.fromarray(m), tmp_path / "m.png"), size=(8, 4))
    assert mask.shape == (4, 8)
    assert mask[:, 4:].all()
    assert not mask[:, :4].any()


def test_load_mask_label_style_values(tmp_path: Path) -> None:
    m = np.zeros((16, 16), dtype=np.uint8)
    m[2:6, 2:6] = 1
    m[10:12, 10:12] = 3
    mask = load_mask(_save(Image.fromarray(m), tmp_path / "labels.png"))
    assert mask.sum() == 16 + 4


def test_load_mask_rgb_and_bilevel(tmp_path: Path) -> None:
    rgb = np.zeros((8, 8, 3), dtype=np.uint8)
    rgb[:4] = 255
    assert load_mask(_save(Image.fromarray(rgb), tmp_path / "rgb.png")).sum() == 32
    bits = np.zeros((8, 8), dtype=bool)
    bits[:, :2] = True
    assert load_mask(_save(Image.fromarray(bits), tmp_path / "bits.png")).sum() == 16


def test_load_mask_errors(tmp_path: Path) -> None:
    with pytest.raises(ImageLoadError, match=r"missing_mask\.png"):
        load_mask(tmp_path / "missing_mask.png")
    p = _save(Image.new("L", (8, 8)), tmp_path / "m.png")
    with pytest.raises(ConfigError, match="width, height"):
        load_mask(p, size=(0, 8))


# --------------------------------------------------------------------------------------------------- expand_inputs


@pytest.fixture
def image_tree(tmp_path: Path) -> Path:
    root = tmp_path / "imgs"
    for rel in ["b.png", "a.jpg", "sub/c.JPG", "sub/deeper/d.tiff", ".hidden.png", ".cache/e.png"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    (root / "notes.txt").write_text("not an image")
    return root


def test_expand_directory_recursive_sorted(image_tree: Path) -> None:
    files, problems = expand_inputs([image_tree])
    assert [(p.name, msg.split(":")[0]) for p, msg in problems] == [("notes.txt", "not an image file")]
    assert [f.relative_to(image_tree).as_posix() for f in files] == ["a.jpg", "b.png", "sub/c.JPG", "sub/deeper/d.tiff"]


def test_expand_directory_non_recursive(image_tree: Path) -> None:
    files, _ = expand_inputs([image_tree], recursive=False)
    assert [f.name for f in files] == ["a.jpg", "b.png"]


def test_expand_problems(tmp_path: Path) -> None:
    empty, docs = tmp_path / "empty", tmp_path / "docs"
    empty.mkdir()
    docs.mkdir()
    (docs / "readme.md").write_text("x")
    files, problems = expand_inputs([tmp_path / "ghost.png", empty, docs])
    assert files == []
    assert problems[0] == (tmp_path / "ghost.png", f"image not found: {tmp_path / 'ghost.png'}")
    assert problems[1][0] == empty
    assert problems[1][1].startswith("directory contains no images (looked for .png, .jpg")
    assert all(ext in problems[1][1] for ext in IMAGE_EXTENSIONS)
    assert problems[2] == (
        docs / "readme.md",
        f"not an image file: {docs / 'readme.md'} (vlad reads .png, .jpg, .jpeg, .bmp, .tif, .tiff, .webp, .gif)",
    )


def test_expand_keeps_explicit_non_image_file_and_order_and_dedupes(image_tree: Path) -> None:
    notes = image_tree / "notes.txt"
    b = image_tree / "b.png"
    files, problems = expand_inputs([notes, b, image_tree, str(b), image_tree / "sub" / ".." / "a.jpg"])
    assert problems == []
    names = [f.relative_to(image_tree).as_posix() for f in files]
    assert names == ["notes.txt", "b.png", "a.jpg", "sub/c.JPG", "sub/deeper/d.tiff"]


def test_expand_single_string(image_tree: Path) -> None:
    files, problems = expand_inputs(str(image_tree / "b.png"))
    assert files == [image_tree / "b.png"]
    assert problems == []
