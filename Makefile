# Two entry points: `make demo` (install, then the main job offline on the embedded model) and `make test`.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# llama.cpp (the embedded model's server) is built from source. Portable by default: GGML_NATIVE=OFF keeps
# AVX2/FMA/F16C and leaves out AVX-512 and AMX, whose kernels crash on SmolLM2 on Sapphire Rapids CPUs
# (segfault in ggml_backend_amx_mul_mat). For a build tuned to this CPU: make LLAMA_CMAKE_ARGS=-DGGML_NATIVE=ON
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF
LLAMA_VERSION := $(shell sed -n 's/^llama_cpp_python==//p' requirements.lock)
# The wheel is built into a folder named by version and build flags, never taken from pip's cache (which may
# hold a native build made on another CPU).
LLAMA_WHEELS ?= $(HOME)/.cache/codeclm/wheels/llama-cpp-python-$(LLAMA_VERSION)-$(shell printf '%s' '$(LLAMA_CMAKE_ARGS)' | sha256sum | cut -c1-12)

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	ls $(LLAMA_WHEELS)/*.whl >/dev/null 2>&1 || CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip wheel --quiet \
		--no-cache-dir --no-deps --no-binary llama-cpp-python -w $(LLAMA_WHEELS) llama_cpp_python==$(LLAMA_VERSION)
	$(BIN)/pip install --quiet --no-deps --force-reinstall $(LLAMA_WHEELS)/*.whl
	$(BIN)/pip install --quiet -c requirements.lock -e '.[local,dev,dask,train]'
	touch $@

# The suites mostly wait (Prefect start-ups, fake-LLM latencies, timeouts), so they run on pytest-xdist workers,
# more workers than cores; each worker has its own Prefect and CodecLM homes and harness (tests/conftest.py).
# TEST_WORKERS=0 runs them in one process; the slow suite runs in one process until a parallelism hazard is found
# (README, "Two commands").
TEST_WORKERS ?= 4
SLOW_TEST_WORKERS ?= 0
XDIST = --dist loadgroup -n

.PHONY: install demo test test-slow lint lock bench
install: $(STAMP)

demo: $(STAMP)
	$(BIN)/codeclm run data/seeds.parquet --out runs/demo --config data/demo.toml --limit 4

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest -q $(XDIST) $(TEST_WORKERS)

test-slow: $(STAMP)
	bash tests/ui_setup.sh
	$(BIN)/pytest -q $(XDIST) $(SLOW_TEST_WORKERS) -m "embedded or server or browser or train or slow"

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python bench/throughput.py

lock: $(STAMP)
	$(BIN)/pip freeze --exclude-editable | grep -v '^-e ' > requirements.lock
