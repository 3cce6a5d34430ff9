"""Data loading for vlad: safe image/mask loading, dataset indexing and synthetic anomalies (numpy/Pillow only)."""

from __future__ import annotations

from vlad.data.datasets import (
    LAYOUTS,
    SPLITS,
    VISA_CLASS_NAMES,
    VISA_SPLIT_CSV,
    Sample,
    list_categories,
    load_dataset,
    load_folder,
    load_mvtec,
    load_visa,
    prompt_name,
    reference_images,
)
from vlad.data.images import (
    IMAGE_EXTENSIONS,
    MAX_ASPECT_RATIO,
    MAX_PIXELS,
    MIN_SIDE,
    expand_inputs,
    load_image,
    load_mask,
)
from vlad.data.synthetic import (
    ANOMALY_MODES,
    TEXTURE_BETA,
    TEXTURE_KINDS,
    make_synthetic_dataset,
    make_texture,
    perlin_mask,
    perlin_noise,
    synthesize_anomaly,
)

__all__ = [
    "ANOMALY_MODES",
    "IMAGE_EXTENSIONS",
    "LAYOUTS",
    "MAX_ASPECT_RATIO",
    "MAX_PIXELS",
    "MIN_SIDE",
    "SPLITS",
    "TEXTURE_BETA",
    "TEXTURE_KINDS",
    "VISA_CLASS_NAMES",
    "VISA_SPLIT_CSV",
    "Sample",
    "expand_inputs",
    "list_categories",
    "load_dataset",
    "load_folder",
    "load_image",
    "load_mask",
    "load_mvtec",
    "load_visa",
    "make_synthetic_dataset",
    "make_texture",
    "perlin_mask",
    "perlin_noise",
    "prompt_name",
    "reference_images",
    "synthesize_anomaly",
]
