# Each target bootstraps .venv idempotently: a fresh clone needs only `make demo` or `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# torch/torchvision are installed first and explicitly so pip does not resolve a different
# (multi-GB) build through the project's ranges; override TORCH_SPEC for another build.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: venv demo test test-fast bench lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/vistr demo

test: $(STAMP)
	$(BIN)/python -m pytest tests -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest tests/unit -q

# learn.py (15 minutes of training) is run on its own: $(BIN)/python benchmarks/learn.py
bench: $(STAMP)
	$(BIN)/python -m benchmarks.forward
	$(BIN)/python -m benchmarks.evaluate
	$(BIN)/python -m benchmarks.preprocess
	$(BIN)/python -m benchmarks.predict

lint: $(STAMP)
	$(BIN)/ruff check vistr pipelines jobs tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache
