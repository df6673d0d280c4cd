# One command to set up and run the demo job, one to set up and pass the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.latentcache-installed
INTEROP_STAMP := $(VENV)/.latentcache-interop-installed
# The interop suite's dataset tool, installed without its requirements (see the `interop` extra).
IMG2DATASET := img2dataset==1.47.0
# Pinned to the torch already there: pip's backtracking over boto3/aiobotocore/s3fs otherwise
# re-picks torch and lands on a newer CUDA build, though nothing asks for one.
TORCH_AS_INSTALLED = "torch==$$($(PY) -c "import importlib.metadata as m; print(m.version('torch'))")"

.PHONY: setup setup-browser setup-interop demo demo-vae test test-fast test-chaos test-driver test-cluster test-interop bench bench-pipeline bench-memory bench-driver gpu-wheels clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU wheel first: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]' $(TORCH_AS_INSTALLED)
	touch $(STAMP)

# The interop extra (what img2dataset imports), then img2dataset itself with --no-deps: its own
# caps (pandas<3, webdataset<0.3) would downgrade what latentcache and the default suite run on.
setup-interop: $(INTEROP_STAMP)

$(INTEROP_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[test,interop]' $(TORCH_AS_INSTALLED)
	$(PY) -m pip install -q --no-deps $(IMG2DATASET)
	touch $(INTEROP_STAMP)

# The report test opens report.html in headless Chromium: Debian's package, installed where missing.
setup-browser:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 \
	    || command -v google-chrome >/dev/null 2>&1 || [ -n "$$CHROMIUM" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >/dev/null \
	    || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
	         --no-install-recommends chromium >/dev/null; }; \
	else echo "note: no Chromium and no root apt-get here; the browser test of the audit report will be skipped"; fi

demo: setup
	$(VENV)/bin/latentcache demo

# Retrain the built-in demo VAE (builtin:tiny-demo) on the bundled photos: a few minutes of CPU.
demo-vae: setup
	$(PY) jobs/train_demo_vae.py --out vae/weights/tiny-demo

test: setup setup-browser
	$(PY) -m pytest -q

test-fast: setup setup-browser
	$(PY) -m pytest -q -m "not slow"

# The long fault-injection runs (actor kills, node loss, driver kills, object-store faults); RELIABILITY.md.
test-chaos: setup
	$(PY) -m pytest -q -m chaos

# Whole driver processes: Ctrl-C and SIGTERM mid-job then resume, a SIGKILLed driver, two drivers on
# one folder, a hung shard, a finished rerun without Ray (a few minutes; CI runs it).
test-driver: setup
	$(PY) -m pytest -q -m driver

# Real Ray clusters: a head started with token authentication and jobs submitted to it through
# `latentcache submit`, and multi-node clusters whose pool grows as nodes join (a few minutes).
test-cluster: setup
	$(PY) -m pytest -q -m cluster

# The real tools on both sides: img2dataset downloads a dataset from a loopback HTTP server (broken
# images, 404s, unicode captions), latentcache encodes it from the folder and from moto's S3, and
# pandas, pyarrow, polars, DuckDB and HF datasets read the output (about 2 minutes; CI runs it).
# albumentations (imported by img2dataset) asks the internet for a newer version unless told not to.
test-interop: export NO_ALBUMENTATIONS_UPDATE = 1
test-interop: setup-interop
	$(PY) -m pytest -q -m interop

bench: setup
	$(PY) bench/bench_codec.py

bench-pipeline: setup
	$(PY) bench/bench_pipeline.py

bench-memory: setup
	$(PY) bench/bench_memory.py

bench-driver: setup
	$(PY) bench/bench_driver.py

# The wheels a GPU machine lacks, into .whl/ (see bench/gpu_check.sh, which runs there).
gpu-wheels:
	bash bench/gpu_wheels.sh

clean:
	rm -rf $(VENV) latentcache-demo .pytest_cache
