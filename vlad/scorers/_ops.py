"""Small tensor operations shared by scorers."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def gaussian_blur(
    maps: torch.Tensor, sigma: float, truncate: float = 4.0, radius: int | None = None, border: str = "symmetric"
) -> torch.Tensor:
    """(B, H, W) -> (B, H, W) separable Gaussian blur with reflected borders, as scipy's ``gaussian_filter``
    (``truncate=4``: radius ``int(4 * sigma + 0.5)``), or with a given ``radius`` (kernel ``2 radius + 1``).

    ``border="symmetric"`` mirrors with the edge repeated (scipy's ``reflect``: d c b a | a b c d); ``"reflect"``
    mirrors without repeating it (torch's and torchvision's ``reflect``: d c b | a b c d, as
    ``torchvision.transforms.GaussianBlur``)."""
    if border not in ("symmetric", "reflect"):
        raise ValueError(f"border must be 'symmetric' or 'reflect', got {border!r}")
    if sigma <= 0:
        return maps
    radius = int(truncate * sigma + 0.5) if radius is None else radius
    radius = min(radius, maps.shape[-1] - (border == "reflect"), maps.shape[-2] - (border == "reflect"))
    if radius < 1:
        return maps
    t = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    kernel = torch.exp(-(t**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    pad = _symmetric_pad if border == "symmetric" else _reflect_pad
    x = pad(maps[:, None], radius, dim=-1)
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    x = F.conv2d(pad(x, radius, dim=-2), kernel.view(1, 1, -1, 1))
    return x[:, 0]


def _symmetric_pad(x: torch.Tensor, r: int, dim: int) -> torch.Tensor:
    """Pad by mirroring with the edge repeated (scipy's 'reflect' mode: d c b a | a b c d | d c b a)."""
    n = x.shape[dim]
    head = x.narrow(dim, 0, r).flip(dim)
    tail = x.narrow(dim, n - r, r).flip(dim)
    return torch.cat([head, x, tail], dim=dim)


def _reflect_pad(x: torch.Tensor, r: int, dim: int) -> torch.Tensor:
    """Pad by mirroring without the edge (torch's 'reflect' mode: d c b | a b c d | c b a)."""
    n = x.shape[dim]
    head = x.narrow(dim, 1, r).flip(dim)
    tail = x.narrow(dim, n - 1 - r, r).flip(dim)
    return torch.cat([head, x, tail], dim=dim)


def upsample(maps: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """(B, h, w) -> (B, H, W) bilinear (align_corners=False)."""
    size = (size, size) if isinstance(size, int) else size
    return F.interpolate(maps[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]


def min_cosine_distance(feats: torch.Tensor, memory: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """(B, N, D) vs (M, D), both L2-normalised -> (B, N) ``min over memory of (1 - cos)``."""
    flat = feats.reshape(-1, feats.shape[-1])
    chunks = (flat,) if torch.compiler.is_exporting() else flat.split(chunk)  # exporting: a symbolic batch
    best = torch.cat([(chunk_f @ memory.T).amax(dim=-1) for chunk_f in chunks])
    return (1.0 - best).reshape(feats.shape[:-1])


def grid_side(n: int) -> int:
    side = int(round(math.sqrt(n)))
    if side * side != n:
        raise ValueError(f"{n} tokens do not form a square grid")
    return side
