# Two entry points that work on a fresh machine with only Python: `make serve` (the main job) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch first and pinned: an unpinned "torch" requirement can pull a multi-GB CUDA build.
TORCH_VERSION ?= 2.13.0

# One rank per local GPU; two CPU worker processes where there is none.
NPROC ?= $(shell n=$$(nvidia-smi -L 2>/dev/null | grep -c '^GPU'); if [ "$${n:-0}" -gt 0 ]; then echo $$n; else echo 2; fi)
PORT ?= 8000

.PHONY: serve demo test venv clean

# No pip cache: building the venv writes nothing to the home directory.
$(BIN)/.installed: export PIP_NO_CACHE_DIR = 1
$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

venv: $(BIN)/.installed

serve: venv
	$(BIN)/torchrun --nproc-per-node $(NPROC) scripts/serve_moe.py --port $(PORT)

demo: venv
	$(BIN)/python scripts/demo.py

test: venv
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q --durations=10 tests

clean:
	rm -rf $(VENV)
