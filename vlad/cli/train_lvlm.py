"""``vlad train-lvlm``: LoRA fine-tuning of a Qwen2-VL-family explainer on dialogues from ``vlad make-dialogues``
(:mod:`vlad.training_lvlm`), ending with the check that vLLM can serve the adapter."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from vlad._argtypes import positive_float, positive_int
from vlad.cli.common import EXIT_OK, Progress


def register(subparsers: Any) -> dict[str, Callable[[argparse.Namespace], int]]:
    """Adds ``train-lvlm``; returns ``{"train-lvlm": handler}``."""
    p = subparsers.add_parser(
        "train-lvlm",
        help="LoRA fine-tuning of a Qwen2-VL-family explainer on chat dialogues (a peft adapter vLLM can serve)",
        description="Trains LoRA on the language model's linear layers (not the vision tower), loss on the "
        "assistant turns only; writes a peft adapter folder, train_log.jsonl and a resumable checkpoint.",
    )
    p.add_argument("--data", required=True, help="dialogues folder (from `vlad make-dialogues`)")
    p.add_argument("--model", required=True, help="the base model's local folder (Qwen2-VL family)")
    p.add_argument("--out", required=True, help="adapter folder to write")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=positive_int, default=None, help="optimiser steps")
    length.add_argument("--epochs", type=positive_float, default=None, help="passes over the dialogues (default 1)")
    p.add_argument("--lr", type=positive_float, default=2e-4, help="AdamW learning rate, constant (default 2e-4)")
    p.add_argument("--rank", type=positive_int, default=16, help="LoRA rank (default 16)")
    p.add_argument("--alpha", type=positive_int, default=32, help="LoRA alpha (default 32)")
    p.add_argument("--batch-size", type=positive_int, default=4, help="dialogues per optimiser step (default 4)")
    p.add_argument("--save-every", type=positive_int, default=50, help="checkpoint every N steps (default 50)")
    p.add_argument("--seed", type=int, default=0, help="data order and LoRA initialisation (default 0)")
    p.add_argument(
        "--max-lora-rank",
        type=positive_int,
        default=None,
        help="the `vllm serve --max-lora-rank` to fit (default: the smallest vLLM value >= --rank)",
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default auto (cuda if present)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--overwrite", action="store_true", help="replace an adapter already in --out")
    return {"train-lvlm": run_train_lvlm}


def run_train_lvlm(args: argparse.Namespace) -> int:
    from vlad.training_lvlm import LVLMTrainSettings, train_lvlm

    settings = LVLMTrainSettings(
        base=str(args.model),
        data=str(args.data),
        steps=args.steps,
        epochs=args.epochs,
        lr=args.lr,
        rank=args.rank,
        alpha=args.alpha,
        batch_size=args.batch_size,
        save_every=args.save_every,
        seed=args.seed,
        max_lora_rank=args.max_lora_rank,
    )
    summary = train_lvlm(
        settings,
        args.out,
        device=args.device,
        resume=args.resume,
        overwrite=args.overwrite,
        progress=Progress("train-lvlm", "steps"),
    )
    check = summary["vllm_check"]
    if summary["resumed_from"]:
        print(f"resumed from step {summary['resumed_from']}")
    if summary["first_loss"] is not None:
        print(f"loss: {summary['first_loss']:.4f} (first step) -> {summary['last_loss']:.4f} (step {summary['steps']})")
    print(f"adapter: {args.out} (rank {check['rank']}, alpha {check['alpha']}, {check['modules']} LoRA modules)")
    print(f"vLLM check: ok for --max-lora-rank {check['max_lora_rank']}")
    print(
        f"serve it: vllm serve {args.model} --enable-lora --lora-modules vlad-inspect={args.out} "
        f"--max-lora-rank {check['max_lora_rank']} --limit-mm-per-prompt '{{\"image\": 4}}'"
    )
    print("then: --lvlm openai:http://HOST:8000/v1#vlad-inspect")
    return EXIT_OK
