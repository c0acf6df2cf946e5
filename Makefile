# Two commands on a fresh machine: `make demo` (set up + the main job) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is installed on its own, pinned: the CPU build where there is no CUDA (a bare `torch` would pull the CUDA
# wheels). Everything else comes from requirements.lock, exact versions with hashes (`make lock` refreshes it).
TORCH ?= 2.13.0
LOCK := requirements.lock
# The lock covers Linux x86-64 with Python >= 3.10; elsewhere the set-up falls back to pyproject.toml's ranges.
LOCKED_PLATFORM := import sys, platform; sys.exit(not (sys.platform == "linux" and platform.machine() == "x86_64"))

.PHONY: demo test setup lock test-latest mutation bench gpu-check clean

$(BIN)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==$(TORCH)
	@if $(BIN)/python -c '$(LOCKED_PLATFORM)'; then \
		echo "installing the locked versions ($(LOCK))"; \
		$(BIN)/pip install --quiet --no-deps --require-hashes -r $(LOCK) && \
		$(BIN)/pip install --quiet --no-deps --no-build-isolation -e . ; \
	else \
		echo "warning: $(LOCK) covers Linux x86-64 only; installing the newest versions within pyproject.toml's ranges"; \
		$(BIN)/pip install --quiet -e ".[dev]" ; \
	fi
	$(BIN)/pip check
	touch $@

setup: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/flm train --config configs/demo.toml

test: $(BIN)/.installed
	$(BIN)/python -m pytest

# Re-resolve every dependency (transitive ones included) to the newest versions pyproject.toml allows, with uv.
# uv comes from the set-up environment (it is in the lock), or from a small one of its own before there is one.
lock:
	@test -x $(BIN)/uv || test -x $(VENV)-lock/bin/uv || \
		{ $(PYTHON) -m venv $(VENV)-lock && $(VENV)-lock/bin/pip install --quiet uv; }
	echo "torch==$(TORCH)" | $$(test -x $(BIN)/uv && echo $(BIN)/uv || echo $(VENV)-lock/bin/uv) pip compile - \
		pyproject.toml --extra dev --universal --python-version 3.10 --generate-hashes --no-emit-package torch \
		--no-header --upgrade -o $(LOCK)

# The suite against the newest release of every dependency, torch included (pip takes the newest it may: with no
# CPU wheel at hand that is a CUDA build of several GB), in a throwaway environment removed afterwards.
test-latest:
	rm -rf $(VENV)-latest
	$(PYTHON) -m venv $(VENV)-latest
	$(VENV)-latest/bin/pip install --quiet torch==$(TORCH)
	$(VENV)-latest/bin/pip install --quiet --upgrade --upgrade-strategy eager -e ".[dev]"
	$(VENV)-latest/bin/pip list --format freeze | grep -iE '^(torch|transformers|lm.eval|tokenizers|safetensors|numpy|scipy|accelerate|datasets|pytest)=='
	$(VENV)-latest/bin/python -m pytest -p no:cacheprovider; status=$$?; rm -rf $(VENV)-latest; exit $$status

# Mutation testing of the core modules (mutmut; which modules and tests: [tool.mutmut] in pyproject.toml). Scores
# and the survivors: docs/testing.md.
mutation: $(BIN)/.installed
	rm -rf mutants
	$(BIN)/mutmut run --max-children 2
	$(BIN)/mutmut results
	$(BIN)/python tools/mutation_scores.py

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/train_throughput.py

# The one-shot check for a short GPU window (docs/results/gpu.md): CUDA tests, throughput and MFU of a ~1B model
# against HF GPT-2 (and of the llama arch against HF Llama), a growth run; results in OUT (gpu_check.json, gpu_check.md, logs). No set-up: it runs from the
# source tree with the machine's own Python (this one if it has torch, else /opt/torch/.venv/bin/python3, else
# python3) and installs nothing from an index. Without CUDA it runs its tiny mode (seconds). More options in ARGS,
# e.g. ARGS="--throughput-args '--batch 16'".
OUT ?= runs/gpu-check
GPU_PYTHON ?= $(firstword $(wildcard $(BIN)/python) $(PYTHON))
gpu-check:
	$(GPU_PYTHON) benchmarks/gpu_check.py --out $(OUT) $(ARGS)

clean:
	rm -rf runs data
