"""One contract over open_clip ViT models: text embeddings, the global image embedding, projected patch tokens.

Patch tokens at any tapped layer are passed through ``ln_post`` and ``proj`` into the joint image-text space and are
*copied* per layer (several research repos store views of a tensor that is later updated in place, so their
"multi-layer" features are all the last layer's). The positional embedding is re-gridded when the input size differs
from the size the model was trained at, e.g. ViT-L/14@336 run at 518: bicubic by default, or as a reference
implementation does it (:data:`POS_INTERPOLATIONS`; Crane and AnomalyCLIP use bilinear).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vlad.backbones.spec import BackboneSpec, ensure_weights_available, register_tiny_config
from vlad.errors import BackboneError, WeightsNotFoundError

logger = logging.getLogger(__name__)

RANDOM_SEED = 0
_PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
POS_INTERPOLATIONS = ("bicubic", "bilinear", "bicubic-antialias")
"""How the patch positional embedding is re-gridded: ``bicubic`` (vlad), ``bilinear`` (Crane, AnomalyCLIP; both
``F.interpolate(..., align_corners=False)``), ``bicubic-antialias`` (open_clip's ``resize_pos_embed``)."""


@dataclass
class VisualOutput:
    """What one forward pass of the image tower gives.

    Attributes:
        global_embedding: (B, D) projected image embedding (unnormalised), equal to open_clip's ``encode_image``.
        patch_tokens: layer number (1-based) -> (B, N, D) projected patch tokens (unnormalised), N = gh * gw.
        grid: (gh, gw) patch grid.
        embeddings: (B, 1 + N, width) token embeddings after ``ln_pre`` (input of block 1), when requested.
    """

    global_embedding: torch.Tensor
    patch_tokens: dict[int, torch.Tensor]
    grid: tuple[int, int]
    embeddings: torch.Tensor | None = None


@dataclass
class ClipBackbone:
    """An open_clip CLIP model behind vlad's backbone contract.

    Build with :func:`vlad.backbones.load_backbone`, or wrap a model directly (tests do).
    """

    model: torch.nn.Module
    tokenizer: object
    spec: str
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    is_random: bool = False
    _text_cache: dict[tuple[str, ...], torch.Tensor] = field(default_factory=dict, repr=False)
    _pos_cache: dict[tuple[tuple[int, int], str], torch.Tensor] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        visual = self.model.visual
        if not hasattr(visual, "conv1") or not hasattr(visual, "transformer"):
            raise BackboneError(f"{self.spec}: only open_clip ViT image towers are supported (no conv1/transformer)")
        if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok":
            raise BackboneError(f"{self.spec}: only ViTs pooled by the class token are supported")
        self.model.eval().requires_grad_(False)
        mean = getattr(visual, "image_mean", None) or (0.48145466, 0.4578275, 0.40821073)
        std = getattr(visual, "image_std", None) or (0.26862954, 0.26130258, 0.27577711)
        self._mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_spec(cls, spec: BackboneSpec, *, device: str, precision: str = "auto") -> ClipBackbone:
        import open_clip

        register_tiny_config()
        if spec.random:
            if spec.model not in open_clip.list_models():
                raise BackboneError(
                    f"unknown open_clip model {spec.model!r} in {spec.spec!r}; try random:tiny or one of "
                    f"open_clip.list_models() such as ViT-B-16-plus-240, ViT-L-14-336-quickgelu"
                )
        elif not spec.model.startswith(("local-dir:", "hf-hub:")):
            if spec.model not in open_clip.list_models():
                raise BackboneError(f"unknown open_clip model {spec.model!r} in {spec.spec!r}")
            tag = spec.pretrained
            if tag is None:
                tags = open_clip.list_pretrained_tags_by_model(spec.model)
                raise BackboneError(f"{spec.spec!r} names no weights; add @TAG (available: {tags}) or @/path/file")
            if not open_clip.pretrained.is_pretrained_cfg(spec.model, tag) and not _is_file(tag):
                tags = open_clip.list_pretrained_tags_by_model(spec.model)
                raise BackboneError(f"{tag!r} is neither a pretrained tag of {spec.model} ({tags}) nor a file")
            ensure_weights_available(spec.model, tag)
        try:
            # random weights are seeded, so a random backbone is the same network in every process and test order
            with _quiet_root_logger(spec.random), torch.random.fork_rng(devices=[], enabled=spec.random):
                if spec.random:
                    torch.manual_seed(RANDOM_SEED)
                model = open_clip.create_model(spec.model, pretrained=spec.pretrained, device="cpu")
        except (RuntimeError, FileNotFoundError, OSError) as exc:
            raise WeightsNotFoundError(f"could not load backbone {spec.spec!r}: {exc}") from exc
        tokenizer = open_clip.get_tokenizer(spec.model)
        dtype = _resolve_precision(precision, device)
        model = model.to(device=device, dtype=dtype)
        if spec.random:
            logger.warning("backbone %s has random weights: scores are meaningless", spec.spec)
        return cls(model=model, tokenizer=tokenizer, spec=spec.spec, device=device, dtype=dtype, is_random=spec.random)

    # ------------------------------------------------------------------ geometry
    @property
    def patch_size(self) -> int:
        ps = self.model.visual.conv1.kernel_size
        return int(ps[0])

    @property
    def native_size(self) -> int:
        size = self.model.visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    @property
    def embed_dim(self) -> int:
        return int(self.model.visual.proj.shape[1])

    @property
    def num_layers(self) -> int:
        return len(self.model.visual.transformer.resblocks)

    def grid_for(self, image_size: int) -> tuple[int, int]:
        if image_size % self.patch_size:
            raise BackboneError(f"image size {image_size} is not a multiple of the patch size {self.patch_size}")
        g = image_size // self.patch_size
        return g, g

    # ------------------------------------------------------------------ text
    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """(n, D) L2-normalised text embeddings, cached per prompt list (fp32, on the backbone's device)."""
        key = tuple(prompts)
        if not key:
            raise ValueError("encode_text needs at least one prompt")
        if key not in self._text_cache:
            chunks = []
            for start in range(0, len(key), 256):
                tokens = self.tokenizer(list(key[start : start + 256])).to(self.device)
                chunks.append(self.model.encode_text(tokens).float())
            self._text_cache[key] = F.normalize(torch.cat(chunks), dim=-1)
        return self._text_cache[key]

    def text_prototype(self, prompts: Sequence[str]) -> torch.Tensor:
        """(D,) mean of the normalised prompt embeddings, renormalised (WinCLIP's ensemble)."""
        return F.normalize(self.encode_text(prompts).mean(dim=0), dim=-1)

    # ------------------------------------------------------------------ images
    def preprocess(self, images: Sequence[Image.Image], image_size: int | None = None) -> torch.Tensor:
        """(B, 3, S, S) normalised tensor: bicubic resize to S x S (aspect not kept), CLIP mean/std."""
        size = image_size or self.native_size
        arrays = [np.asarray(im.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)) for im in images]
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(255.0)
        x = (x - self._mean) / self._std
        return x.to(device=self.device, dtype=self.dtype)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) preprocessed images back to [0, 1] RGB (the inverse of :meth:`preprocess`'s normalisation)."""
        return (x.float() * self._std.to(x.device) + self._mean.to(x.device)).clamp(0, 1)

    def _positional_embedding(self, grid: tuple[int, int], interpolation: str = "bicubic") -> torch.Tensor:
        if interpolation not in POS_INTERPOLATIONS:
            raise BackboneError(f"unknown positional interpolation {interpolation!r}; allowed: {POS_INTERPOLATIONS}")
        pos = self.model.visual.positional_embedding
        n_old = pos.shape[0] - 1
        g_old = int(round(n_old**0.5))
        if grid == (g_old, g_old):
            return pos
        key = (grid, interpolation)
        if key not in self._pos_cache:
            cls_pos, patch_pos = pos[:1], pos[1:]
            patch_pos = patch_pos.reshape(1, g_old, g_old, -1).permute(0, 3, 1, 2).float()
            mode, _, antialias = interpolation.partition("-")
            patch_pos = F.interpolate(patch_pos, size=grid, mode=mode, align_corners=False, antialias=bool(antialias))
            patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1).to(pos.dtype)
            self._pos_cache[key] = torch.cat([cls_pos, patch_pos])
        return self._pos_cache[key]

    def embed(self, x: torch.Tensor, *, pos_interpolation: str = "bicubic") -> torch.Tensor:
        """(B, 1 + N, width) tokens entering block 1 (patch embed, class token, positions, ln_pre)."""
        visual = self.model.visual
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        tokens = visual.conv1(x).flatten(2).transpose(1, 2)
        cls = visual.class_embedding.to(tokens.dtype).expand(tokens.shape[0], 1, -1)
        tokens = torch.cat([cls, tokens], dim=1) + self._positional_embedding(grid, pos_interpolation).to(tokens.dtype)
        return visual.ln_pre(visual.patch_dropout(tokens))

    def run_blocks(self, x: torch.Tensor, taps: Sequence[int] = ()) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Run all blocks on (B, L, width) tokens; return the output and copies of the tokens after each tapped
        block (1-based layer numbers)."""
        transformer = self.model.visual.transformer
        batch_first = getattr(transformer, "batch_first", True)
        h = x if batch_first else x.transpose(0, 1)
        tapped: dict[int, torch.Tensor] = {}
        for i, block in enumerate(transformer.resblocks, start=1):
            h = block(h, attn_mask=None)
            if i in taps:
                tapped[i] = (h if batch_first else h.transpose(0, 1)).clone()
        return (h if batch_first else h.transpose(0, 1)), tapped

    def project_global(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D) from the final (B, L, width) tokens, exactly as open_clip pools and projects."""
        pooled, _ = self.model.visual._pool(x)
        return pooled @ self.model.visual.proj

    def project_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, D): ``ln_post`` then ``proj`` on (B, N, width) tokens."""
        return self.model.visual.ln_post(tokens) @ self.model.visual.proj

    @torch.no_grad()
    def forward_visual(
        self,
        x: torch.Tensor,
        layers: Sequence[int] = (),
        *,
        keep_embeddings: bool = False,
        project: bool = True,
        pos_interpolation: str = "bicubic",
    ) -> VisualOutput:
        """Global embedding plus patch tokens at ``layers`` (1-based; -1 means the last layer): projected through
        ``ln_post`` and ``proj`` into the joint space, or (``project=False``) the raw residual-stream tokens
        (B, N, width), as MuSc's reference reads them."""
        n = self.num_layers
        taps = sorted({n + 1 + layer if layer < 0 else layer for layer in layers})
        bad = [layer for layer in taps if not 1 <= layer <= n]
        if bad:
            raise BackboneError(f"layers {bad} out of range: {self.spec} has layers 1..{n}")
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        embeddings = self.embed(x, pos_interpolation=pos_interpolation)
        out, tapped = self.run_blocks(embeddings, taps)
        patch_tokens = {
            layer: self.project_tokens(tok[:, 1:]) if project else tok[:, 1:] for layer, tok in tapped.items()
        }
        return VisualOutput(
            global_embedding=self.project_global(out),
            patch_tokens=patch_tokens,
            grid=grid,
            embeddings=embeddings if keep_embeddings else None,
        )

    @torch.no_grad()
    def encode_windows(self, embeddings: torch.Tensor, windows: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        """Global embeddings of token subsets: the class token plus the patches of each window, run through the
        whole transformer again (WinCLIP).

        Args:
            embeddings: (B, 1 + N, width) from :meth:`embed`.
            windows: (W, k) long tensor of patch indices (0-based, excluding the class token).
            chunk: how many (image, window) sequences run per batch.

        Returns:
            (B, W, D) projected window embeddings (unnormalised).
        """
        b = embeddings.shape[0]
        index = torch.cat([torch.zeros_like(windows[:, :1]), windows + 1], dim=1).to(embeddings.device)
        seqs = embeddings[:, index]  # (B, W, 1 + k, width)
        seqs = seqs.reshape(-1, *seqs.shape[2:])
        if torch.compiler.is_exporting():  # a symbolic batch (vlad.export): one pass, no loop over its size
            return self.project_global(self.run_blocks(seqs)[0]).reshape(b, windows.shape[0], -1)
        outs = []
        for start in range(0, seqs.shape[0], chunk):
            out, _ = self.run_blocks(seqs[start : start + chunk])
            outs.append(self.project_global(out))
        return torch.cat(outs).reshape(b, windows.shape[0], -1)


def _resolve_precision(precision: str, device: str) -> torch.dtype:
    if precision == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    if precision not in _PRECISIONS:
        raise BackboneError(f"unknown precision {precision!r}; allowed: auto, {', '.join(_PRECISIONS)}")
    if device == "cpu" and precision != "fp32":
        logger.warning("precision %s on CPU is slow and loses accuracy; fp32 is recommended", precision)
    return _PRECISIONS[precision]


@contextlib.contextmanager
def _quiet_root_logger(active: bool) -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    if active:
        root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _is_file(path: str) -> bool:
    from pathlib import Path

    return Path(path).expanduser().is_file()
