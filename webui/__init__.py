"""The vlad web UI: ``webui.app.build_app`` (Gradio) over ``webui.service`` (plain Python)."""
