"""Command-line pieces of the explainer: ``vlad chat``, ``vlad lvlm-check``, the ``--explain`` options of
``vlad detect`` and the LVLM verdict tracker of ``vlad eval --lvlm``.

:mod:`vlad.cli` wires these in: ``register(subparsers)`` adds the two subcommands and returns their handlers;
``add_explain_options(parser)`` adds ``--explain``, ``--lvlm``, ``--process-note``, ``--lvlm-timeout`` and
``--lvlm-max-tokens``;
``explain_options(args)`` turns the options into :class:`~vlad.explain.rows.ExplainOptions` for the pipeline.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from typing import Any, TextIO

from PIL import Image

from vlad._argtypes import positive_float, positive_int
from vlad.errors import VladError
from vlad.explain.rows import ExplainOptions
from vlad.explain.verdicts import VerdictTracker

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_UNUSABLE = 0, 1

__all__ = [
    "VerdictTracker",
    "add_explain_options",
    "explain_options",
    "register",
    "run_chat",
    "run_lvlm_check",
]


# ---------------------------------------------------------------------- options


def add_lvlm_options(group: Any, *, lvlm_required: bool = False) -> None:
    group.add_argument(
        "--lvlm",
        default=None if lvlm_required else "template",
        required=lvlm_required,
        metavar="SPEC",
        help="language model: template (default, no model), "
        "openai:http://127.0.0.1:8000/v1[#MODEL] (vLLM, Ollama, transformers serve, OpenAI), "
        "transformers:MODEL_OR_DIR (in process)",
    )
    group.add_argument(
        "--lvlm-timeout",
        type=positive_float,
        default=60.0,
        metavar="SECONDS",
        help="seconds to wait for the language model's answer (default 60)",
    )
    group.add_argument(
        "--lvlm-max-tokens",
        type=positive_int,
        default=512,
        metavar="N",
        help="most tokens the language model may generate per answer (default 512)",
    )


def add_explain_options(parser: argparse.ArgumentParser) -> None:
    """Adds ``--explain``, ``--lvlm SPEC`` (default ``template``), ``--process-note TEXT``, ``--lvlm-timeout`` and
    ``--lvlm-max-tokens``."""
    g = parser.add_argument_group("explanation")
    g.add_argument("--explain", action="store_true", help="add an explanation and a report to each result")
    add_lvlm_options(g)
    g.add_argument(
        "--process-note",
        default=None,
        metavar="TEXT",
        help="how the product is made, shown to the language model (Triad's CoT-M idea)",
    )


def register(subparsers: Any) -> dict[str, Callable[[argparse.Namespace], int]]:
    """Adds the ``chat`` and ``lvlm-check`` subcommands and returns ``{name: handler}``."""
    from vlad.cli.common import add_model_options

    c = subparsers.add_parser("chat", help="talk about one image with the explainer (questions from stdin)")
    c.add_argument("image", help="the image to talk about")
    c.add_argument("--object", required=True, dest="object_name", help="product name, e.g. bottle")
    c.add_argument(
        "--refs",
        nargs="+",
        default=None,
        help="normal reference images or directories (few-shot); the first is also shown to the language model",
    )
    g = c.add_argument_group("language model")
    add_lvlm_options(g)
    g.add_argument("--process-note", default=None, metavar="TEXT", help="how the product is made (Triad's CoT-M)")
    g.add_argument(
        "--context-tokens",
        type=positive_int,
        default=8192,
        help="the model's context length (default 8192, as `vllm serve --max-model-len 8192`); capped by the "
        "max_model_len a vLLM server reports",
    )
    g.add_argument(
        "--max-image-side",
        type=positive_int,
        default=512,
        help="pictures are sent with their longer side at most this many pixels (default 512)",
    )
    add_model_options(c)
    k = subparsers.add_parser("lvlm-check", help="is the language model server usable? (reachable, model, images)")
    add_lvlm_options(k, lvlm_required=True)
    k.add_argument(
        "--wait",
        type=positive_float,
        default=None,
        metavar="SECONDS",
        help="wait up to this long for the server to come up (vLLM takes minutes to load)",
    )
    return {"chat": run_chat, "lvlm-check": run_lvlm_check}


# ---------------------------------------------------------------------- detect --explain
def explain_options(args: argparse.Namespace) -> ExplainOptions:
    """The typed explainer options of ``--lvlm``, ``--lvlm-timeout``, ``--lvlm-max-tokens``, ``--process-note``."""
    return ExplainOptions(
        lvlm=getattr(args, "lvlm", None) or "template",
        timeout=getattr(args, "lvlm_timeout", None) or 60.0,
        max_tokens=getattr(args, "lvlm_max_tokens", None) or 512,
        process_note=getattr(args, "process_note", None),
    )


# ---------------------------------------------------------------------- vlad chat
def _load_references(refs: list[str] | None) -> list[Image.Image]:
    if not refs:
        return []
    from vlad.cli.common import UsageError
    from vlad.data import expand_inputs, load_image

    files, problems = expand_inputs(refs)
    if not files:
        detail = "; ".join(f"{p}: {msg}" for p, msg in problems) or "nothing given"
        raise UsageError(f"--refs: no images to read ({detail})")
    return [load_image(f) for f in files]


def _chat_backend(args: argparse.Namespace, out: TextIO) -> Any:
    from vlad.explain.backends import load_backend
    from vlad.explain.errors import LVLMError

    backend = load_backend(args.lvlm, timeout=args.lvlm_timeout)
    if getattr(backend, "is_model", False) and hasattr(backend, "model"):
        try:
            _ = backend.model  # resolve the model now, so a dead server is said once, up front
        except LVLMError as exc:
            print(f"[note: {exc}; answering from the facts (template) until it is reachable]", file=out)
    return backend


def run_chat(args: argparse.Namespace) -> int:
    """``vlad chat IMAGE --object NAME``: scores the image, prints the explanation, then answers questions read
    line by line from stdin until end of input or ``exit`` / ``quit``, streaming each answer to stdout."""
    from vlad.cli.common import build_detector
    from vlad.explain.conversation import Conversation
    from vlad.explain.evidence import build_evidence

    out, stdin = sys.stdout, sys.stdin
    refs = _load_references(args.refs)
    det = build_detector(args)
    if refs:
        det.fit(refs)
    (record,) = det.inspect_many([args.image], args.object_name)
    if not record.ok:
        raise VladError(record.error or f"cannot read {args.image}")
    image, result, scorer = record.image, record.result, det.scorer
    backend = _chat_backend(args, out)
    clip = scorer.backbone if hasattr(scorer.backbone, "forward_visual") else None
    evidence = build_evidence(
        image,
        result,
        args.object_name,
        process_note=args.process_note,
        references=refs[:1],
        backbone=clip,
        max_side=args.max_image_side,
    )
    conv = Conversation(evidence, backend, context_tokens=args.context_tokens, max_tokens=args.lvlm_max_tokens)
    print(
        f"vlad chat: {args.image} ({args.object_name}): {result.verdict}, score {result.pred_score:.4f}, "
        f"threshold {result.threshold:.4f}; language model: {backend.spec}",
        file=out,
    )
    for warning in result.warnings:
        print(f"warning: {warning}", file=out)
    print(f"vlad> {conv.explain().explanation.text}", file=out, flush=True)
    interactive = stdin.isatty()
    if interactive:
        print("Ask about the image; 'exit' or Ctrl-D ends.", file=out)
    while True:
        if interactive:
            out.write("you> ")
            out.flush()
        line = stdin.readline()
        if not line or line.strip().lower() in ("exit", "quit"):
            break
        out.write("vlad> ")
        for piece in conv.ask(line):
            out.write(piece)
            out.flush()
        out.write("\n" + (f"{conv.last_note}\n" if conv.last_note else ""))
        out.flush()
    return EXIT_OK


# ---------------------------------------------------------------------- vlad lvlm-check
def run_lvlm_check(args: argparse.Namespace) -> int:
    """``vlad lvlm-check --lvlm SPEC``: prints reachable / model / images / response_format and exits 0 when the
    backend is usable (everything but response_format, which has a fallback, is not a failure), else 1."""
    from vlad.explain.backends import load_backend
    from vlad.explain.errors import LVLMError

    backend = load_backend(args.lvlm, timeout=args.lvlm_timeout, max_retries=0)
    rows: list[tuple[str, bool | None, str]] = []
    if getattr(args, "wait", None) and hasattr(backend, "wait_ready"):
        try:
            backend.wait_ready(args.wait)
        except LVLMError as exc:
            rows.append(("reachable", False, f"not up after {args.wait:g} s: {exc}"))
    if not rows:
        try:
            rows = backend.check()
        except VladError as exc:
            rows = [("backend", False, str(exc))]
    status = {True: "yes", False: "NO", None: "?"}
    print(f"{'check':16s} {'ok':4s} detail")
    for item, ok, detail in rows:
        print(f"{item:16s} {status[ok]:4s} {detail}")
    usable = all(ok is not False for item, ok, _ in rows if item != "response_format")
    print(f"usable: {'yes' if usable else 'no'} ({backend.spec})")
    return EXIT_OK if usable else EXIT_UNUSABLE
