# Everything a fresh machine needs: `make test` and `make demo` create .venv and install into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch; set TORCH_SPEC= to keep whatever torch the venv already has.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install test test-portability lint demo demo-quick bench gpu-wheels gpu-check clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(if $(TORCH_SPEC),$(BIN)/python -m pip install --quiet $(TORCH_SPEC))
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check fusion_train varm_merge tests bench
	$(BIN)/ruff format --check fusion_train varm_merge tests bench

# Two workers (pytest-xdist, a test file per worker at a time), each with one thread: on a 2-core
# machine the suite's Python work (loading, tokenizing, launching) then runs side by side. Files
# go to the workers in collection order, the longest first (tests/conftest.py, LONGEST_FILES):
# xdist's own order, by number of tests, left a worker idle while the other ran a long file.
# PYTEST_WORKERS=0 runs it in this process.
PYTEST_WORKERS ?= 2
test: $(STAMP)
ifeq ($(PYTEST_WORKERS),0)
	$(BIN)/python -m pytest $(PYTEST_ARGS)
else
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)
endif

# The tests that compare floats (those using tests/numeric.py), natively, with one thread, with
# PyTorch's generic kernels and, where the CPU has AVX-512, with AVX2: float results differ across
# CPUs and thread counts, and these tests must hold on all of them. Run it before submitting.
NUMERIC_TESTS = $(shell grep -rl '^from numeric import' tests)
test-portability: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS) $(NUMERIC_TESTS)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS) $(NUMERIC_TESTS)
	ATEN_CPU_CAPABILITY=default $(BIN)/python -m pytest -q $(PYTEST_ARGS) $(NUMERIC_TESTS)
	if grep -q avx512 /proc/cpuinfo; then \
		ATEN_CPU_CAPABILITY=avx2 $(BIN)/python -m pytest -q $(PYTEST_ARGS) $(NUMERIC_TESTS); fi

demo: $(STAMP)
	$(BIN)/fusion-train demo $(DEMO_ARGS)

demo-quick: $(STAMP)
	$(BIN)/fusion-train demo --quick $(DEMO_ARGS)

bench: $(STAMP)
	$(BIN)/python bench/represent.py
	$(BIN)/python bench/align.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/merge.py
	$(BIN)/python bench/sample.py
	OMP_NUM_THREADS=1 $(BIN)/python bench/launch.py

# The GPU check (docs/gpu.md): here, the wheels the GPU machine's image lacks, and the real
# tokenizers, into gpu-wheels/ (it travels with the project); there, `bash bench/gpu_check.sh OUT`.
gpu-wheels: $(STAMP)
	$(BIN)/python -m bench.gpu_wheels gpu-wheels

# GPU_CHECK_ARGS=--dry-run: the same check on the CPU at tiny shapes (the test suite runs it too).
GPU_OUT ?= bench/out/gpu
gpu-check:
	PYTHON="$(wildcard $(abspath $(BIN))/python)" bash bench/gpu_check.sh $(GPU_CHECK_ARGS) $(GPU_OUT)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
