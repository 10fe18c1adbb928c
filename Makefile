# One command to serve, one to test. Both create the virtual environment they need.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: serve test test-fast bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# The embedded default (classical segmenter) needs no PyTorch: serving installs the core only.
$(VENV)/.core: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

# Tests build tiny Segment Anything and YOLO models: the `sam` and `yolo` extras (PyTorch from PyPI).
$(VENV)/.test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[sam,yolo,test]'
	touch $(VENV)/.core $@

serve: $(VENV)/.core
	$(BIN)/labelassist serve

# Everything, slow end-to-end tests included: this is what CI runs.
test: $(VENV)/.test
	$(BIN)/python -m pytest

# The quick loop while developing.
test-fast: $(VENV)/.test
	$(BIN)/python -m pytest -m "not slow"

bench: $(VENV)/.test
	$(BIN)/python bench/click_latency.py

clean:
	rm -rf $(VENV) .pytest_cache
