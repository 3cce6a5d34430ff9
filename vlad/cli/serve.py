"""``vlad serve``: the web UI (Gradio), over the same pipeline."""

from __future__ import annotations

import argparse
from typing import Any

from vlad._argtypes import positive_int
from vlad._optional import require
from vlad.cli.common import (
    EXIT_OK,
    UsageError,
    tile_option,
)


def run_serve(args: argparse.Namespace) -> int:
    auth = None
    if args.auth:
        user, sep, password = args.auth.partition(":")
        if not sep or not user or not password:
            raise UsageError("--auth must look like user:password")
        auth = (user, password)
    require("gradio", "ui", what="the web UI")
    from webui.app import build_app, launch

    demo = build_app(
        scorer=args.scorer,
        backbone=args.backbone,
        lvlm=args.lvlm,
        device=args.device,
        profile=args.profile,
        adapter=args.adapter,
        tile=args.tile,
    )
    print(f"vlad web UI on http://{args.host}:{args.port}", flush=True)
    launch(demo, host=args.host, port=args.port, auth=auth)
    return EXIT_OK


def register(subparsers: Any) -> dict[str, Any]:
    """Adds ``serve``; returns ``{"serve": handler}``."""

    s = subparsers.add_parser("serve", help="start the web UI (Gradio) on 127.0.0.1:7860")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=positive_int, default=7860)
    s.add_argument("--scorer", default="winclip")
    s.add_argument("--backbone", default=None, help="backbone spec (default: the scorer's)")
    s.add_argument("--lvlm", default="template", help="explainer: template, openai:URL[#model], transformers:MODEL")
    s.add_argument("--device", default="auto")
    s.add_argument("--profile", default=None, choices=["paper", "vlad"], help="scorer profile (default paper)")
    s.add_argument("--adapter", default=None, metavar="NAME_OR_PATH", help="learned or imported adapter for the scorer")
    s.add_argument(
        "--tile",
        type=tile_option,
        default=None,
        metavar="SIZE|auto",
        help="score large uploads as overlapping tiles of SIZE pixels, or auto (see `vlad detect --help`)",
    )
    s.add_argument("--auth", default=None, help="user:password for basic login")
    return {"serve": run_serve}
