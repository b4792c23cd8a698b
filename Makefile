# `make demo` and `make test` do all set-up: a .venv with torch (TORCH=... to override) and pcompile.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(subst =,_,$(subst /,_,$(TORCH)))

.PHONY: install test demo bench fuzz gpu-check clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test,plot,hf]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) -m pcompile demo

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

fuzz: $(STAMP)
	PCOMPILE_FUZZ_EXAMPLES=1000 PCOMPILE_FUZZ_SEED=$$(date +%s) HYPOTHESIS_PROFILE=explore $(PY) -m pytest -q -s tests/fuzz

# On a GPU machine without network: its own python3 (which holds torch with CUDA), pcompile
# installed from this tree with nothing fetched; GPU_CHECK_ALLOW_CPU=1 dry-runs it on a CPU.
gpu-check:
	$(PYTHON) -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null
	$(PYTHON) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
