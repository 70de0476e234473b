# `make demo` and `make test` work on a fresh machine: the venv is created on first use.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The torch and torchvision releases served from local disk on our machines, installed
# first so that the package's own "torch>=2.1" (pyproject.toml) finds them and pip
# downloads no other torch. Override on a machine that has other ones.
TORCH_PKGS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-fast lint bench gpu-check clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip 2>/dev/null || true
	$(BIN)/pip install -q $(TORCH_PKGS)
	$(BIN)/pip install -q -e ".[data,plots,test,nir]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python recipes/demo.py

# ruff (its rules in pyproject.toml), then every test: what CI runs (.ci/run)
test: lint
	$(BIN)/python -m pytest -q tests

# ruff, then the tests that are neither slow nor start other processes (< 3 minutes
# on 2 CPU cores); the markers are set in tests/conftest.py
test-fast: lint
	$(BIN)/python -m pytest -q -m "not slow and not subprocess" tests

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python benchmarks/cost.py

# On a CUDA machine whose python3 has torch and triton: CUDA tests, one profiled
# iteration per case, cost.py, kernel microbenchmarks, the VGG-7 point (< 8 min);
# installs nothing and needs no venv (the package is imported from this checkout).
# Python: GPU_PYTHON if given, else .venv's if there is one, else python3. Results
# into $OUT if set, else ./gpu-results/ (benchmarks/gpu_check.sh).
GPU_PYTHON ?=
gpu-check:
	PYTHON=$(GPU_PYTHON) bash benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) demo-out byom-out audit-out gpu-results *.egg-info
