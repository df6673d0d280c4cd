# One command to set up and run the demo job, one to set up and pass the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.latentcache-installed

.PHONY: setup demo test test-fast bench bench-pipeline bench-memory clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU wheel first: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: setup
	$(VENV)/bin/latentcache demo

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

bench: setup
	$(PY) bench/bench_codec.py

bench-pipeline: setup
	$(PY) bench/bench_pipeline.py

bench-memory: setup
	$(PY) bench/bench_memory.py

clean:
	rm -rf $(VENV) latentcache-demo .pytest_cache
