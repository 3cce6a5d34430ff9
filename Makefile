# vlad: two commands. `make run` starts the assistant, `make test` runs the whole suite offline.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
# Set before anything imports huggingface_hub: weights come from local files or the cache, never the network.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: run test venv clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

venv: $(VENV)/.installed

run: venv
	$(VENV)/bin/vlad detect $$($(PY) -c "import vlad.resources as r; print(r.samples_dir())") \
		--object "$(or $(OBJECT),part)" --backbone "$(or $(BACKBONE),random:tiny)" --out "$(or $(OUT),vlad-out)"

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) vlad-out .pytest_cache build dist
