"""Command-line pieces of the explainer: ``vlad chat``, ``vlad lvlm-check``, the ``--explain`` options of
``vlad detect`` and the LVLM verdict tracker of ``vlad eval --lvlm``.

:mod:`vlad.cli` wires these in: ``register(subparsers)`` adds the two subcommands and returns their handlers;
``add_explain_options(parser)`` adds ``--explain``, ``--lvlm``, ``--process-note``, ``--lvlm-timeout`` and
``--lvlm-max-tokens``;
``explain_row(image, result, object_name, args)`` gives the keys a report row gains. Nothing here crashes the caller
because of a language model: failures fall back to the template explanation and say so.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from typing import Any, TextIO

import numpy as np
from PIL import Image

from vlad._argtypes import positive_float, positive_int
from vlad.errors import VladError
from vlad.explain.verdicts import VerdictTracker

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_UNUSABLE = 0, 1
_BACKENDS: dict[tuple[str, float], Any] = {}
_DOWN: dict[str, str] = {}

__all__ = [
    "VerdictTracker",
    "add_explain_options",
    "check_explain_args",
    "explain_row",
    "register",
    "reset_backends",
    "run_chat",
    "run_lvlm_check",
]


# ---------------------------------------------------------------------- options


def _add_lvlm_options(group: Any, *, lvlm_required: bool = False) -> None:
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
    _add_lvlm_options(g)
    g.add_argument(
        "--process-note",
        default=None,
        metavar="TEXT",
        help="how the product is made, shown to the language model (Triad's CoT-M idea)",
    )


def register(subparsers: Any) -> dict[str, Callable[[argparse.Namespace], int]]:
    """Adds the ``chat`` and ``lvlm-check`` subcommands and returns ``{name: handler}``."""
    from vlad.cli_common import add_model_options

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
    _add_lvlm_options(g)
    g.add_argument("--process-note", default=None, metavar="TEXT", help="how the product is made (Triad's CoT-M)")
    g.add_argument(
        "--context-tokens",
        type=positive_int,
        default=8192,
        help="the model's context length (default 8192, as `vllm serve --max-model-len 8192`)",
    )
    g.add_argument(
        "--max-image-side",
        type=positive_int,
        default=512,
        help="pictures are sent with their longer side at most this many pixels (default 512)",
    )
    add_model_options(c)
    k = subparsers.add_parser("lvlm-check", help="is the language model server usable? (reachable, model, images)")
    _add_lvlm_options(k, lvlm_required=True)
    k.add_argument(
        "--wait",
        type=positive_float,
        default=None,
        metavar="SECONDS",
        help="wait up to this long for the server to come up (vLLM takes minutes to load)",
    )
    return {"chat": run_chat, "lvlm-check": run_lvlm_check}


# ---------------------------------------------------------------------- detect --explain
def _backend(spec: str, timeout: float) -> Any:
    from vlad.explain.backends import load_backend

    key = (spec, float(timeout))
    if key not in _BACKENDS:
        _BACKENDS[key] = load_backend(spec, timeout=timeout)
    return _BACKENDS[key]


def _as_pil(image: Any) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        return Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB")
    from vlad.data import load_image

    return load_image(image)


def explain_row(
    image: Any, result: Any, object_name: str, args: argparse.Namespace, *, backbone: Any = None
) -> dict[str, Any]:
    """The keys a ``vlad detect`` report row gains with ``--explain``.

    Args:
        image: the photo (PIL image, uint8 array or path), at the result's resolution.
        result: its :class:`~vlad.result.AnomalyResult`.
        object_name: the product name.
        args: parsed options (``lvlm``, ``process_note``, ``lvlm_timeout``, ``lvlm_max_tokens``; missing ones take
            their defaults).
        backbone: the scorer's CLIP backbone, to name each region's defect with a phrase from ``prompts/filo.yaml``.

    Returns:
        ``{"explanation": text, "report": validated report dict or None, "lvlm": spec, "explain_error": None or one
        line}``. ``report`` is None whenever the language model gave no valid report (the template's explanation is
        then used, and ``explain_error`` says why).
    """
    from vlad.explain.evidence import build_evidence, build_facts
    from vlad.explain.explainer import explain
    from vlad.explain.template import explain_text

    spec = getattr(args, "lvlm", None) or "template"
    timeout = getattr(args, "lvlm_timeout", None) or 60.0
    note = getattr(args, "process_note", None)
    try:
        clip = backbone if hasattr(backbone, "forward_visual") and hasattr(backbone, "encode_text") else None
        evidence = build_evidence(_as_pil(image), result, object_name, process_note=note, backbone=clip)
        if spec in _DOWN:
            error = f"the LVLM {spec} was unavailable earlier in this run ({_DOWN[spec]}); the template was used"
            return _row(f"[note: {error}] {explain_text(evidence.facts)}", None, spec, error)
        outcome = explain(evidence, _backend(spec, timeout), max_tokens=getattr(args, "lvlm_max_tokens", None) or 512)
        if outcome.backend_down:
            _DOWN[spec] = outcome.failure or "unavailable"
        return _row(outcome.explanation.text, outcome.report, spec, outcome.error)
    except Exception as exc:  # noqa: BLE001 -- an explanation must never fail a detection run
        logger.warning("explanation failed for %s: %s", object_name, exc, exc_info=logger.isEnabledFor(logging.DEBUG))
        try:
            text = explain_text(build_facts(result, object_name.strip() or "object", process_note=note))
        except Exception:  # noqa: BLE001
            text = f"vlad judged this {object_name} {result.verdict} (score {result.pred_score:.4f})."
        message = " ".join(str(exc).split())[:240]
        return _row(text, None, spec, f"explanation failed ({message}); the template explanation was used")


def _row(text: str, report: dict[str, Any] | None, spec: str, error: str | None) -> dict[str, Any]:
    return {"explanation": text, "report": report, "lvlm": spec, "explain_error": error}


def check_explain_args(args: argparse.Namespace) -> None:
    """Validates ``--lvlm`` before any work (a bad spec is a usage error, not a per-image failure).

    Raises:
        ConfigError: the spec has none of the accepted forms.
    """
    from vlad.explain.backends import parse_backend_spec

    parse_backend_spec(getattr(args, "lvlm", None) or "template")


def reset_backends() -> None:
    """Forgets cached backends and the ones found unavailable (each ``vlad`` run starts afresh; tests call this)."""
    _BACKENDS.clear()
    _DOWN.clear()


# ---------------------------------------------------------------------- vlad chat
def _load_references(refs: list[str] | None) -> list[Image.Image]:
    if not refs:
        return []
    from vlad.cli_common import UsageError
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
    from vlad.cli_common import build_scorer
    from vlad.data import load_image
    from vlad.explain.conversation import Conversation
    from vlad.explain.evidence import build_evidence

    out, stdin = sys.stdout, sys.stdin
    image = load_image(args.image)
    refs = _load_references(args.refs)
    scorer = build_scorer(args)
    if refs:
        scorer.fit(refs)
    result = scorer.score(image, args.object_name)
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
        out.write("\n")
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
