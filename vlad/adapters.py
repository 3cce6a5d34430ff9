"""Learned adapters: Crane-style prompt context vectors and LoRA on the vision tower (save, load, apply).

An adapter is a folder with ``adapter.json`` (the metadata below, strict: unknown or missing keys are errors) and one
weights file:

- ``crane-prompts``: ``prompts.safetensors`` with ``ctx_pos`` and ``ctx_neg``, each (n_ctx, text width), the learned
  context of ``"X ... X object."`` (normal) and ``"X ... X damaged object."`` (anomalous), and (format 2, optional)
  deep text prompts ``deep.0`` .. ``deep.{depth-2}``, each (t_n_ctx, text width), spliced into text blocks 2..depth
  (see :mod:`vlad.backbones.prompts`; ``deep_prompts`` in the metadata records depth, t_n_ctx and the fp16 rounding).
  Applying one encodes the two prompts once and hands the (2, D) features to :meth:`CraneScorer.set_text_features`;
  Crane and its subclasses (FiLo, AnomalyCLIP) accept it. Officially released Crane and AnomalyCLIP checkpoints become
  such adapters through :func:`import_checkpoint` (``vlad import-checkpoint``), which records their provenance.
- ``lora``: ``lora.safetensors``, the peft LoRA state dict of the vision tower's ``mlp.c_fc`` / ``mlp.c_proj`` layers.
  Applying one deep-copies the CLIP model's vision tower (the text tower is shared, it is unchanged), injects LoRA
  into the copy and gives the scorer a new :class:`ClipBackbone` around it. The cached backbone that
  :func:`vlad.backbones.load_backbone` shares between scorers is never modified. Any scorer accepts it.

  LoRA targets the MLPs on purpose, not ``attn``: the dense engine (:mod:`vlad.backbones.dense`) re-implements each
  block around ``attn.in_proj_weight`` and ``attn.out_proj.weight``, so peft's ``MultiheadAttention`` LoRA (which
  merges its delta only inside ``nn.MultiheadAttention.forward``) would be silently bypassed there; the MLPs are
  called as modules everywhere.

An adapter names the backbone it was trained on; applying it to a scorer on another backbone raises
:class:`~vlad.errors.ConfigError` naming both. This module imports torch only inside functions; reading metadata is
torch-free.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    FiniteFloat,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from vlad._optional import require
from vlad.errors import BackboneError, ConfigError

if TYPE_CHECKING:
    import torch

    from vlad.backbones.clip import ClipBackbone
    from vlad.scorers.base import Scorer

logger = logging.getLogger(__name__)

METHODS: tuple[str, ...] = ("crane-prompts", "lora")
METADATA_FILE = "adapter.json"
WEIGHTS_FILES: dict[str, str] = {"crane-prompts": "prompts.safetensors", "lora": "lora.safetensors"}
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
PROMPT_KEYS = ("ctx_pos", "ctx_neg")
DEEP_PREFIX = "deep."
LORA_TARGETS = r"visual\.transformer\.resblocks\.\d+\.mlp\.(c_fc|c_proj)"
"""peft ``target_modules`` regex: the vision MLPs only (see the module docstring for why not ``attn``)."""


class AdapterMetadata(BaseModel):
    """What ``adapter.json`` holds.

    Attributes:
        method: one of :data:`METHODS`.
        backbone: the backbone spec it was trained on (applying checks it).
        layers: refined layers (1-based) whose tokens the training loss read.
        attention: the dense engine's refined attention during training (e.g. ``qq+kk+vv``).
        first_refined: first refined block during training.
        image_size: training input side in pixels.
        prompts: ``normal`` / ``anomalous`` templates (``X`` marks a learned context token), or for LoRA the prompt
            bank that gave the fixed text prototypes (``{"ensemble": "winclip"}``).
        training_data: root, layout, categories, split, synthetic, counts.
        epochs: epochs trained (fixed a priori, no early stopping).
        date: UTC ISO-8601 time the training finished.
        n_ctx: learned context tokens per prompt (crane-prompts), else None.
        lora: ``{"r", "alpha", "dropout", "target_modules"}`` (lora), else None.
        seed: training seed.
        lr: Adam learning rate.
        batch_size: images per step.
        loss_history: mean training loss per epoch.
        vlad_version: the vlad version that trained it.
        format_version: :data:`FORMAT_VERSION` (1 is read too).
        deep_prompts: ``{"depth", "n_ctx", "round_fp16"}`` when the weights hold deep text prompts, else None.
        provenance: ``{"format", "source_file", "sha256"}`` for an imported official checkpoint, else None.
        profile: the scorer profile the weights were made for (``paper`` for official checkpoints), or None.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: StrictStr
    backbone: StrictStr
    layers: tuple[StrictInt, ...]
    attention: StrictStr
    first_refined: StrictInt
    image_size: StrictInt
    prompts: dict[str, Any]
    training_data: dict[str, Any]
    epochs: StrictInt
    date: StrictStr
    n_ctx: StrictInt | None = None
    lora: dict[str, Any] | None = None
    seed: StrictInt = 0
    lr: StrictFloat | StrictInt = 1e-3
    batch_size: StrictInt = 8
    loss_history: tuple[FiniteFloat, ...] = ()
    vlad_version: StrictStr = ""
    format_version: StrictInt = FORMAT_VERSION
    deep_prompts: dict[str, Any] | None = None
    provenance: dict[str, Any] | None = None
    profile: Literal["paper", "vlad"] | None = None

    @field_validator("loss_history", mode="before")
    @classmethod
    def _numbers_only(cls, value: Any) -> Any:
        if isinstance(value, (list, tuple)) and any(isinstance(v, bool) for v in value):
            raise ValueError("loss_history must hold numbers")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> AdapterMetadata:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; allowed: {', '.join(METHODS)}")
        if self.format_version not in READABLE_VERSIONS:
            readable = ", ".join(map(str, READABLE_VERSIONS))
            raise ValueError(f"format_version {self.format_version} unsupported; this vlad reads {readable}")
        if self.deep_prompts is not None and (
            self.method != "crane-prompts" or not {"depth", "n_ctx"} <= set(self.deep_prompts)
        ):
            raise ValueError(
                f"deep_prompts needs method crane-prompts and keys depth, n_ctx; got {self.deep_prompts!r}"
            )
        if self.method == "crane-prompts" and (self.n_ctx is None or self.n_ctx < 1):
            raise ValueError(f"crane-prompts adapters need n_ctx >= 1, got {self.n_ctx!r}")
        if self.method == "lora" and (self.lora is None or not {"r", "alpha", "target_modules"} <= set(self.lora)):
            raise ValueError(f"lora adapters need lora = {{r, alpha, target_modules}}, got {self.lora!r}")
        if not self.layers or any(layer < 1 for layer in self.layers):
            raise ValueError(f"layers must be positive layer numbers, got {list(self.layers)}")
        return self

    def to_dict(self) -> dict[str, Any]:
        out = self.model_dump()
        out["layers"], out["loss_history"] = list(self.layers), list(self.loss_history)
        return out

    @classmethod
    def from_dict(cls, data: Any, source: str = "adapter metadata") -> AdapterMetadata:
        """Validate a parsed ``adapter.json``: unknown, missing or mistyped keys raise ConfigError naming ``source``."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(f"{source}: {_one_problem(exc, data)}") from None


_TYPE_WORDS = {"int": "int", "string": "str", "dict": "dict", "tuple": "list", "list": "list", "float": "number"}


def _one_problem(exc: ValidationError, data: dict[str, Any]) -> str:
    """The first problem of a validation error in one line, in the words of ``adapter.json``'s keys."""
    errors = exc.errors()
    unknown = sorted(str(e["loc"][0]) for e in errors if e["type"] == "extra_forbidden")
    if unknown:
        return f"unknown key(s) {unknown}; allowed: {sorted(AdapterMetadata.model_fields)}"
    missing = [str(e["loc"][0]) for e in errors if e["type"] == "missing"]
    if missing:
        return f"missing key(s) {missing}"
    first = errors[0]
    if not first["loc"]:
        return str(first["msg"]).removeprefix("Value error, ")
    key = str(first["loc"][0])
    kind = _TYPE_WORDS.get(str(first["type"]).split("_")[0], "valid")
    inner = " of numbers" if len(first["loc"]) > 1 else ""
    expected = f"list{inner}" if key in ("layers", "loss_history") else kind
    return f"key {key!r} must be {expected}, got {data.get(key)!r}"


@dataclass
class Adapter:
    """Metadata plus weights.

    Attributes:
        metadata: see :class:`AdapterMetadata`.
        tensors: name -> CPU tensor; ``ctx_pos`` / ``ctx_neg`` (n_ctx, width) or peft LoRA keys.
        source: where it was loaded from (a folder), or ``"<memory>"``.
    """

    metadata: AdapterMetadata
    tensors: dict[str, torch.Tensor]
    source: str = "<memory>"

    @property
    def name(self) -> str:
        return Path(self.source).name if self.source != "<memory>" else f"<{self.metadata.method} adapter>"

    def deep_prompts(self) -> list[torch.Tensor]:
        """The deep text prompts in block order (empty for adapters without them)."""
        depth = int(self.metadata.deep_prompts["depth"]) if self.metadata.deep_prompts else 1
        return [self.tensors[f"{DEEP_PREFIX}{i}"] for i in range(depth - 1)]


# ---------------------------------------------------------------------- files
def available_adapters() -> list[str]:
    """Names of the adapters bundled with vlad (folders in ``adapters/`` holding ``adapter.json``)."""
    from vlad.resources import adapters_dir

    try:
        root = adapters_dir()
    except FileNotFoundError:
        return []
    return sorted(p.name for p in root.iterdir() if (p / METADATA_FILE).is_file())


def resolve_adapter(name_or_path: str | Path) -> Path:
    """The adapter folder for a bundled adapter NAME or a path (the folder or its ``adapter.json``).

    Raises:
        ConfigError: neither a bundled name nor a folder with ``adapter.json``.
    """
    text = str(name_or_path).strip()
    if not text:
        raise ConfigError("empty adapter name; give a bundled adapter name or a folder with adapter.json")
    if "/" not in text and "\\" not in text and text in available_adapters():
        from vlad.resources import adapters_dir

        return adapters_dir() / text
    path = Path(text).expanduser()
    if path.is_file() and path.name == METADATA_FILE:
        path = path.parent
    if (path / METADATA_FILE).is_file():
        return path
    raise ConfigError(
        f"adapter {text!r} not found: not a bundled adapter (available: {available_adapters()}) and "
        f"not a folder with {METADATA_FILE}"
    )


def read_metadata(folder: str | Path) -> AdapterMetadata:
    """Parse and validate ``folder/adapter.json`` (torch-free)."""
    path = Path(folder) / METADATA_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read adapter metadata {path}: {exc}") from exc
    return AdapterMetadata.from_dict(data, str(path))


def load_adapter(name_or_path: str | Path) -> Adapter:
    """Load a bundled adapter by name, or one from a folder; weights come back on the CPU.

    Raises:
        ConfigError: not found, bad metadata, missing or malformed weights.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = resolve_adapter(name_or_path)
    meta = read_metadata(folder)
    weights = folder / WEIGHTS_FILES[meta.method]
    if not weights.is_file():
        raise ConfigError(f"adapter {folder}: weights file {weights.name} is missing")
    try:
        tensors = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise ConfigError(f"adapter {folder}: cannot read {weights.name}: {exc}") from exc
    _check_tensors(meta, tensors, str(folder))
    return Adapter(meta, tensors, str(folder))


def save_adapter(adapter: Adapter, folder: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``folder/adapter.json`` and the weights file; returns the folder.

    Raises:
        ConfigError: the folder already holds an adapter and ``overwrite`` is False.
    """
    from safetensors.torch import save_file

    out = Path(folder)
    if (out / METADATA_FILE).exists() and not overwrite:
        raise ConfigError(f"{out} already holds an adapter; choose another --out or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    meta = adapter.metadata
    _check_tensors(meta, adapter.tensors, str(out))
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in adapter.tensors.items()}
    header = {"method": meta.method, "backbone": meta.backbone}
    save_file(tensors, str(out / WEIGHTS_FILES[meta.method]), metadata=header)
    text = json.dumps(meta.to_dict(), indent=2) + "\n"
    (out / METADATA_FILE).write_text(text, encoding="utf-8")  # last: a folder with adapter.json is complete
    adapter.source = str(out)
    return out


def _check_tensors(meta: AdapterMetadata, tensors: dict[str, Any], source: str) -> None:
    if meta.method == "crane-prompts":
        deep = sorted(k for k in tensors if k.startswith(DEEP_PREFIX))
        depth = int(meta.deep_prompts["depth"]) if meta.deep_prompts else 1
        expected_deep = [f"{DEEP_PREFIX}{i}" for i in range(depth - 1)]
        if set(tensors) - set(deep) != set(PROMPT_KEYS) or sorted(deep) != sorted(expected_deep):
            raise ConfigError(
                f"adapter {source}: prompt weights must be {list(PROMPT_KEYS) + expected_deep}, got {sorted(tensors)}"
            )
        shapes = {tuple(tensors[k].shape) for k in PROMPT_KEYS}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2 or next(iter(shapes))[0] != meta.n_ctx:
            raise ConfigError(
                f"adapter {source}: ctx_pos/ctx_neg must both be (n_ctx={meta.n_ctx}, width), got {sorted(shapes)}"
            )
        width = next(iter(shapes))[1]
        bad = [k for k in deep if tuple(tensors[k].shape) != (int(meta.deep_prompts["n_ctx"]), width)]  # type: ignore[index]
        if bad:
            raise ConfigError(
                f"adapter {source}: deep prompts {bad} must be (n_ctx={meta.deep_prompts['n_ctx']}, "  # type: ignore[index]
                f"{width})"
            )
    elif not tensors or any("lora_" not in k for k in tensors):
        raise ConfigError(f"adapter {source}: LoRA weights must be non-empty peft lora_A/lora_B tensors")


def deep_prompt_tensors(adapter: Adapter) -> list[torch.Tensor]:
    """The adapter's deep text prompts in block order (empty for adapters without them)."""
    return adapter.deep_prompts()


# ---------------------------------------------------------------------- applying
def _spec_key(spec: str) -> tuple[Any, ...]:
    """Normalise a backbone spec for comparison (the same model and weights in another spelling compare equal)."""
    from vlad.backbones import parse_spec

    try:
        parsed = parse_spec(spec)
    except BackboneError:
        return (spec.strip(),)
    return (parsed.model, parsed.pretrained, parsed.random)


def check_backbone(adapter: Adapter, backbone: ClipBackbone) -> None:
    """Raise ConfigError naming both specs when the adapter was trained on another backbone."""
    trained = adapter.metadata.backbone
    if _spec_key(trained) != _spec_key(backbone.spec):
        raise ConfigError(
            f"adapter {adapter.name} was trained for backbone {trained!r} but the scorer uses {backbone.spec!r}; "
            f"use --backbone {trained} or train an adapter for {backbone.spec}"
        )


def apply_adapter(scorer: Scorer, adapter: Adapter | str | Path) -> Scorer:
    """Apply an adapter (or a bundled name / a folder) to a scorer in place; returns the scorer.

    ``crane-prompts`` needs a :class:`~vlad.scorers.crane.CraneScorer` (or a subclass such as FiLo) and replaces its
    text prototypes; ``lora`` works with any scorer and replaces its backbone by a LoRA'd copy.

    Raises:
        ConfigError: wrong backbone, wrong scorer kind, LoRA on a scorer that already holds few-shot references, or
            weights that do not fit the model.
    """
    if getattr(scorer, "baked", None):  # an exported model (vlad.export)
        raise ConfigError(f"cannot apply adapter {adapter}: {scorer.baked}; export with --adapter instead")
    if not isinstance(adapter, Adapter):
        adapter = load_adapter(adapter)
    check_backbone(adapter, scorer.backbone)
    if adapter.metadata.method == "crane-prompts":
        _apply_prompts(scorer, adapter)
    else:
        _apply_lora(scorer, adapter)
    scorer.adapter = f"{adapter.metadata.method}:{adapter.name}"
    logger.info("applied %s adapter %s to scorer %s", adapter.metadata.method, adapter.name, scorer.name)
    return scorer


def maybe_apply_adapter(scorer: Scorer, name_or_path: str | Path | None) -> Scorer:
    """:func:`apply_adapter` when a name or path is given (the ``--adapter`` option), else the scorer unchanged."""
    return scorer if name_or_path is None else apply_adapter(scorer, name_or_path)


def _apply_prompts(scorer: Scorer, adapter: Adapter) -> None:
    import torch

    from vlad.prompt_learner import PromptLearner
    from vlad.scorers.crane import CraneScorer

    if not isinstance(scorer, CraneScorer):
        raise ConfigError(
            f"crane-prompts adapter {adapter.name} needs a Crane-family scorer (crane, filo, "
            f"anomalyclip), got {scorer.name!r}"
        )
    meta = adapter.metadata
    if meta.profile and meta.profile != scorer.profile:
        logger.warning(
            "adapter %s was made for the %s profile; scorer %s runs the %s profile (chosen explicitly)",
            adapter.name,
            meta.profile,
            scorer.name,
            scorer.profile,
        )
    if (tuple(scorer.layers), scorer.attention) != (meta.layers, meta.attention):
        logger.warning(
            "adapter %s was trained with layers %s and %s attention; scorer %s uses %s and %s",
            adapter.name,
            meta.layers,
            meta.attention,
            scorer.name,
            scorer.layers,
            scorer.attention,
        )
    learner = PromptLearner.from_adapter(scorer.backbone, adapter)
    with torch.no_grad():
        scorer.set_text_features(learner())


def _apply_lora(scorer: Scorer, adapter: Adapter) -> None:
    if scorer.few_shot:
        raise ConfigError(
            f"apply LoRA adapter {adapter.name} before fit(): the {scorer.n_references} reference "
            f"features were computed without it"
        )
    if any("lora_" in name for name, _ in scorer.backbone.model.named_parameters()):
        raise ConfigError(f"cannot apply LoRA adapter {adapter.name}: scorer {scorer.name!r} already has one")
    scorer.backbone = lora_backbone(scorer.backbone, adapter.metadata.lora or {}, adapter.tensors, adapter.name)
    scorer.grid = scorer.backbone.grid_for(scorer.image_size)


def lora_backbone(
    base: ClipBackbone, lora: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None, name: str = "adapter"
) -> ClipBackbone:
    """A new backbone whose vision tower is a LoRA'd copy of ``base``'s (``base`` is left untouched).

    Args:
        base: the backbone to copy (the text tower is shared, not copied).
        lora: ``{"r", "alpha", "dropout", "target_modules"}``.
        tensors: peft LoRA state dict to load; None keeps peft's initialisation (B = 0: the identity).
        name: for error messages.

    Raises:
        ConfigError: peft is missing, or the tensors do not fit the model.
    """
    from vlad.backbones.clip import ClipBackbone

    peft = require_peft()
    model = _copy_vision_tower(base.model)
    config = peft.LoraConfig(
        r=int(lora["r"]),
        lora_alpha=float(lora["alpha"]),
        lora_dropout=float(lora.get("dropout", 0.0)),
        target_modules=str(lora["target_modules"]),
    )
    try:
        model = peft.inject_adapter_in_model(config, model)
    except ValueError as exc:
        raise ConfigError(f"LoRA adapter {name}: cannot inject into {base.spec}: {exc}") from exc
    if tensors is not None:
        _load_lora_state(peft, model, tensors, name, base.spec)
    backbone = ClipBackbone(
        model=model,
        tokenizer=base.tokenizer,
        spec=base.spec,
        device=base.device,
        dtype=base.dtype,
        is_random=base.is_random,
        _text_cache=base._text_cache,
    )
    return backbone


def _load_lora_state(peft: Any, model: Any, tensors: dict[str, torch.Tensor], name: str, spec: str) -> None:
    expected = {k: v.shape for k, v in peft.get_peft_model_state_dict(model).items()}
    if set(expected) != set(tensors):
        extra, missing = sorted(set(tensors) - set(expected)), sorted(set(expected) - set(tensors))
        raise ConfigError(f"LoRA adapter {name} does not fit {spec}: unexpected {extra[:3]}, missing {missing[:3]}")
    bad = [k for k, shape in expected.items() if tuple(shape) != tuple(tensors[k].shape)]
    if bad:
        got, need = tuple(tensors[bad[0]].shape), tuple(expected[bad[0]])
        raise ConfigError(f"LoRA adapter {name} does not fit {spec}: {bad[0]} has shape {got}, the model needs {need}")
    peft.set_peft_model_state_dict(model, tensors)


def _copy_vision_tower(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of a CLIP model in which everything outside ``visual`` is shared with the original (frozen)."""
    shared: dict[int, Any] = {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if not name.startswith("visual."):
            shared[id(tensor)] = tensor
    for name, module in model.named_modules():
        if name and name != "visual" and not name.startswith("visual."):
            shared[id(module)] = module
    return copy.deepcopy(model, memo=shared)


def require_peft() -> Any:
    """The peft module, or a :class:`~vlad.errors.MissingDependencyError` with the install command."""
    return require("peft", "train", what="a LoRA adapter")
