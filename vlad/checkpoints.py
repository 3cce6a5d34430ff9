"""Import officially released Crane and AnomalyCLIP checkpoints as vlad adapters (``vlad import-checkpoint``).

Both releases are plain ``torch.save`` files holding ``{"prompt_learner": state_dict}`` (Crane
``test.py: process_dataset``, AnomalyCLIP ``test.py``) with the object-agnostic prompt learner of
``models/prompt_ensemble.py`` / ``prompt_ensemble.py``:

- ``ctx_pos``, ``ctx_neg``: (1, 1, n_ctx, width) learned context of ``"X ... X object."`` and
  ``"X ... X damaged object."``;
- ``compound_prompts_text.{0..depth-2}``: (t_n_ctx, width) deep text prompts for text blocks 1..depth-1 (0-based);
- ``token_prefix_*`` / ``token_suffix_*``: the frozen token embeddings of the two prompts around the context, and
  ``tokenized_prompts_*``: their token ids (1, 1, 77);
- AnomalyCLIP only: ``compound_prompt_projections.{i}.weight/bias``, trained but unused at inference (not imported).

The file is read with ``torch.load(weights_only=True)``: tensors only, nothing of the file is executed. The stored token
embeddings must equal the backbone's own embedding of the same tokens; when they do not, the checkpoint was trained on
another CLIP and the import is refused unless ``force``.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from vlad.errors import ConfigError
from vlad.resources import file_sha256

FORMATS: dict[str, dict[str, Any]] = {
    "crane": {"scorer": "crane", "attention": "qq+kk+vv", "ignored": ()},
    "anomalyclip": {"scorer": "anomalyclip", "attention": "vv", "ignored": ("compound_prompt_projections.",)},
}
REQUIRED_KEYS = (
    "ctx_pos",
    "ctx_neg",
    "token_prefix_pos",
    "token_suffix_pos",
    "token_prefix_neg",
    "token_suffix_neg",
    "tokenized_prompts_pos",
    "tokenized_prompts_neg",
)
DEEP_KEY = re.compile(r"compound_prompts_text\.(\d+)$")
EMBEDDING_TOLERANCE = 1e-4
"""Max |difference| between stored and recomputed token embeddings (the same weights give 0; another CLIP ~1e-2)."""
REFINED_BLOCKS = 19  # both references: the last 19 vision blocks (layers 6..24 of ViT-L/14)


def check_format(fmt: str) -> dict[str, Any]:
    if fmt not in FORMATS:
        raise ConfigError(f"unknown checkpoint format {fmt!r}; allowed: {', '.join(FORMATS)}")
    return FORMATS[fmt]


def import_checkpoint(
    path: str | Path,
    format: str,  # noqa: A002 - the CLI's word
    backbone: Any,
    out: str | Path,
    *,
    force: bool = False,
    overwrite: bool = False,
) -> Path:
    """Convert an official Crane / AnomalyCLIP checkpoint into a vlad adapter folder; returns the folder.

    Args:
        path: the ``epoch_N.pth`` file.
        format: ``crane`` or ``anomalyclip``.
        backbone: a backbone spec (or a loaded :class:`~vlad.backbones.clip.ClipBackbone`) the prompts belong to.
        out: the adapter folder to write.
        force: import even when the stored token embeddings disagree with the backbone's.
        overwrite: replace an adapter already in ``out``.

    Raises:
        ConfigError: unknown format, unreadable or wrong kind of file, missing or unexpected keys, shapes that do not
            fit the backbone, token embeddings of another CLIP (without ``force``), an existing adapter in ``out``.
    """
    spec = check_format(format)
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} not found (or not a file)")
    if (Path(out) / "adapter.json").exists() and not overwrite:
        raise ConfigError(f"{out} already holds an adapter; choose another --out or pass --overwrite")
    state = _read_state(path)
    ctx, deep, ignored = _split_state(state, path, format, spec)
    from vlad.backbones import load_backbone
    from vlad.backbones.clip import ClipBackbone

    clip = backbone if isinstance(backbone, ClipBackbone) else load_backbone(backbone, device="cpu", precision="fp32")
    _check_fit(clip, ctx, deep, state, path, force)
    return _write_adapter(clip, ctx, deep, path, format, spec, ignored, out, overwrite)


def _read_state(path: Path) -> dict[str, Any]:
    import pickle
    import zipfile

    import torch

    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{path} is not a PyTorch tensor checkpoint (torch.load, weights_only): {first}") from exc
    if isinstance(obj, dict) and isinstance(obj.get("prompt_learner"), dict):
        obj = obj["prompt_learner"]
    if not isinstance(obj, dict) or "ctx_pos" not in obj:
        keys = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
        raise ConfigError(
            f"{path} holds no prompt-learner state dict ('prompt_learner' with ctx_pos, ctx_neg, ...); found {keys}"
        )
    bad = sorted(k for k, v in obj.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise ConfigError(f"{path}: entries {bad} are not tensors")
    return obj


def _split_state(state: dict[str, Any], path: Path, fmt: str, spec: dict[str, Any]) -> tuple[Any, list[Any], list[str]]:
    """(ctx (2, n_ctx, width), deep prompts in order, ignored keys)."""
    missing = [k for k in REQUIRED_KEYS if k not in state]
    deep_idx = sorted(int(m.group(1)) for k in state if (m := DEEP_KEY.match(k)))
    ignored = sorted(k for k in state if any(k.startswith(p) for p in spec["ignored"]))
    unexpected = sorted(
        set(state) - set(REQUIRED_KEYS) - set(ignored) - {f"compound_prompts_text.{i}" for i in deep_idx}
    )
    if missing:
        raise ConfigError(f"{path}: missing key(s) {missing} for a {fmt} checkpoint")
    if unexpected:
        hint = (
            "; is it an AnomalyCLIP checkpoint? use --format anomalyclip"
            if any(k.startswith("compound_prompt_projections.") for k in unexpected)
            else ""
        )
        raise ConfigError(f"{path}: unexpected key(s) {unexpected[:6]} for a {fmt} checkpoint{hint}")
    if deep_idx != list(range(len(deep_idx))):
        raise ConfigError(
            f"{path}: deep prompts compound_prompts_text.N must be numbered 0..{len(deep_idx) - 1}, got {deep_idx}"
        )
    ctx = []
    for key in ("ctx_pos", "ctx_neg"):
        t = state[key]
        while t.ndim > 2 and t.shape[0] == 1:
            t = t[0]
        if t.ndim != 2:
            raise ConfigError(f"{path}: {key} must be (1, 1, n_ctx, width), got {tuple(state[key].shape)}")
        ctx.append(t.float())
    if ctx[0].shape != ctx[1].shape:
        raise ConfigError(f"{path}: ctx_pos {tuple(ctx[0].shape)} and ctx_neg {tuple(ctx[1].shape)} differ in shape")
    deep = [state[f"compound_prompts_text.{i}"].float() for i in deep_idx]
    width = ctx[0].shape[1]
    bad = [f"compound_prompts_text.{i}" for i, d in enumerate(deep) if d.ndim != 2 or d.shape[1] != width]
    if bad or len({tuple(d.shape) for d in deep}) > 1:
        raise ConfigError(f"{path}: deep prompts {bad or 'compound_prompts_text.*'} must all be (t_n_ctx, {width})")
    import torch

    return torch.stack(ctx), deep, ignored


def _check_fit(clip: Any, ctx: Any, deep: list[Any], state: dict[str, Any], path: Path, force: bool) -> None:
    """Widths, depth, token ids and token embeddings against the backbone."""
    import torch

    from vlad.prompt_learner import check_text_tower, prompt_template

    width = check_text_tower(clip.model, clip.spec)
    if ctx.shape[-1] != width:
        raise ConfigError(
            f"{path}: context width {ctx.shape[-1]} does not fit the text width {width} of "
            f"{clip.spec}; import it with the backbone it was trained on"
        )
    blocks = len(clip.model.transformer.resblocks)
    if len(deep) > blocks - 1:
        raise ConfigError(
            f"{path}: {len(deep)} deep prompts need {len(deep) + 1} text blocks; {clip.spec} has {blocks}"
        )
    n_ctx = ctx.shape[1]
    for kind, suffix in (("pos", "object."), ("neg", "damaged object.")):
        tokens = clip.tokenizer([prompt_template(n_ctx, suffix)]).to("cpu")
        stored = state[f"tokenized_prompts_{kind}"]
        if stored.numel() != tokens.numel() or not torch.equal(stored.reshape(tokens.shape).long(), tokens.long()):
            raise ConfigError(
                f"{path}: tokenized_prompts_{kind} are not {clip.spec}'s tokens of "
                f"{prompt_template(n_ctx, suffix)!r} (another tokenizer or template)"
            )
        with torch.no_grad():
            emb = clip.model.token_embedding(tokens.to(clip.device)).float().cpu()[0]
        prefix = state[f"token_prefix_{kind}"].float().reshape(-1, width)
        suffix_t = state[f"token_suffix_{kind}"].float().reshape(-1, width)
        if prefix.shape[0] != 1 or suffix_t.shape[0] != emb.shape[0] - 1 - n_ctx:
            shapes = f"{tuple(prefix.shape)} / {tuple(suffix_t.shape)}"
            raise ConfigError(
                f"{path}: token_prefix_{kind} / token_suffix_{kind} shapes {shapes} do not fit n_ctx "
                f"{n_ctx} and context length {emb.shape[0]}"
            )
        diff = max(float((prefix - emb[:1]).abs().max()), float((suffix_t - emb[1 + n_ctx :]).abs().max()))
        if diff > EMBEDDING_TOLERANCE and not force:
            raise ConfigError(
                f"{path}: its stored token embeddings differ from {clip.spec}'s own (max |diff| "
                f"{diff:.3g}): it was trained on another CLIP; use that backbone, or pass --force"
            )


def _write_adapter(
    clip: Any,
    ctx: Any,
    deep: list[Any],
    path: Path,
    fmt: str,
    spec: dict[str, Any],
    ignored: list[str],
    out: str | Path,
    overwrite: bool,
) -> Path:
    from vlad._version import __version__
    from vlad.adapters import DEEP_PREFIX, Adapter, AdapterMetadata, save_adapter
    from vlad.prompt_learner import prompt_template
    from vlad.scorers.crane import dense_image_size

    n_layers, n_ctx = clip.num_layers, ctx.shape[1]
    epoch = re.search(r"epoch_(\d+)", path.name)
    meta = AdapterMetadata(
        method="crane-prompts",
        backbone=clip.spec,
        layers=(n_layers,),
        attention=spec["attention"],
        first_refined=max(1, n_layers - REFINED_BLOCKS + 1),
        image_size=dense_image_size(clip),
        prompts={"normal": prompt_template(n_ctx, "object."), "anomalous": prompt_template(n_ctx, "damaged object.")},
        training_data={
            "source": f"official {fmt} release",
            "note": "trained by the method's authors (on another "
            "dataset's test split, see METHODS); vlad did not train it",
        },
        epochs=int(epoch.group(1)) if epoch else 0,
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        n_ctx=n_ctx,
        vlad_version=__version__,
        deep_prompts={"depth": len(deep) + 1, "n_ctx": int(deep[0].shape[0]) if deep else 0, "round_fp16": True}
        if deep
        else None,
        provenance={
            "format": fmt,
            "scorer": spec["scorer"],
            "source_file": path.name,
            "sha256": file_sha256(path),
            "ignored_keys": ignored,
        },
        profile="paper",
    )
    tensors = {"ctx_pos": ctx[0].contiguous(), "ctx_neg": ctx[1].contiguous()}
    tensors.update({f"{DEEP_PREFIX}{i}": d.contiguous() for i, d in enumerate(deep)})
    return save_adapter(Adapter(meta, tensors), out, overwrite=overwrite)
