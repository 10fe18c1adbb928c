# One command to serve, one to test. Both create the virtual environment they need.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Label Studio lives in its own environment: its pins clash with ours.
LS_VENV ?= .venv-ls
LS_VERSION ?= >=1.23,<1.24

.PHONY: serve test test-fast bench bench-train bench-load demo system-deps clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# The embedded default (classical segmenter) needs no PyTorch: serving installs the core only.
$(VENV)/.core: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

# Tests build tiny Segment Anything and YOLO models: the `sam` and `yolo` extras (PyTorch from PyPI),
# and drive a browser with Playwright (its Python package only: the browser is Debian's chromium).
$(VENV)/.test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[sam,yolo,test,cvat]'
	touch $(VENV)/.core $@

$(LS_VENV)/.installed:
	$(PYTHON) -m venv $(LS_VENV)
	$(LS_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LS_VENV)/bin/pip install --quiet 'label-studio$(LS_VERSION)'
	touch $@

# System packages the tests start for real: Debian's chromium (the browser test) and redis-server
# (RQ jobs). Root installs them when missing; CI runs as root.
system-deps:
	@missing=""; command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	if [ -n "$$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; fi

serve: $(VENV)/.core
	$(BIN)/labelassist serve

# Label Studio and the backend on loopback with a generated demo project; Ctrl-C stops both.
demo: $(VENV)/.core $(LS_VENV)/.installed
	$(BIN)/labelassist demo

# Everything, slow end-to-end tests in a real Label Studio and Chromium included: this is what CI runs.
test: $(VENV)/.test $(LS_VENV)/.installed system-deps
	$(BIN)/python -m pytest

# The quick loop while developing.
test-fast: $(VENV)/.test
	$(BIN)/python -m pytest -m "not slow"

bench: $(VENV)/.test
	$(BIN)/python bench/click_latency.py

# N concurrent annotators clicking against one server: p50/p95 and throughput versus N.
bench-load: $(VENV)/.test
	$(BIN)/python bench/load.py

# Train button -> new version serving, and held-out mAP50 before/after (a few minutes on CPU).
bench-train: $(VENV)/.test
	$(BIN)/python bench/train.py

clean:
	rm -rf $(VENV) $(LS_VENV) .pytest_cache test-artifacts
