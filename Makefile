# Two commands do all set-up on a fresh machine:
#   make demo   -> creates .venv, installs, runs the whole job on the tiny embedded Krea 2
#   make test   -> creates .venv, installs, runs the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo demo-slider demo-edit test install bench clean micro measure-micro

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU machines: torch 2.13.0 comes from the local wheel. GPU machines: the CUDA build from PyPI.
	if command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install -q "torch>=2.6"; \
	else $(BIN)/pip install -q torch==2.13.0; fi
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/krea2-train configs/demo.yaml

demo-slider: $(STAMP)  # a concept slider on the micro model (background darker at -1, lighter at +1)
	$(BIN)/krea2-train configs/demo_slider.yaml

demo-edit: $(STAMP)  # an edit LoRA on the micro model ("make the shape red", reference images), then its edit rate
	$(BIN)/krea2-train configs/edit_demo.yaml
	$(BIN)/python scripts/measure_edit.py runs/edit_demo --sheet runs/edit_demo/edit_sheet.png

test: $(STAMP)
	$(BIN)/ruff check krea2_train scripts tests   # unused imports, dead names, import order
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/python scripts/bench_step.py
	$(BIN)/python scripts/bench_data.py

# Rebuild the shipped micro Krea 2 (about 90 minutes at 1 thread on a 2-core CPU; resumable) and print its figures.
micro: $(STAMP)
	$(BIN)/python scripts/pretrain_micro.py

measure-micro: $(STAMP)
	$(BIN)/python scripts/measure_micro.py

clean:
	rm -rf runs .cache tiny
