# `make demo` and `make test` work on a fresh machine: the venv is created on first use.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch/torchvision are pinned no tighter than setup.py needs; these versions are the
# ones served offline on our machines.
TORCH_PKGS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test bench gpu-check clean

$(STAMP): setup.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip 2>/dev/null || true
	$(BIN)/pip install -q $(TORCH_PKGS)
	$(BIN)/pip install -q -e ".[data,plots,test,nir]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python recipes/demo.py

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

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
	rm -rf $(VENV) demo-out gpu-results *.egg-info
