"""The vlad web UI (Gradio 6): a chat about inspection images with the heat map, regions, verdict and rules beside it.

``build_app(...)`` returns a ``gr.Blocks`` and has no side effects; ``vlad serve`` (or ``python -m webui.app``)
launches it on 127.0.0.1:7860. Handlers are plain functions over a :class:`~webui.service.Session`; errors become
chat messages, never stack traces.
"""

from __future__ import annotations

import html
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image

from vlad.errors import VladError
from webui.service import InspectorService, Session, guess_note, public_text

logger = logging.getLogger(__name__)

MAX_FILE_SIZE = "100mb"  # hard limit at the upload route; the service refuses > 20 MB in the chat
IMAGE_TYPES = [".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"]


# ---------------------------------------------------------------------- formatting
def verdict_html(result: Any, note: str = "") -> str:
    """The verdict panel; without a result it says why there is none (``note``), greyed out."""
    if result is None:
        text = html.escape(note or "No image yet")
        return f"<div id='verdict' class='verdict none' style='color:#777;padding:8px'>{text}</div>"
    colour = "#c62828" if result.pred_label else "#2e7d32"
    fired = "".join(f"<li>{html.escape(h.rule)} → {html.escape(h.effect)}</li>" for h in result.rule_hits)
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


NEUTRAL = (128, 128, 128)
"""The background of the slider's canvas where the image is smaller than its heat map."""


def slider_pair(image: Image.Image, overlay: Image.Image) -> tuple[Image.Image, Image.Image]:
    """The image and its heat map at one size, for the slider: when the overlay is larger (a legend, a colour bar),
    the image is placed at the top left of a neutral canvas of the overlay's size, so that pixels line up; a smaller
    overlay (large inputs are drawn at a bounded size) gets the image scaled down to it."""
    image, overlay = image.convert("RGB"), overlay.convert("RGB")
    if overlay.size == image.size:
        return image, overlay
    if overlay.width >= image.width and overlay.height >= image.height:
        canvas = Image.new("RGB", overlay.size, NEUTRAL)
        canvas.paste(image, (0, 0))
        return canvas, overlay
    return image.resize(overlay.size, Image.Resampling.BILINEAR), overlay


def _panels(ins: Any, note: str = "") -> tuple[Any, ...]:
    """Verdict, slider, regions and report of the current image; all empty (the verdict saying ``note``) without."""
    if ins is None:
        return verdict_html(None, note), None, None, None
    return verdict_html(ins.result), slider_pair(ins.image, ins.overlay), annotations(ins), str(ins.report_path)


def _error_message(exc: BaseException, paths: list[str] | tuple[str, ...] = ()) -> str:
    if isinstance(exc, VladError):
        return f"⚠️ {public_text(str(exc), paths)}"
    logger.exception("unexpected error in the web UI")
    text = public_text(str(exc).splitlines()[0][:300], paths) if str(exc) else type(exc).__name__
    return f"⚠️ Something went wrong: {text}"


def _images_only(value: Any) -> list[str]:
    """The image files of a folder upload (other files are left out)."""
    return [p for p in _files(value) if Path(p).suffix.lower() in IMAGE_TYPES]


def _files(value: Any) -> list[str]:
    if not value:
        return []
    items = value if isinstance(value, list) else [value]
    return [getattr(v, "name", None) or (v.get("path") if isinstance(v, dict) else v) for v in items]


# ---------------------------------------------------------------------- handlers
def _add_rules(rules: str, added: list[str]) -> str:
    """The rules text with rules typed in the chat appended, one per line (repeats left out)."""
    lines = [line for line in (rules or "").splitlines() if line.strip()]
    for rule in added:
        if rule.lower() not in {line.strip().lower() for line in lines}:
            lines.append(rule)
    return "\n".join(lines)


def _understood_lines(understood: Any) -> list[str]:
    lines = []
    if understood.product:
        lines.append(f"- I understood: the product is a {understood.product}.")
    lines += [f"- {line}" for line in understood.understood]
    return lines


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
    """A new image starts a new inspection; text continues the conversation about the current one.

    The text is read first (:func:`vlad.explain.intents.understand`): "the product is a tile" sets the product and
    "ignore scratches from now on" adds a rule, both before the image is inspected (or the current image is inspected
    again with them); the Product and Rules boxes show them. What is left of the text is asked as a question.
    Yields ``(textbox, history, session, verdict, slider, regions, report, product box, rules box)``."""
    from vlad.explain.intents import understand

    session = session or Session()
    history = list(history or [])
    message = {"text": message, "files": []} if isinstance(message, str) else (message or {})
    text, files = (message.get("text") or "").strip(), _files(message.get("files"))
    paths = [*files, *_files(refs)]
    understood = understand(text)
    new_product = understood.product or product
    new_rules = _add_rules(rules, understood.rules)
    boxes = (
        understood.product if understood.product else gr.skip(),
        new_rules if new_rules != (rules or "") else gr.skip(),
    )
    options = {
        "scorer": scorer or None,
        "backbone": (backbone or "").strip() or None,
        "references": _files(refs),
    }

    def out(*panels: Any) -> tuple:
        return (None, history, session, *panels, *boxes)

    for f in files:
        history.append({"role": "user", "content": {"path": f, "alt_text": Path(f).name}})
        history.append({"role": "user", "content": f"File: {Path(f).name}"})
    if text:
        history.append({"role": "user", "content": text})
    said = _understood_lines(understood)
    if files:
        name = Path(files[-1]).name
        history.append(
            {"role": "assistant", "content": "Inspecting…", "metadata": {"title": "Working", "status": "pending"}}
        )
        yield out(*_panels(None, f"Inspecting {name}…"))
        try:
            ins = service.inspect(
                session,
                files[-1],
                product=new_product,
                rules=new_rules,
                sensitivity=sensitivity,
                **options,
            )
        except Exception as exc:  # noqa: BLE001 - every failure is told in the chat
            service.clear(session)
            history[-1] = {"role": "assistant", "content": _error_message(exc, paths)}
            yield out(*_panels(None, f"No verdict: {name} could not be inspected."))
            return
        history[-1] = {
            "role": "assistant",
            "content": working_text(ins.result),
            "metadata": {
                "title": f"Working: {ins.result.scorer}, {len(ins.result.regions)} region(s)",
                "status": "done",
            },
        }
        notes = said + ([guess_note(ins.product, ins.product_guess)] if ins.product_guess else [])
        if service.lvlm_problem:
            notes.append(
                f"⚠️ The language model `{service.lvlm}` is unreachable ({service.lvlm_problem}); this explanation "
                "comes from the template explainer."
            )
        history.append(
            {
                "role": "assistant",
                "content": "".join(f"{n}\n\n" for n in notes)
                + f"**{ins.product}: {ins.result.verdict}.** "
                + ins.result.explanation.text,
            }
        )
        yield out(*_panels(ins))
    elif said:
        ins = session.inspection
        if ins is not None:
            before = ins.result.verdict
            what = " and ".join(
                w for w, on in (("the product", understood.product), ("the rules", understood.rules)) if on
            )
            try:
                ins = service.reinspect(
                    session, product=new_product, rules=new_rules, sensitivity=sensitivity, reason=f"{what} changed"
                )
                said.append(f"Inspected {ins.file} again: **{ins.product}: {ins.result.verdict}** (was {before}).")
            except Exception as exc:  # noqa: BLE001
                said.append(_error_message(exc, paths))
        else:
            said.append("That holds for the next photo you drop.")
        history.append({"role": "assistant", "content": "\n".join(said)})
        yield out(*_panels(session.inspection))
    question = understood.question
    if not question:
        if not files and not said:
            yield out(*_panels(session.inspection))
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
        for piece in service.ask(session, question):
            history[-1] = {"role": "assistant", "content": history[-1]["content"] + piece}
            yield out(*_panels(session.inspection))
    except Exception as exc:  # noqa: BLE001
        history[-1] = {"role": "assistant", "content": _error_message(exc, paths)}
        yield out(*_panels(session.inspection))


def resensitise(
    service: InspectorService, session: Session | None, sensitivity: float, history: list | None = None
) -> tuple:
    """The slider moved: re-threshold the current image and say the new threshold in the chat."""
    session = session or Session()
    history = list(history or [])
    before = session.inspection.result.threshold if session.inspection is not None else None
    try:
        ins = service.rethreshold(session, sensitivity)
    except Exception as exc:  # noqa: BLE001
        gr.Warning(_error_message(exc))
        ins = session.inspection
    if ins is not None and before is not None and ins.result.threshold != before:
        res = ins.result
        history.append(
            {
                "role": "assistant",
                "content": f"Sensitivity {sensitivity:.2f}: the threshold is now {res.threshold:.4f} "
                f"({res.threshold_source}, was {before:.4f}); **{ins.product}: {res.verdict}**, "
                f"{len(res.regions)} region(s).",
            }
        )
    return (session, *_panels(ins), history)


def check_rules(text: str) -> str:
    if not (text or "").strip():
        return ""
    try:
        from vlad.rules import parse_rules

        report = parse_rules(text)
    except Exception as exc:  # noqa: BLE001
        return _error_message(exc)
    lines = [f"- {line}" for line in report.understood]  # each says "I understood: ..."
    lines += [f"- ❓ not understood: {line}" for line in report.not_understood]
    lines += [f"- ⚠️ contradiction: {line}" for line in report.contradictions]
    return "\n".join(lines)


BATCH_HEADERS = ["file", "verdict", "score", "normalised", "regions", "where", "rule effects", "error"]


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
    """The Batch tab: a table row per image, the heat maps, the CSV and JSON files, and a summary."""
    session = session or Session()
    paths = _files(files)
    if not paths:
        return session, [], [], None, "Add some images first."
    try:
        run = service.batch(
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
        return session, [], [], None, _error_message(exc, [*paths, *_files(refs)])
    table = [
        [
            r["file"],
            "error" if r["error"] else r["verdict"],
            "" if r["pred_score"] is None else round(r["pred_score"], 4),
            "" if r["normalized_score"] is None else round(r["normalized_score"], 3),
            "" if r["regions"] is None else len(r["regions"]),
            ", ".join(dict.fromkeys(reg["position"] for reg in r["regions"] or [])),
            "; ".join(f"{h['rule']} → {h['effect']}" for h in r["rule_hits"] or []),
            r["error"] or "",
        ]
        for r in run.rows
    ]
    folder = run.csv_path.parent
    gallery = [(str(folder / r["overlay"]), f"{r['file']}: {r['verdict']}") for r in run.rows if r["overlay"]]
    return session, table, gallery, [str(run.csv_path), str(run.json_path)], batch_summary(run)


def batch_summary(run: Any) -> str:
    """The Batch tab's summary: "3 image(s): 1 anomalous, 1 normal, 1 failed.", then what they were inspected as."""
    n = run.counts()
    lines = [
        f"**{len(run.rows)} image(s): {n['anomalous']} anomalous, {n['normal']} normal, {n['failed']} failed.**",
    ]
    product = f"Product: {run.product}"
    if run.product_guess is not None:
        best, p = run.product_guess
        sure = f"{100 * p:.0f} % sure"
        product += f" (guessed, {sure})" if best == run.product else f" (could not tell; closest {best}, {sure})"
    s = run.settings
    lines.append(
        f"{product} · scorer {s.get('scorer')} on {s.get('backbone')} · sensitivity {s.get('sensitivity')} · "
        f"{s.get('references') or 0} reference(s) · rules: {'; '.join(s.get('rules') or []) or 'none'}"
    )
    return "\n\n".join(lines)


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
                with gr.Column(scale=5):
                    chatbot = gr.Chatbot(height=520, label="Inspection", elem_id="chat")
                    box = gr.MultimodalTextbox(
                        file_types=["image"],
                        file_count="single",
                        sources=["upload"],
                        label="Your message: drop a photo of a part, or ask about the current one",
                        show_label=True,
                        placeholder="e.g. a photo, “where is the defect?”, “the product is a tile”, “ignore scratches”",
                        elem_id="input",
                    )
                with gr.Column(scale=4):
                    verdict = gr.HTML(verdict_html(None), elem_id="verdict-panel")
                    slider = gr.ImageSlider(label="Image | heat map", type="pil", elem_id="slider")
                    regions = gr.AnnotatedImage(label="Regions", elem_id="regions")
                    report = gr.File(label="JSON report", elem_id="report")
                with gr.Column(scale=3, min_width=260, elem_id="setup"):
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
                        label="Good reference images (few-shot)",
                        file_count="multiple",
                        file_types=["image"],
                        height=120,
                        elem_id="refs",
                    )
                    sensitivity = gr.Slider(
                        0.0, 1.0, value=0.5, step=0.05, label="Sensitivity (higher flags more)", elem_id="sensitivity"
                    )
                    with gr.Accordion("Model", open=False):
                        scorer = gr.Dropdown(list_scorers(), value=service.scorer, label="Scorer")
                        backbone = gr.Textbox(value=service.backbone or "", label="Backbone (empty: scorer default)")
        with gr.Tab("Batch"):
            gr.Markdown(
                "The Batch tab has its own product, rules, references and sensitivity (below); the scorer and "
                "backbone are the Inspect tab's (its Model panel).",
                elem_id="batch-note",
            )
            with gr.Row():
                with gr.Column(scale=3):
                    with gr.Row():
                        batch_files = gr.File(
                            label="Images", file_count="multiple", file_types=["image"], elem_id="batch-files"
                        )
                        batch_folder = gr.File(label="…or a folder", file_count="directory")
                    batch_button = gr.Button("Inspect all", variant="primary")
                with gr.Column(scale=2):
                    batch_product = gr.Textbox(
                        label="Product (batch)",
                        placeholder="empty: vlad guesses from the first image",
                        elem_id="batch-product",
                    )
                    batch_rules = gr.Textbox(label="Rules (batch)", lines=2, elem_id="batch-rules")
                    batch_rules_view = gr.Markdown(elem_id="batch-rules-parsed")
                    batch_refs = gr.File(
                        label="Good reference images (batch)", file_count="multiple", file_types=["image"], height=120
                    )
                    batch_sensitivity = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Sensitivity (batch)")
            batch_status = gr.Markdown(elem_id="batch-status")
            batch_table = gr.Dataframe(headers=BATCH_HEADERS, interactive=False, elem_id="batch-table")
            batch_gallery = gr.Gallery(label="Heat maps", columns=6, height=260, elem_id="batch-gallery")
            batch_downloads = gr.File(label="CSV / JSON", file_count="multiple")

        settings = [product, scorer, backbone, refs, rules, sensitivity]
        panels = [verdict, slider, regions, report]

        def _chat(message, history, sess, *rest):  # noqa: ANN001, ANN202
            yield from chat(service, message, history, sess, *rest)

        box.submit(
            _chat,
            [box, chatbot, session, *settings],
            [box, chatbot, session, *panels, product, rules],
            concurrency_limit=service.concurrency,
            concurrency_id="score",
            api_name="chat",
        )
        sensitivity.release(
            lambda s, v, h: resensitise(service, s, v, h),
            [session, sensitivity, chatbot],
            [session, *panels, chatbot],
            api_name="sensitivity",
        )
        rules.change(check_rules, rules, rules_view, show_progress="hidden", api_name="rules")
        batch_rules.change(check_rules, batch_rules, batch_rules_view, show_progress="hidden")

        def _batch(files, folder, sess, *rest, progress=gr.Progress()):  # noqa: ANN001, ANN202, B008
            return run_batch(service, _files(files) + _images_only(folder), sess, *rest, progress=progress)

        batch_button.click(
            _batch,
            [
                batch_files,
                batch_folder,
                session,
                batch_product,
                scorer,
                backbone,
                batch_refs,
                batch_rules,
                batch_sensitivity,
            ],
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
