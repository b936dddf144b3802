# bpfree-bench. Every target sets itself up on first use (`make setup` is idempotent).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BUDGET ?= smoke
FMNIST_DIR := /usr/share/datasets/fashion-mnist
FORTUNES_DIR := /usr/share/games/fortunes
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: help setup data test test-slow perf regress baseline readme gpu-check
.DEFAULT_GOAL := help

help: ## list the targets
	@grep -E '^[a-zA-Z%_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-22s\033[0m %s\n", $$1, $$2}'
	@echo "  BUDGET=smoke|short|full   budget for reproduce-table-<id> (default: smoke)"
	@echo "  TABLE_COLUMNS='a b'        only these columns of the table (e.g. TABLE_COLUMNS=mnist for sfa-1 BUDGET=short)"

setup: $(STAMP) data ## create .venv, install the package (+dev), install Fashion-MNIST where apt exists

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "bpfree-bench needs Python >= 3.11"'
	@# torch 2.14.1 pulls its CUDA wheels even on CPU machines: the venv is ~6 GB, plus pip's unpacking room. pip's own
	@# "No space left on device" comes minutes in and names no size, so say it up front.
	@free_kb=$$(df -Pk . | awk 'NR==2 {print $$4}'); \
	if [ "$$free_kb" -lt 7000000 ]; then \
	  echo "warning: setup needs about 7 GB free here for .venv (torch + its CUDA wheels); only $$((free_kb / 1048576)) GB is free" >&2; \
	fi
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

data: ## install the embedded datasets (Debian packages dataset-fashion-mnist, and fortunes: the English text corpus)
	@if [ -d $(FORTUNES_DIR) ]; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
	  ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq fortunes >/dev/null) \
	  || echo "warning: could not install fortunes; the embedded text corpus (data.name=fortunes) will be unavailable"; \
	fi
	@if [ -d $(FMNIST_DIR) ]; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist >/dev/null \
	  || echo "warning: could not install dataset-fashion-mnist; FMNIST will be downloaded by torchvision into data.root"; \
	else \
	  echo "note: no apt-get here; Fashion-MNIST will be downloaded by torchvision into data.root (default ./data)," ; \
	  echo "      or point data.root at a folder holding the four IDX files"; \
	fi

test: setup ## run the fast test suite (the README's test command)
	$(PY) -m pytest -q

test-slow: setup ## run the slow tests too
	$(PY) -m pytest -q -m "slow or not slow"

reproduce-table-%: setup ## run the missing cells of table <id> at $(BUDGET), PARALLEL at a time (default 2), only TABLE_COLUMNS if given, render results/<id>[.<budget>].md
	$(PY) -m bench sweep $* --local --budget $(BUDGET) --parallel $(or $(PARALLEL),2) $(if $(TABLE_COLUMNS),--columns $(TABLE_COLUMNS))

gpu-check: setup ## on a CUDA machine: every rule family on the GPU (fp32, bf16-mixed), perf ratios, DFA memory → results/perf/gpu.csv
	$(PY) -m bench.run.gpu_check --out results/perf/gpu.csv

perf: setup ## speed ratios against backprop, written to results/perf/cpu.csv
	$(PY) -m bench perf --out results/perf/cpu.csv

regress: setup ## rerun the CI accuracy baselines (results/baselines/cpu.json)
	$(PY) -m bench regress --baseline results/baselines/cpu.json

baseline: setup ## re-measure and rewrite the CI accuracy baselines
	$(PY) -m bench regress --write --baseline results/baselines/cpu.json

readme: setup ## regenerate the README's measured-results block from results/<id>.md and .csv
	$(PY) -m bench.results.readme
