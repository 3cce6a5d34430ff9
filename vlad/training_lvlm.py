"""LoRA fine-tuning of a Qwen2-VL-family explainer on chat-messages dialogues (``vlad train-lvlm``), and the check
that vLLM can serve the result.

Recipe: peft LoRA (no dropout, no bias) on the language model's linear layers only -- ``q_proj``, ``k_proj``,
``v_proj``, ``o_proj``, ``gate_proj``, ``up_proj``, ``down_proj`` outside the vision tower -- because vLLM applies
LoRA to the language model of a multimodal model; the vision tower, the merger, the embeddings and ``lm_head`` stay
frozen and are not saved. AdamW at a constant learning rate, gradient clipping at 1.0, one example per forward pass
with ``batch_size`` examples accumulated per optimiser step (no padding, so Qwen2-VL's 3-D rotary positions stay
exact). The loss is the mean next-token cross-entropy over the assistant turns' tokens only (each turn's text and its
end-of-turn token); the system and user turns, pictures included, are context. Examples are visited in a seeded
order, reshuffled every epoch, so a resumed run sees exactly the examples an uninterrupted run would.

Files in the output folder: ``adapter_config.json`` and ``adapter_model.safetensors`` (a standard peft adapter),
``training.json`` (settings and final loss), ``train_log.jsonl`` (one line per step: ``step, epoch, loss, lr,
seconds``) and ``checkpoint/`` (the latest checkpoint: adapter, ``optimizer.pt``, ``rng.pt``, ``trainer_state.json``).

torch, transformers and peft are imported only when training or loading runs; :func:`check_vllm_lora` needs none of
them (it reads the safetensors header itself).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vlad._optional import require
from vlad.errors import ConfigError

logger = logging.getLogger(__name__)

LM_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The language-model linear layers LoRA is put on (vLLM packs them into qkv_proj / gate_up_proj itself)."""
TOWER_WORDS = ("visual", "vision", "vision_tower", "vision_model", "merger", "multi_modal_projector", "mm_projector")
"""Module-path parts that mark the vision tower or its projector."""
EMBEDDING_NAMES = ("embed_tokens", "lm_head", "wte", "embed_out")
LORA_TARGET_REGEX = r"(?!.*(?:visual|vision|merger|projector)).*\.(?:" + "|".join(LM_LINEAR) + ")"
"""peft ``target_modules`` (full match): the LM linear layers, nothing whose path names the vision tower."""
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The values ``vllm serve --max-lora-rank`` accepts (default 16)."""
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
LOG_FILE = "train_log.jsonl"
CHECKPOINT_DIR = "checkpoint"
IGNORE_INDEX = -100


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest ``--max-lora-rank`` value vLLM accepts that holds ``rank``."""
    for value in VLLM_MAX_LORA_RANKS:
        if value >= rank:
            return value
    raise ConfigError(f"LoRA rank {rank} is above vLLM's largest --max-lora-rank {VLLM_MAX_LORA_RANKS[-1]}")


# ---------------------------------------------------------------------- the vLLM check
def read_safetensors_header(path: Path) -> dict[str, dict[str, Any]]:
    """``{tensor name: {"dtype", "shape", ...}}`` from a safetensors file's JSON header (no tensor is read).

    Raises:
        ConfigError: the file is not a safetensors file.
    """
    try:
        with path.open("rb") as fh:
            size = struct.unpack("<Q", fh.read(8))[0]
            if size > 100_000_000:
                raise ValueError(f"header of {size} bytes")
            header = json.loads(fh.read(size))
    except (OSError, ValueError, struct.error) as exc:
        raise ConfigError(f"{path} is not a readable safetensors file ({exc})") from exc
    if not isinstance(header, dict):
        raise ConfigError(f"{path} is not a readable safetensors file (its header is not a JSON object)")
    return {k: v for k, v in header.items() if k != "__metadata__"}


def read_adapter_config(adapter_dir: str | Path) -> dict[str, Any]:
    """The folder's ``adapter_config.json``, checked to be a peft LoRA adapter folder with safetensors weights.

    Raises:
        ConfigError: one line naming the folder and what is missing.
    """
    folder = Path(adapter_dir)
    if not folder.is_dir():
        raise ConfigError(f"LoRA adapter {folder}: no such folder")
    config_path = folder / ADAPTER_CONFIG
    if not config_path.is_file():
        raise ConfigError(f"LoRA adapter {folder}: no {ADAPTER_CONFIG} (not a peft adapter folder)")
    if not (folder / ADAPTER_WEIGHTS).is_file():
        raise ConfigError(f"LoRA adapter {folder}: no {ADAPTER_WEIGHTS}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"LoRA adapter {folder}: {ADAPTER_CONFIG} is not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise ConfigError(f"LoRA adapter {folder}: {ADAPTER_CONFIG} is not a JSON object")
    return config


def _config_problems(config: dict[str, Any], max_lora_rank: int) -> list[str]:
    problems = []
    missing = [k for k in ("r", "lora_alpha", "target_modules") if k not in config]
    if missing:
        problems.append(f"{ADAPTER_CONFIG} lacks the required field(s) {', '.join(missing)}")
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type is {config.get('peft_type')!r}; vLLM serves LORA adapters only")
    rank = config.get("r")
    if isinstance(rank, int) and rank > max_lora_rank:
        problems.append(f"LoRA rank {rank} is greater than --max-lora-rank {max_lora_rank}")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save is {config['modules_to_save']!r}; vLLM needs it empty")
    if config.get("use_dora"):
        problems.append("use_dora is true; vLLM does not serve DoRA")
    if config.get("bias", "none") != "none":
        problems.append(f"bias is {config['bias']!r}; vLLM needs 'none'")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            problems.append(f"{key} is set; vLLM ignores it, so the served adapter would differ")
    targets = config.get("target_modules")
    if isinstance(targets, list):
        problems += [_module_problem(str(t), "target_modules names") for t in targets if _module_problem(str(t), "")]
    return problems


def _module_problem(path: str, what: str) -> str:
    """Why vLLM would not apply LoRA to a module path (``""`` when it would)."""
    parts = path.split(".")
    if any(p in TOWER_WORDS for p in parts):
        return f"{what} {path}: a vision-tower module (vLLM applies LoRA to the language model only)"
    if parts[-1] in EMBEDDING_NAMES:
        return f"{what} {path}: an embedding or output layer (vLLM loads no embedding LoRA here)"
    if parts[-1] not in LM_LINEAR:
        return f"{what} {path}: not a language-model linear layer ({', '.join(LM_LINEAR)})"
    return ""


def _tensor_problems(header: dict[str, dict[str, Any]], max_lora_rank: int) -> tuple[list[str], set[str]]:
    problems: list[str] = []
    modules: set[str] = set()
    for name, info in sorted(header.items()):
        stem = name.removeprefix("base_model.model.")
        if "lora_embedding" in stem:
            problems.append(f"tensor {name}: an embedding LoRA (vLLM loads no embedding LoRA here)")
            continue
        for suffix in (".lora_A.weight", ".lora_B.weight"):
            if stem.endswith(suffix):
                module = stem[: -len(suffix)]
                break
        else:
            problems.append(f"tensor {name}: not a LoRA A/B weight (a full layer saved with the adapter)")
            continue
        problem = _module_problem(module, "tensor for")
        if problem:
            problems.append(problem)
        shape = info.get("shape") or [0]
        if suffix == ".lora_A.weight" and shape[0] > max_lora_rank:
            problems.append(f"tensor {name}: rank {shape[0]} is greater than --max-lora-rank {max_lora_rank}")
        modules.add(module)
    if not header:
        problems.append(f"{ADAPTER_WEIGHTS} holds no tensors")
    return problems, modules


def check_vllm_lora(adapter_dir: str | Path, max_lora_rank: int = 16) -> dict[str, Any]:
    """Checks that ``vllm serve BASE --enable-lora --lora-modules NAME=adapter_dir --max-lora-rank R`` can load a
    peft adapter: the required config fields (``r``, ``lora_alpha``, ``target_modules``), rank at most
    ``max_lora_rank`` (itself one of :data:`VLLM_MAX_LORA_RANKS`), no ``modules_to_save``, DoRA, bias or rank /
    alpha patterns, and every tensor a LoRA A/B weight of a language-model linear layer: none in the vision tower,
    none on the embeddings or ``lm_head``. vLLM takes the tensor names as the truth (a target that matched nothing
    saves nothing), and so does this check.

    Returns:
        ``{"rank", "alpha", "modules" (count), "tensors" (count), "max_lora_rank"}``.

    Raises:
        ConfigError: one line listing every problem found.
    """
    folder = Path(adapter_dir)
    config = read_adapter_config(folder)
    problems = []
    if max_lora_rank not in VLLM_MAX_LORA_RANKS:
        accepted = ", ".join(map(str, VLLM_MAX_LORA_RANKS))
        problems.append(f"--max-lora-rank {max_lora_rank} is not a value vLLM accepts ({accepted})")
    problems += _config_problems(config, max_lora_rank)
    header = read_safetensors_header(folder / ADAPTER_WEIGHTS)
    tensor_problems, modules = _tensor_problems(header, max_lora_rank)
    problems += tensor_problems
    if problems:
        shown = problems[:6] + ([f"... and {len(problems) - 6} more"] if len(problems) > 6 else [])
        raise ConfigError(f"LoRA adapter {folder} cannot be served by vLLM: " + "; ".join(shown))
    return {
        "rank": config["r"],
        "alpha": config["lora_alpha"],
        "modules": len(modules),
        "tensors": len(header),
        "max_lora_rank": max_lora_rank,
    }


# ---------------------------------------------------------------------- the dialogues
ROLES = ("system", "user", "assistant")


def dialogues_file(data_dir: str | Path) -> Path:
    """``DIR/dialogues.jsonl``, else the folder's only ``*.jsonl`` file.

    Raises:
        ConfigError: no folder, or no (or more than one) JSONL file in it.
    """
    folder = Path(data_dir)
    if not folder.is_dir():
        raise ConfigError(f"--data {folder}: no such folder (make one with `vlad make-dialogues`)")
    if (folder / "dialogues.jsonl").is_file():
        return folder / "dialogues.jsonl"
    found = sorted(folder.glob("*.jsonl"))
    if len(found) != 1:
        raise ConfigError(f"--data {folder}: expected dialogues.jsonl (or one *.jsonl file), found {len(found)}")
    return found[0]


def load_dialogues(data_dir: str | Path) -> list[list[dict[str, Any]]]:
    """Reads and checks a chat-messages JSONL set: every line ``{"messages": [...]}`` with roles system / user /
    assistant, content a string or a list of ``{"type": "text", "text"}`` / ``{"type": "image", "image": PATH}``
    parts (paths relative to the folder, files present), and at least one assistant turn with text.

    Returns:
        The messages of each line, image paths made absolute.

    Raises:
        ConfigError: ``FILE:LINE: what is wrong`` for the first bad line; an empty set.
    """
    path = dialogues_file(data_dir)
    folder = path.parent
    out = []
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                out.append(_check_record(json.loads(line), folder))
            except (json.JSONDecodeError, ValueError) as exc:
                raise ConfigError(f"{path}:{number}: {exc}") from None
    if not out:
        raise ConfigError(f"{path}: no dialogues in it")
    return out


def _check_record(record: Any, folder: Path) -> list[dict[str, Any]]:
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list) or not record["messages"]:
        raise ValueError('each line must be a JSON object with a non-empty "messages" list')
    messages = []
    for message in record["messages"]:
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ROLES:
            raise ValueError(f"message role {role!r} is not one of {', '.join(ROLES)}")
        content = message.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list):
            raise ValueError(f"{role} content must be a string or a list of parts")
        messages.append({"role": role, "content": [_check_part(p, folder) for p in parts]})
    answers = [m for m in messages if m["role"] == "assistant"]
    if not any(p["type"] == "text" and p["text"].strip() for m in answers for p in m["content"]):
        raise ValueError("no assistant turn with text to learn")
    return messages


def _check_part(part: Any, folder: Path) -> dict[str, Any]:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text" and isinstance(part.get("text"), str):
        return {"type": "text", "text": part["text"]}
    if kind == "image" and isinstance(part.get("image"), str):
        image = folder / part["image"]
        if not image.is_file():
            raise ValueError(f"image {part['image']} not found under {folder}")
        return {"type": "image", "image": str(image)}
    raise ValueError(
        f'a content part must be {{"type": "text", "text": ...}} or {{"type": "image", "image": ...}}, '
        f"got {json.dumps(part)[:80]}"
    )


def encode_dialogue(processor: Any, messages: list[dict[str, Any]]) -> dict[str, Any]:
    """Processor inputs for one dialogue plus ``labels``: the token ids on the assistant turns (text and end of turn),
    :data:`IGNORE_INDEX` elsewhere.

    Each assistant turn's span is found by rendering the chat up to it with the generation prompt (where the answer
    starts) and through it (where it ends); the rendering must be a prefix of the whole one.

    Returns:
        ``input_ids`` (1, T), ``attention_mask`` (1, T), ``labels`` (1, T), and the image tensors the processor
        makes (``pixel_values``, ``image_grid_thw`` for Qwen2-VL) when there are pictures.
    """
    from PIL import Image

    hf = [{"role": m["role"], "content": [_hf_part(p) for p in m["content"]]} for m in messages]
    images = [Image.open(p["image"]).convert("RGB") for m in messages for p in m["content"] if p["type"] == "image"]

    def encode(upto: int, generation_prompt: bool) -> Any:
        text = processor.apply_chat_template(hf[:upto], tokenize=False, add_generation_prompt=generation_prompt)
        count = sum(p["type"] == "image" for m in messages[:upto] for p in m["content"])
        return processor(text=[text], images=images[:count] or None, return_tensors="pt")

    inputs = encode(len(hf), False)
    ids = inputs["input_ids"][0]
    labels = ids.new_full(ids.shape, IGNORE_INDEX)
    for k, message in enumerate(hf):
        if message["role"] != "assistant":
            continue
        start = encode(k, True)["input_ids"][0]
        end = len(encode(k + 1, False)["input_ids"][0])
        if len(start) > len(ids) or not bool((ids[: len(start)] == start).all()):
            raise ConfigError("the chat template does not render a conversation's start as a prefix of the whole")
        labels[len(start) : end] = ids[len(start) : end]
    inputs["labels"] = labels[None]
    return inputs


def _hf_part(part: dict[str, Any]) -> dict[str, Any]:
    return {"type": "image"} if part["type"] == "image" else {"type": "text", "text": part["text"]}


# ---------------------------------------------------------------------- training
@dataclass(frozen=True)
class LVLMTrainSettings:
    """What ``vlad train-lvlm`` trains with (recorded in ``training.json`` and the checkpoint).

    Attributes:
        base: the base model's local folder (a Qwen2-VL-family model transformers loads).
        data: the dialogues folder.
        steps: optimiser steps; None: from ``epochs``.
        epochs: passes over the dialogues (may be fractional) when ``steps`` is None.
        lr: AdamW learning rate (constant).
        rank: LoRA rank.
        alpha: LoRA alpha (the update is scaled by alpha / rank).
        batch_size: dialogues per optimiser step.
        save_every: write the checkpoint every this many steps (and at the end).
        seed: the data order and LoRA initialisation.
        max_lora_rank: the ``vllm serve --max-lora-rank`` the adapter must fit; None: the smallest that holds rank.
    """

    base: str
    data: str
    steps: int | None = None
    epochs: float | None = None
    lr: float = 2e-4
    rank: int = 16
    alpha: int = 32
    batch_size: int = 4
    save_every: int = 50
    seed: int = 0
    max_lora_rank: int | None = None

    def vllm_rank(self) -> int:
        return self.max_lora_rank if self.max_lora_rank is not None else vllm_max_lora_rank(self.rank)

    def total_steps(self, n_dialogues: int) -> int:
        if self.steps is not None:
            return self.steps
        return max(1, int(np.ceil((self.epochs or 1.0) * n_dialogues / self.batch_size)))

    def check(self) -> None:
        """Checks values that need no model (raises ConfigError naming the option)."""
        for name in ("rank", "alpha", "batch_size", "save_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"--steps must be a positive integer, got {self.steps!r}")
        if self.epochs is not None and not self.epochs > 0:
            raise ConfigError(f"--epochs must be positive, got {self.epochs!r}")
        if not self.lr > 0:
            raise ConfigError(f"--lr must be positive, got {self.lr!r}")
        limit = self.vllm_rank()
        if limit not in VLLM_MAX_LORA_RANKS:
            raise ConfigError(f"--max-lora-rank {limit} is not a value vLLM accepts ({VLLM_MAX_LORA_RANKS})")
        if self.rank > limit:
            raise ConfigError(f"--rank {self.rank} is greater than --max-lora-rank {limit}; vLLM would refuse it")
        base = Path(self.base)
        if not (base / "config.json").is_file():
            raise ConfigError(f"--model {base}: not a model folder (no config.json); give a local Qwen2-VL folder")


RESUME_KEYS = ("base", "data", "lr", "rank", "alpha", "batch_size", "seed")
"""Settings a resumed run must share with its checkpoint (``steps`` / ``epochs`` / ``save_every`` may change)."""


def example_index(position: int, n: int, seed: int) -> tuple[int, int]:
    """``(epoch, dialogue index)`` of the ``position``-th example drawn: a seeded permutation per epoch."""
    epoch, offset = divmod(position, n)
    return epoch, int(np.random.default_rng([seed, epoch]).permutation(n)[offset])


def prepare_output(out: Path, resume: bool, overwrite: bool) -> dict[str, Any] | None:
    """Checks the output folder before any model loads; returns the checkpoint state to resume from, if any.

    Raises:
        ConfigError: ``out`` is a file; it holds an adapter and neither ``resume`` nor ``overwrite`` is set;
            ``resume`` without a checkpoint.
    """
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder for the adapter")
    state_file = out / CHECKPOINT_DIR / "trainer_state.json"
    if resume:
        if not state_file.is_file():
            raise ConfigError(f"--resume: {out} holds no checkpoint ({CHECKPOINT_DIR}/trainer_state.json)")
        return json.loads(state_file.read_text(encoding="utf-8"))
    if (out / ADAPTER_CONFIG).exists() or state_file.exists():
        if not overwrite:
            raise ConfigError(f"--out {out} already holds an adapter or checkpoint; pass --resume or --overwrite")
        for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, LOG_FILE, "training.json"):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    return None


def _check_resume(state: dict[str, Any], settings: LVLMTrainSettings) -> None:
    saved = state.get("settings", {})
    for key in RESUME_KEYS:
        if saved.get(key) != getattr(settings, key):
            raise ConfigError(
                f"--resume: the checkpoint was trained with {key} {saved.get(key)!r}, not {getattr(settings, key)!r}"
            )


def load_lora_model(settings: LVLMTrainSettings, device: str) -> tuple[Any, Any]:
    """The base model (fp32 on CPU, bf16 on CUDA) with fresh LoRA layers on its language model, and its processor."""
    torch = require("torch", "train", what="vlad train-lvlm")
    require("transformers", "explain", what="vlad train-lvlm")
    peft = require("peft", "train", what="vlad train-lvlm")
    from transformers import AutoModelForImageTextToText, AutoProcessor

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        processor = AutoProcessor.from_pretrained(settings.base, local_files_only=True)
        model = AutoModelForImageTextToText.from_pretrained(settings.base, local_files_only=True, dtype=dtype)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"--model {settings.base}: cannot load it ({' '.join(str(exc).split())[:200]})") from exc
    torch.manual_seed(settings.seed)
    config = peft.LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=0.0,
        bias="none",
        target_modules=LORA_TARGET_REGEX,
        task_type="CAUSAL_LM",
    )
    try:
        model = peft.get_peft_model(model, config)
    except ValueError as exc:
        raise ConfigError(
            f"--model {settings.base}: no language-model layers named {', '.join(LM_LINEAR)} "
            f"(is it a Qwen2-VL-family model?): {' '.join(str(exc).split())[:160]}"
        ) from exc
    return model.to(device), processor


def save_checkpoint(out: Path, model: Any, optimizer: Any, step: int, settings: LVLMTrainSettings) -> None:
    """Writes ``out/checkpoint/`` (adapter, optimiser state, RNG states, step) through a temporary folder, so a run
    killed while saving keeps the previous checkpoint."""
    import random

    import torch

    tmp, final = out / (CHECKPOINT_DIR + ".tmp"), out / CHECKPOINT_DIR
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, save_embedding_layers=False)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, tmp / "rng.pt")
    np_state = np.random.get_state()
    state = {
        "step": step,
        "settings": asdict(settings),
        "numpy_rng": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python_rng": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    (tmp / "trainer_state.json").write_text(json.dumps(state), encoding="utf-8")
    old = out / (CHECKPOINT_DIR + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(out: Path, model: Any, optimizer: Any, state: dict[str, Any]) -> int:
    """Restores the adapter weights, the optimiser, the RNG states; returns the step to continue from."""
    import random

    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    folder = out / CHECKPOINT_DIR
    set_peft_model_state_dict(model, load_file(str(folder / ADAPTER_WEIGHTS), device=str(model.device)))
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location=model.device, weights_only=True))
    rng = torch.load(folder / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    kind, keys, *rest = state["numpy_rng"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    version, internal, gauss = state["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    return int(state["step"])


def _trim_log(path: Path, step: int) -> None:
    """Keeps the log lines of steps up to ``step`` (a resumed run continues the log from its checkpoint)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def train_step(model: Any, processor: Any, dialogues: list[Any], positions: range, seed: int) -> tuple[float, int]:
    """One optimiser step's forward/backward passes (gradients accumulated, each example weighted 1 / batch).

    Returns:
        (the mean loss over the batch, the epoch of the last example).
    """
    total, epoch = 0.0, 0
    for position in positions:
        epoch, index = example_index(position, len(dialogues), seed)
        inputs = encode_dialogue(processor, dialogues[index]).to(model.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        loss = model(**inputs).loss
        (loss / len(positions)).backward()
        total += float(loss.detach())
    return total / len(positions), epoch


def train_lvlm(
    settings: LVLMTrainSettings,
    out: str | Path,
    *,
    device: str = "auto",
    resume: bool = False,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Trains the LoRA adapter and writes the output folder (see the module docstring); checks it with
    :func:`check_vllm_lora` at the end.

    Args:
        settings: the training settings.
        out: the adapter folder.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        resume: continue from ``out/checkpoint`` (model, optimiser, step and RNG states).
        overwrite: replace an adapter already in ``out``.
        progress: ``progress(done_steps, total_steps)`` after each step.

    Returns:
        ``training.json``'s content: settings, steps, first and last loss, the vLLM check's summary.
    """
    settings.check()
    out = Path(out)
    dialogues = load_dialogues(settings.data)
    state = prepare_output(out, resume, overwrite)
    if state is not None:
        _check_resume(state, settings)
    torch = require("torch", "train", what="vlad train-lvlm")
    from vlad.backbones import resolve_device

    model, processor = load_lora_model(settings, resolve_device(device))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    start = load_checkpoint(out, model, optimizer, state) if state is not None else 0
    total = settings.total_steps(len(dialogues))
    _trim_log(out / LOG_FILE, start)
    model.train()
    started = time.perf_counter()
    losses = []
    with (out / LOG_FILE).open("a", encoding="utf-8") as log:
        for step in range(start, total):
            optimizer.zero_grad(set_to_none=True)
            batch = range(step * settings.batch_size, (step + 1) * settings.batch_size)
            loss, epoch = train_step(model, processor, dialogues, batch, settings.seed)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            losses.append(loss)
            seconds = round(time.perf_counter() - started, 3)
            entry = {"step": step + 1, "epoch": epoch, "loss": loss, "lr": settings.lr, "seconds": seconds}
            log.write(json.dumps(entry) + "\n")
            log.flush()
            if (step + 1) % settings.save_every == 0 or step + 1 == total:
                save_checkpoint(out, model, optimizer, step + 1, settings)
            if progress is not None:
                progress(step + 1 - start, total - start)
    return _finish(out, model, settings, total, start, losses)


def _finish(
    out: Path, model: Any, settings: LVLMTrainSettings, total: int, start: int, losses: list[float]
) -> dict[str, Any]:
    model.save_pretrained(out, save_embedding_layers=False)
    check = check_vllm_lora(out, settings.vllm_rank())
    summary = {
        "settings": asdict(settings),
        "steps": total,
        "resumed_from": start or None,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "vllm_check": check,
        "adapter": str(out),
    }
    (out / "training.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary
