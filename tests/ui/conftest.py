"""Fixtures for the web UI: one shared service on the tiny random backbone, sample uploads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SAMPLES = Path(__file__).resolve().parents[2] / "vlad" / "samples"


@pytest.fixture(scope="session")
def service():
    from webui.service import InspectorService

    return InspectorService(backbone="random:tiny", device="cpu")


@pytest.fixture
def uploads(tmp_path):
    good = tmp_path / "good.png"
    Image.open(SAMPLES / "good_0.png").save(good)
    bad = tmp_path / "defect.png"
    Image.open(SAMPLES / "defect_colour.png").save(bad)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(good.read_bytes()[:200])
    big = tmp_path / "big.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (900, 900, 3), dtype=np.uint8)).save(big)  # ~2.4 MB of noise
    return {"good": good, "bad": bad, "corrupt": corrupt, "big": big}
