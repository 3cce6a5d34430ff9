# vlad: two commands. `make run` starts the assistant, `make test` runs the whole suite offline.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
# Set before anything imports huggingface_hub: weights come from local files or the cache, never the network.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: run demo test lint venv browser clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

venv: $(VENV)/.installed

# The web UI on http://127.0.0.1:7860. Without weights on disk it runs on random weights (and says so loudly);
# `make run BACKBONE=openclip:ViT-B-16-plus-240@laion400m_e31 LVLM=openai:http://127.0.0.1:8000/v1` for real use.
run: venv
	$(VENV)/bin/vlad serve --backbone "$(or $(BACKBONE),random:tiny)" --lvlm "$(or $(LVLM),template)" \
		--port "$(or $(PORT),7860)"

# The command-line path: inspect the bundled sample images and write overlays.
demo: venv
	$(VENV)/bin/vlad detect $$($(PY) -c "import vlad.resources as r; print(r.samples_dir())") \
		--object "$(or $(OBJECT),part)" --backbone "$(or $(BACKBONE),random:tiny)" --out "$(or $(OUT),vlad-out)"

# The browser tests drive Debian's Chromium (no browser download): install it where it is missing.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing Chromium for the browser tests (apt-get)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q chromium >/dev/null; }

# The linter runs first: a finding or an unformatted file fails the suite.
lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: venv browser lint
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) vlad-out .pytest_cache build dist
