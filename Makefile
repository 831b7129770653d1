# One command to set up and run the tests, one to run the main job; each builds .venv itself.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU machines of this project install torch from a local wheel cache; on a GPU cluster
# override with the build for your CUDA, e.g. make TORCH="torch==2.14.1 torchvision==0.29.1" setup
TORCH  ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?= -q -n 2

.PHONY: setup test bench demo demo-long-range real-scale clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

setup: $(VENV)/.installed

test: $(VENV)/.installed
	WANDB_MODE=disabled HF_HUB_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS)

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_swg.py
	$(PY) benchmarks/bench_frechet.py

# The main job: every guidance method on the shipped digits models, 128 images each at 16 steps, on CPU
# (a quarter of the former default, which took ~25 min on a quiet 2-core machine; --full runs that).
# A rerun prints the finished table (exit 0), refuses other settings in out/demo (exit 2), or resumes.
demo: $(VENV)/.installed
	$(PY) demo/run_demo.py --outdir out/demo

# The long-range experiment (demo/README.md): quadrant consistency of M-SWG, SWG, CFG and autoguidance on
# 32x32 grids of four digits of one class; same rerun / resume rules, out/demo-long-range.
demo-long-range: $(VENV)/.installed
	$(PY) demo/long_range.py --outdir out/demo-long-range

# The whole pipeline at the published sizes (EDM2 XS..XXL, DiT-XL/2, SD VAE, Inception, DINOv2) with
# random weights, offline in a temporary cache: one table of every model, then every CLI once
# (benchmarks/real_scale.py; 12 min on 2 CPU cores).
# Writes about 16 GB into $TMPDIR; REAL_SCALE_ARGS="--keep DIR" keeps the files and each command's log.
REAL_SCALE_ARGS ?=
real-scale: $(VENV)/.installed
	WANDB_MODE=disabled HF_HUB_OFFLINE=1 $(PY) benchmarks/real_scale.py $(REAL_SCALE_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
