# The two commands a newcomer runs: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export PYTHONHASHSEED ?= 0

.PHONY: setup demo test bench assets clean

setup: $(STAMP)

# Reinstall when the package metadata changes (the stamp is older than pyproject.toml).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m dit_moe demo

# Two pytest workers (pytest-xdist): one per core of a laptop or a CI runner. --dist loadgroup keeps the tests of one
# xdist_group on one worker (tests/conftest.py: the multi-process tests, and modules sharing an expensive fixture).
# TEST_WORKERS=auto uses every core; TEST_WORKERS=0 runs in this process.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

# The pictures the README shows, regenerated from the demo run (runs/default).
assets: demo
	mkdir -p assets
	cp runs/default/samples.png assets/samples.png
	cp runs/default/analysis/active_per_layer.png assets/active_per_layer.png
	cp runs/default/analysis/active_spatial.png assets/active_spatial.png
	cp runs/default/analysis/train_active_experts.png assets/train_active_experts.png

bench: $(STAMP)
	$(PY) benchmarks/moe_dispatch.py
	OMP_NUM_THREADS=1 $(PY) benchmarks/cpu_step.py
	$(PY) benchmarks/memory.py

clean:
	rm -rf $(VENV) runs .pytest_cache
