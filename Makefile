# `make demo` and `make test` do all set-up: a .venv with torch (TORCH=... to override) and pcompile.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(subst =,_,$(subst /,_,$(TORCH)))

.PHONY: install test demo bench fuzz clean

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

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
