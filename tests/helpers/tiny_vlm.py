"""A tiny random Qwen2-VL, built from config objects and a tokenizer trained on the spot, saved like a Hub model.

Nothing is downloaded: the byte-level BPE tokenizer is trained with the ``tokenizers`` library on a small corpus that
includes Qwen2-VL's special tokens, the config is transformers 5's nested ``Qwen2VLConfig`` (ECOSYSTEM.md section 8)
with its token ids taken from that tokenizer, and the image processor works at tiny sizes (at most 56 x 56 pixels, so
at most 4 image tokens per picture). The weights are random: what it says is noise, which is the point -- it tests the
plumbing (chat template, image parts, streaming, multi-turn) and the "unparseable reply" path, not accuracy.

Use :func:`tiny_vlm_dir` (built once per process) for a local folder, or :func:`tiny_vlm_hf_home` for an
``HF_HOME`` whose hub cache holds the same files as the model ``vlad-test/tiny-qwen2-vl`` (``transformers serve``
lists only cached models under ``/v1/models``).
"""

from __future__ import annotations

import functools
import shutil
import tempfile
from pathlib import Path

MODEL_ID = "vlad-test/tiny-qwen2-vl"
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Qwen2-VL's chat template (from its tokenizer_config.json), unchanged but for whitespace.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = (
    "The bottle has a scratch at the top left. There is a crack in the center of the part.",
    '{"verdict": "anomalous", "defect_type": "scratch", "location": "top left", "severity": "minor"}',
    "Where is the defect? How big is it? How sure are you? Why is it anomalous? No, there is no anomaly.",
    "system user assistant You are a helpful assistant. image heat map crop region score threshold",
)


def _train_tokenizer() -> object:
    """A byte-level BPE ``tokenizers.Tokenizer`` (vocab < 384) whose first ids are :data:`SPECIAL_TOKENS`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=360,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(_CORPUS) * 4, trainer=trainer)
    return tok


def build_tiny_vlm(out_dir: str | Path, *, seed: int = 0) -> Path:
    """Builds the tiny Qwen2-VL (about 0.1 M parameters) and saves model + ``Qwen2VLProcessor`` to ``out_dir``.

    Args:
        out_dir: folder to write (created); it then loads with ``AutoModelForImageTextToText`` / ``AutoProcessor``.
        seed: torch seed for the random weights.

    Returns:
        ``out_dir`` as a Path.
    """
    import torch
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    raw = _train_tokenizer()
    ids = {t: raw.token_to_id(t) for t in SPECIAL_TOKENS}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in ("<|im_end|>", "<|endoftext|>")],
    )
    pixels = {"min_pixels": 28 * 28, "max_pixels": 56 * 56}
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pixels),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**pixels),
        chat_template=CHAT_TEMPLATE,
    )
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": 384,
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            "rope_scaling": {"type": "mrope", "mrope_section": [2, 1, 1]},
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": 2,
            "embed_dim": 32,
            "hidden_size": 32,
            "num_heads": 4,
            "mlp_ratio": 4,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.do_sample = False
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


@functools.cache
def tiny_vlm_dir() -> Path:
    """The tiny model saved in a temporary folder, built once per process (removed at interpreter exit)."""
    import atexit

    root = Path(tempfile.mkdtemp(prefix="vlad-tiny-vlm-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return build_tiny_vlm(root / "tiny-qwen2-vl")


@functools.cache
def tiny_vlm_hf_home() -> Path:
    """An ``HF_HOME`` folder whose hub cache holds :data:`MODEL_ID` (the files of :func:`tiny_vlm_dir`).

    The layout is huggingface_hub's: ``hub/models--ORG--NAME/{refs/main, snapshots/<commit>/...}``, so offline
    ``from_pretrained(MODEL_ID)`` and ``transformers serve``'s ``/v1/models`` (a cache scan) both find it.
    """
    import atexit

    src = tiny_vlm_dir()
    home = Path(tempfile.mkdtemp(prefix="vlad-hf-home-"))
    atexit.register(shutil.rmtree, home, ignore_errors=True)
    commit = "0" * 40
    repo = home / "hub" / ("models--" + MODEL_ID.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    blobs = repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for i, f in enumerate(sorted(src.iterdir())):
        blob = blobs / f"{i:040x}"
        shutil.copyfile(f, blob)
        (snapshot / f.name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return home
