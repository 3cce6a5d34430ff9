"""Shared fixtures. Everything runs offline on CPU with tiny random models."""

from __future__ import annotations

import os

# Before anything imports huggingface_hub (open_clip does): never touch the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_backbone():
    """The bundled random ``vlad-tiny`` ViT (64 px, 8 px patches, 4 layers), loaded once per session."""
    import torch

    from vlad.backbones import load_backbone

    torch.manual_seed(0)
    return load_backbone("random:tiny", device="cpu")


@pytest.fixture(scope="session")
def texture_set():
    """Synthetic 'stripes' textures: 6 normal references, 1 normal test image, 1 test image with a planted defect
    (and its mask), all 128 x 128."""
    from vlad.data.synthetic import make_texture, synthesize_anomaly

    rng = np.random.default_rng(7)
    refs = [make_texture(128, rng, kind="stripes") for _ in range(6)]
    good = make_texture(128, rng, kind="stripes")
    base = make_texture(128, rng, kind="stripes")
    mask = np.zeros((128, 128), bool)
    mask[40:72, 70:102] = True
    bad, mask = synthesize_anomaly(base, rng, mask=mask, mode="texture")
    return {"refs": refs, "good": good, "bad": bad, "mask": mask}


@pytest.fixture
def sample_images(tmp_path: Path) -> Path:
    """A folder with three small synthetic images."""
    from PIL import Image

    from vlad.data.synthetic import make_texture

    rng = np.random.default_rng(1)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(make_texture(48 + 8 * i, rng, kind="grid")).save(folder / f"part{i}.png")
    return folder


@pytest.fixture
def fake():
    """An in-process fake OpenAI-compatible server on 127.0.0.1 (request layout, errors, canned replies)."""
    from tests.helpers.fake_openai import FakeOpenAI

    server = FakeOpenAI().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray with two CPUs for the whole session (its start costs ~10 s, paid once), shut down at the end.

    The workers get this checkout on their path, so they import this ``vlad`` and ``tests.helpers``.
    """
    ray = pytest.importorskip("ray")
    root = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in [root, os.environ.get("PYTHONPATH", "")] if p)
    env = {"PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        configure_logging=False,
        log_to_driver=False,
        runtime_env={"env_vars": env},
    )
    yield ray
    ray.shutdown()
