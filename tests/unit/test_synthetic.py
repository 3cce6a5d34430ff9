"""Tests for vlad.data.synthetic: Perlin noise and masks, textures, planted anomalies, dataset writer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vlad.data.datasets import load_mvtec
from vlad.data.images import load_image, load_mask
from vlad.data.synthetic import (
    ANOMALY_MODES,
    TEXTURE_KINDS,
    make_synthetic_dataset,
    make_texture,
    perlin_mask,
    perlin_noise,
    synthesize_anomaly,
)
from vlad.errors import ConfigError, DatasetError


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# --------------------------------------------------------------------------------------------------- Perlin


@pytest.mark.parametrize(("shape", "res"), [((64, 64), (4, 4)), ((50, 37), (3, 5)), ((17, 90), (1, 8))])
def test_perlin_noise_shape_and_range(shape: tuple[int, int], res: tuple[int, int]) -> None:
    noise = perlin_noise(shape, res, _rng())
    assert noise.shape == shape
    assert noise.dtype == np.float64
    assert noise.min() >= -1.0
    assert noise.max() <= 1.0
    assert noise.std() > 0.05  # not degenerate


def test_perlin_noise_deterministic_and_smooth() -> None:
    a = perlin_noise((64, 64), (4, 4), _rng(3))
    np.testing.assert_array_equal(a, perlin_noise((64, 64), (4, 4), _rng(3)))
    assert not np.array_equal(a, perlin_noise((64, 64), (4, 4), _rng(4)))
    assert np.abs(np.diff(a, axis=0)).max() < 0.2  # 16-pixel cells: neighbouring pixels are close


def test_perlin_noise_bad_args() -> None:
    with pytest.raises(ConfigError, match="res must be a pair of positive integers"):
        perlin_noise((8, 8), (0, 2), _rng())
    with pytest.raises(ConfigError, match="shape"):
        perlin_noise((8,), (2, 2), _rng())  # type: ignore[arg-type]


def test_perlin_mask_area_bounds() -> None:
    rng = _rng(1)
    for _ in range(40):
        mask = perlin_mask((64, 48), rng, min_area_fraction=0.01, max_area_fraction=0.2)
        assert mask.dtype == bool
        assert mask.shape == (64, 48)
        assert 0.01 <= mask.mean() <= 0.2


def test_perlin_mask_deterministic() -> None:
    np.testing.assert_array_equal(perlin_mask((32, 32), _rng(5)), perlin_mask((32, 32), _rng(5)))


def test_perlin_mask_falls_back_to_ellipse() -> None:
    # threshold 0.999 is (almost) never reached by the noise, so every try fails and the ellipse is used
    mask = perlin_mask((64, 64), _rng(2), threshold=0.999, min_area_fraction=0.05, max_area_fraction=0.1)
    assert 0.05 <= mask.mean() <= 0.1
    ys, xs = np.nonzero(mask)
    assert (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1) < 2 * mask.sum()  # one compact blob


def test_perlin_mask_bad_options() -> None:
    with pytest.raises(ConfigError, match="area fractions"):
        perlin_mask((16, 16), _rng(), min_area_fraction=0.5, max_area_fraction=0.1)
    with pytest.raises(ConfigError, match="scales"):
        perlin_mask((16, 16), _rng(), min_scale=3, max_scale=3)


# --------------------------------------------------------------------------------------------------- textures


@pytest.mark.parametrize("kind", TEXTURE_KINDS)
def test_make_texture(kind: str) -> None:
    tex = make_texture(48, _rng(0), kind)
    assert tex.shape == (48, 48, 3)
    assert tex.dtype == np.uint8
    assert tex.std() > 2.0
    np.testing.assert_array_equal(tex, make_texture(48, _rng(0), kind))
    other = make_texture(48, _rng(1), kind)
    assert not np.array_equal(tex, other)
    # same style per kind: mean colours of two draws are close
    assert np.abs(tex.mean(axis=(0, 1)) - other.mean(axis=(0, 1))).max() < 25


def test_make_texture_bad_args() -> None:
    with pytest.raises(ConfigError, match=r"unknown texture kind 'wood'; allowed: noise, stripes, grid, blobs"):
        make_texture(16, _rng(), "wood")
    with pytest.raises(ConfigError, match="positive integer"):
        make_texture(0, _rng())


# --------------------------------------------------------------------------------------------------- anomalies


@pytest.mark.parametrize("mode", ANOMALY_MODES)
def test_anomaly_changes_only_inside_mask(mode: str) -> None:
    image = make_texture(64, _rng(0), "stripes")
    out, mask = synthesize_anomaly(image, _rng(1), mode=mode)
    assert out.shape == image.shape
    assert out.dtype == np.uint8
    assert mask.dtype == bool
    assert mask.shape == (64, 64)
    assert mask.any()
    np.testing.assert_array_equal(out[~mask], image[~mask])
    diff = np.abs(out.astype(int) - image.astype(int)).sum(axis=-1)
    assert (diff[mask] > 0).mean() > 0.9
    if mode in ("texture", "colour"):
        assert diff[mask].mean() > 60  # strong, clearly visible defect


@pytest.mark.parametrize("kind", TEXTURE_KINDS)
def test_texture_anomaly_is_strong_on_every_kind(kind: str) -> None:
    for seed in range(4):
        image = make_texture(48, _rng(seed), kind)
        out, mask = synthesize_anomaly(image, _rng(100 + seed))
        diff = np.abs(out.astype(float) - image.astype(float)).mean(axis=-1)
        assert diff[mask].mean() > 30


def test_anomaly_deterministic_and_given_mask() -> None:
    image = make_texture(32, _rng(0), "grid")
    a = synthesize_anomaly(image, _rng(9))
    b = synthesize_anomaly(image, _rng(9))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    given = np.zeros((32, 32), dtype=bool)
    given[8:16, 8:20] = True
    out, mask = synthesize_anomaly(image, _rng(0), mask=given, mode="colour")
    np.testing.assert_array_equal(mask, given)
    np.testing.assert_array_equal(out[~given], image[~given])
    empty_out, _ = synthesize_anomaly(image, _rng(0), mask=np.zeros((32, 32), dtype=bool))
    np.testing.assert_array_equal(empty_out, image)


def test_anomaly_bad_args() -> None:
    image = make_texture(16, _rng(), "noise")
    with pytest.raises(ConfigError, match=r"uint8 array of shape \(H, W, 3\)"):
        synthesize_anomaly(image.astype(np.float32), _rng())
    with pytest.raises(ConfigError, match="mask shape"):
        synthesize_anomaly(image, _rng(), mask=np.zeros((8, 8), dtype=bool))
    with pytest.raises(ConfigError, match=r"unknown anomaly mode 'melt'; allowed: texture, colour, dark, bright"):
        synthesize_anomaly(image, _rng(), mode="melt")
    with pytest.raises(ConfigError, match="beta"):
        synthesize_anomaly(image, _rng(), beta=0.0)


# --------------------------------------------------------------------------------------------------- dataset writer


def test_synthetic_dataset_loads_as_mvtec(tmp_path: Path) -> None:
    cat_dir = make_synthetic_dataset(tmp_path / "ds", n_train=3, n_good=2, n_bad=3, size=32, seed=1)
    assert cat_dir == tmp_path / "ds" / "tex"
    test = load_mvtec(tmp_path / "ds")
    assert [s.label for s in test] == [0, 0, 1, 1, 1]
    assert {s.defect for s in test} == {"good", "synthetic"}
    train = load_mvtec(tmp_path / "ds", "tex", split="train")
    assert len(train) == 3
    for s in test:
        assert np.asarray(load_image(s.path)).shape == (32, 32, 3)
        if s.label == 1:
            assert s.mask_path is not None
            mask = load_mask(s.mask_path)
            assert mask.shape == (32, 32)
            assert 0.02 <= mask.mean() <= 0.25


def test_synthetic_dataset_deterministic(tmp_path: Path) -> None:
    kwargs = {"n_train": 1, "n_good": 1, "n_bad": 2, "size": 24, "kind": "blobs", "seed": 3}
    a = make_synthetic_dataset(tmp_path / "a", "c", **kwargs)
    b = make_synthetic_dataset(tmp_path / "b", "c", **kwargs)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*.png"))
    assert len(files_a) == 6
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes()


def test_synthetic_dataset_modes_and_overwrite(tmp_path: Path) -> None:
    make_synthetic_dataset(tmp_path, "c", n_train=0, n_good=0, n_bad=1, size=16)
    with pytest.raises(DatasetError, match="non-empty.*overwrite=True"):
        make_synthetic_dataset(tmp_path, "c", n_train=0, n_good=0, n_bad=1, size=16)
    make_synthetic_dataset(tmp_path, "c", n_train=0, n_good=0, n_bad=4, size=16, modes=ANOMALY_MODES, overwrite=True)
    assert len(list((tmp_path / "c" / "test" / "synthetic").glob("*.png"))) == 4


def test_synthetic_dataset_bad_args(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="size must be an integer >= 8"):
        make_synthetic_dataset(tmp_path, size=4)
    with pytest.raises(ConfigError, match="non-negative integers"):
        make_synthetic_dataset(tmp_path, n_bad=-1)
    with pytest.raises(ConfigError, match="plain folder name"):
        make_synthetic_dataset(tmp_path, "a/b")
    with pytest.raises(ConfigError, match="modes"):
        make_synthetic_dataset(tmp_path, modes=("glow",))
