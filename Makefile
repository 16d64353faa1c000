# Two commands on a fresh machine:  `make demo`  (the main job)  and  `make test`  (the test suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RUNS ?= runs/demo

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

# torch is pinned first so that pip takes the machine's CPU wheel (an unpinned torch pulls CUDA packages)
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: setup
	$(VENV)/bin/mechedit world -o $(RUNS)/world --force
	$(VENV)/bin/mechedit train $(RUNS)/world -o $(RUNS)/model --force
	$(VENV)/bin/mechedit info $(RUNS)/model

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) runs
