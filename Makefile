# Two entry points that work on a fresh machine with only Python: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch first and pinned: an unpinned "torch" requirement can pull a multi-GB CUDA build.
TORCH_VERSION ?= 2.13.0

.PHONY: demo test venv clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/python scripts/demo.py

test: venv
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV)
