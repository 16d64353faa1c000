# Two commands on a fresh machine:  `make demo`  (the main job)  and  `make test`  (the test suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RUNS ?= runs/quickstart
REPORT ?= reports/quickstart

.PHONY: setup chromium demo test bench clean

setup: $(VENV)/.installed

# torch is pinned first so that pip takes the machine's CPU wheel (an unpinned torch pulls CUDA packages)
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test,ray]"
	touch $@

# the report test renders the HTML report in Debian's headless Chromium
chromium:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || echo "warning: could not install chromium; the report rendering test will be skipped"

# the main job: world + training (cached), tracing, the edit/unlearn grid, the report
demo: setup
	$(VENV)/bin/mechedit run analyses/quickstart.toml -o $(RUNS)
	$(VENV)/bin/mechedit report $(RUNS) -o $(REPORT) --force
	@echo "open $(REPORT)/index.html"

# prints the 15 slowest tests, so a test that grows slow is seen
test: setup chromium
	$(PY) -m pytest -q --durations=15

# benchmarks print figures (ratios within one process); they need a trained default model in runs/model
BENCH_MODEL ?= runs/model
bench: setup
	test -f $(BENCH_MODEL)/mechedit.json || $(VENV)/bin/mechedit train -o $(BENCH_MODEL) --force
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/trace_speed.py $(BENCH_MODEL)
	$(PY) benchmarks/edit_speed.py $(BENCH_MODEL)
	$(PY) benchmarks/edit_quality.py $(BENCH_MODEL)
	$(PY) benchmarks/unlearn_table.py $(BENCH_MODEL)

clean:
	rm -rf $(VENV) runs
