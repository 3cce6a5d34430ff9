"""The vlad web UI (Gradio 6): a chat about inspection images with the heat map, regions, verdict and rules beside it.

``build_app(...)`` returns a ``gr.Blocks`` and has no side effects; ``vlad serve`` (or ``python -m webui.app``)
launches it on 127.0.0.1:7860. Handlers are plain functions over a :class:`~webui.service.Session`; errors become
chat messages, never stack traces.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr

from vlad.errors import VladError
from webui.service import InspectorService, Session

logger = logging.getLogger(__name__)

MAX_FILE_SIZE = "100mb"  # hard limit at the upload route; the service refuses > 20 MB in the chat
IMAGE_TYPES = [".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"]


# ---------------------------------------------------------------------- formatting
def verdict_html(result: Any) -> str:
    if result is None:
        return "<div id='verdict' class='verdict none'>No image yet</div>"
    colour = "#c62828" if result.pred_label else "#2e7d32"
    fired = "".join(f"<li>{h.rule} → {h.effect}</li>" for h in result.rule_hits)
    return (
        f"<div id='verdict' style='border:2px solid {colour};border-radius:8px;padding:8px'>"
        f"<b style='color:{colour};font-size:1.3em'>{result.verdict.upper()}</b><br>"
        f"score {result.pred_score:.4f} (normalised {result.normalized_score:.2f}, threshold {result.threshold:.4f},"
        f" {result.threshold_source})<br>{len(result.regions)} region(s)"
        + (f"<ul>{fired}</ul>" if fired else "")
        + "</div>"
    )


def working_text(result: Any) -> str:
    lines = [
        f"scorer: {result.scorer} on {result.backbone}",
        f"score {result.pred_score:.4f} vs threshold {result.threshold:.4f} ({result.threshold_source})",
    ]
    for r in result.regions[:5]:
        lines.append(f"region at the {r.position}: {100 * r.area_fraction:.1f}% of the image, peak {r.peak_score:.3f}")
    for h in result.rule_hits:
        lines.append(f"rule fired: {h.rule} → {h.effect}")
    for w in result.warnings:
        lines.append(f"warning: {w}")
    return "\n".join(lines)


def annotations(ins: Any) -> tuple[Any, list[tuple[tuple[int, int, int, int], str]]]:
    boxes = [(tuple(int(v) for v in r.bbox), f"{r.position} ({r.peak_score:.2f})") for r in ins.result.regions[:16]]
    return ins.image, boxes


def _panels(ins: Any) -> tuple[Any, ...]:
    if ins is None:
        return verdict_html(None), None, None, None
    return verdict_html(ins.result), (ins.image, ins.overlay), annotations(ins), str(ins.report_path)


def _error_message(exc: BaseException) -> str:
    if isinstance(exc, VladError):
        return f"⚠️ {exc}"
    logger.exception("unexpected error in the web UI")
    return f"⚠️ Something went wrong: {str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__}"


def _images_only(value: Any) -> list[str]:
    """The image files of a folder upload (other files are left out)."""
    return [p for p in _files(value) if Path(p).suffix.lower() in IMAGE_TYPES]


def _files(value: Any) -> list[str]:
    if not value:
        return []
    items = value if isinstance(value, list) else [value]
    return [getattr(v, "name", None) or (v.get("path") if isinstance(v, dict) else v) for v in items]


# ---------------------------------------------------------------------- handlers
def chat(
    service: InspectorService,
    message: dict | str | None,
    history: list,
    session: Session | None,
    product: str,
    scorer: str,
    backbone: str,
    refs: Any,
    rules: str,
    sensitivity: float,
) -> Iterator[tuple]:
    """A new image starts a new inspection; text continues the conversation about the current one."""
    session = session or Session()
    history = list(history or [])
    message = {"text": message, "files": []} if isinstance(message, str) else (message or {})
    text, files = (message.get("text") or "").strip(), _files(message.get("files"))
    for f in files:
        history.append({"role": "user", "content": {"path": f}})
    if text:
        history.append({"role": "user", "content": text})
    if files:
        history.append(
            {"role": "assistant", "content": "Inspecting…", "metadata": {"title": "Working", "status": "pending"}}
        )
        yield (None, history, session, *_panels(session.inspection))
        try:
            ins = service.inspect(
                session,
                files[-1],
                product=product,
                scorer=scorer or None,
                backbone=(backbone or "").strip() or None,
                references=_files(refs),
                rules=rules,
                sensitivity=sensitivity,
            )
        except Exception as exc:  # noqa: BLE001 - every failure is told in the chat
            history[-1] = {"role": "assistant", "content": _error_message(exc)}
            yield (None, history, session, *_panels(session.inspection))
            return
        history[-1] = {
            "role": "assistant",
            "content": working_text(ins.result),
            "metadata": {
                "title": f"Working: {ins.result.scorer}, {len(ins.result.regions)} region(s)",
                "status": "done",
            },
        }
        note = ""
        if service.lvlm_problem:
            note = (
                f"⚠️ The language model `{service.lvlm}` is unreachable ({service.lvlm_problem}); this explanation "
                "comes from the template explainer.\n\n"
            )
        history.append(
            {
                "role": "assistant",
                "content": f"{note}**{ins.product}: {ins.result.verdict}.** " + ins.result.explanation.text,
            }
        )
        yield (None, history, session, *_panels(ins))
        if not text:
            return
    if not text:
        yield (None, history, session, *_panels(session.inspection))
        return
    if session.inspection is not None:  # each answer can show its working
        res = session.inspection.result
        history.append(
            {
                "role": "assistant",
                "content": working_text(res),
                "metadata": {"title": f"Working: {res.scorer}, score {res.pred_score:.3f}", "status": "done"},
            }
        )
    history.append({"role": "assistant", "content": ""})
    try:
        for piece in service.ask(session, text):
            history[-1] = {"role": "assistant", "content": history[-1]["content"] + piece}
            yield (None, history, session, *_panels(session.inspection))
    except Exception as exc:  # noqa: BLE001
        history[-1] = {"role": "assistant", "content": _error_message(exc)}
        yield (None, history, session, *_panels(session.inspection))


def resensitise(service: InspectorService, session: Session | None, sensitivity: float) -> tuple:
    session = session or Session()
    try:
        ins = service.rethreshold(session, sensitivity)
    except Exception as exc:  # noqa: BLE001
        gr.Warning(_error_message(exc))
        ins = session.inspection
    return (session, *_panels(ins))


def check_rules(text: str) -> str:
    if not (text or "").strip():
        return ""
    try:
        from vlad.rules import parse_rules

        report = parse_rules(text)
    except Exception as exc:  # noqa: BLE001
        return _error_message(exc)
    lines = [f"- I understood: {line}" for line in report.understood]
    lines += [f"- ❓ not understood: {line}" for line in report.not_understood]
    lines += [f"- ⚠️ contradiction: {line}" for line in report.contradictions]
    return "\n".join(lines)


def run_batch(
    service: InspectorService,
    files: Any,
    session: Session | None,
    product: str,
    scorer: str,
    backbone: str,
    refs: Any,
    rules: str,
    sensitivity: float,
    progress: Any = None,
) -> tuple:
    session = session or Session()
    paths = _files(files)
    if not paths:
        return session, [], [], None, "Add some images first."
    try:
        rows, csv_path, json_path = service.batch(
            session,
            paths,
            product=product,
            scorer=scorer or None,
            backbone=(backbone or "").strip() or None,
            references=_files(refs),
            rules=rules,
            sensitivity=sensitivity,
            progress=progress,
        )
    except Exception as exc:  # noqa: BLE001
        return session, [], [], None, _error_message(exc)
    table = [
        [
            r["image"],
            r["verdict"],
            r.get("pred_score", ""),
            r.get("normalized_score", ""),
            r.get("regions", ""),
            r.get("rules_fired", ""),
            r.get("error", ""),
        ]
        for r in rows
    ]
    by_name = {Path(p).name: p for p in paths}
    gallery = [(by_name[r["image"]], f"{r['image']}: {r['verdict']}") for r in rows if r["image"] in by_name]
    done = sum(r["verdict"] != "error" for r in rows)
    return session, table, gallery, [str(csv_path), str(json_path)], f"{done} of {len(rows)} images scored."


# ---------------------------------------------------------------------- layout
def build_app(service: InspectorService | None = None, **service_options: Any) -> gr.Blocks:
    """The UI. ``service_options`` (scorer, backbone, lvlm, device) build an :class:`InspectorService` if none is
    given."""
    from vlad.scorers import list_scorers

    service = service or InspectorService(**service_options)
    with gr.Blocks(title="vlad: anomaly inspection", analytics_enabled=False) as demo:
        session = gr.State(None)
        gr.Markdown("## vlad: zero-shot anomaly inspection")
        gr.Markdown(service.status_markdown(), elem_id="status")
        with gr.Tab("Inspect"):
            with gr.Row():
                with gr.Column(scale=3):
                    chatbot = gr.Chatbot(height=560, label="Inspection", elem_id="chat")
                    box = gr.MultimodalTextbox(
                        file_types=["image"],
                        file_count="single",
                        sources=["upload"],
                        placeholder="Drop a photo of a part, or ask about the current one",
                        elem_id="input",
                    )
                with gr.Column(scale=2):
                    verdict = gr.HTML(verdict_html(None))
                    slider = gr.ImageSlider(label="Image | heat map", type="pil")
                    regions = gr.AnnotatedImage(label="Regions")
                    sensitivity = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Sensitivity (higher flags more)")
                    report = gr.File(label="JSON report")
                    with gr.Accordion("Product, references, rules, model", open=True):
                        product = gr.Textbox(
                            label="Product", placeholder="e.g. bottle (empty: vlad guesses)", elem_id="product"
                        )
                        rules = gr.Textbox(
                            label="Rules, in plain words",
                            lines=3,
                            elem_id="rules",
                            placeholder="scratches on the label are fine\na missing screw is a defect",
                        )
                        rules_view = gr.Markdown(elem_id="rules-parsed")
                        refs = gr.File(
                            label="Good reference images (few-shot)", file_count="multiple", file_types=["image"]
                        )
                        scorer = gr.Dropdown(list_scorers(), value=service.scorer, label="Scorer")
                        backbone = gr.Textbox(value=service.backbone or "", label="Backbone (empty: scorer default)")
        with gr.Tab("Batch"):
            with gr.Row():
                batch_files = gr.File(label="Images", file_count="multiple", file_types=["image"])
                batch_folder = gr.File(label="…or a folder", file_count="directory")
            batch_button = gr.Button("Inspect all", variant="primary")
            batch_status = gr.Markdown()
            batch_table = gr.Dataframe(
                headers=["image", "verdict", "score", "normalised", "regions", "rules fired", "error"],
                interactive=False,
            )
            batch_gallery = gr.Gallery(label="Images", columns=6, height=240)
            batch_downloads = gr.File(label="CSV / JSON", file_count="multiple")

        settings = [product, scorer, backbone, refs, rules, sensitivity]
        panels = [verdict, slider, regions, report]

        def _chat(message, history, sess, *rest):  # noqa: ANN001, ANN202
            yield from chat(service, message, history, sess, *rest)

        box.submit(
            _chat,
            [box, chatbot, session, *settings],
            [box, chatbot, session, *panels],
            concurrency_limit=service.concurrency,
            concurrency_id="score",
            api_name="chat",
        )
        sensitivity.release(
            lambda s, v: resensitise(service, s, v), [session, sensitivity], [session, *panels], api_name="sensitivity"
        )
        rules.change(check_rules, rules, rules_view, show_progress="hidden", api_name="rules")

        def _batch(files, folder, sess, *rest, progress=gr.Progress()):  # noqa: ANN001, ANN202, B008
            return run_batch(service, _files(files) + _images_only(folder), sess, *rest, progress=progress)

        batch_button.click(
            _batch,
            [batch_files, batch_folder, session, *settings],
            [session, batch_table, batch_gallery, batch_downloads, batch_status],
            concurrency_limit=1,
            concurrency_id="score",
            api_name="batch",
        )
    demo.queue(default_concurrency_limit=service.concurrency, max_size=32)
    return demo


def launch(
    demo: gr.Blocks,
    *,
    host: str = "127.0.0.1",
    port: int = 7860,
    auth: tuple[str, str] | None = None,
    block: bool = True,
    max_file_size: str = MAX_FILE_SIZE,
) -> Any:
    """Serve the app (127.0.0.1 by default; optional basic auth; upload size limit)."""
    return demo.launch(
        server_name=host,
        server_port=port,
        auth=auth,
        max_file_size=max_file_size,
        share=False,
        prevent_thread_lock=not block,
        show_error=False,
        quiet=not block,
    )


if __name__ == "__main__":
    launch(build_app(backbone="random:tiny"))
