# cardline — the two commands of the quick start are `make demo` and `make test`;
# each installs what it needs first (Debian/Ubuntu packages, a virtual environment).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
APT_PACKAGES := gcc python3-dev python3-venv pkg-config pcscd libpcsclite-dev vsmartcard-vpcd \
                pcsc-tools opensc softhsm2 sqlite3 openssl strace
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test lint setup system-packages protos bench clean

demo: setup
	$(PY) scripts/demo.py

test: setup lint
	$(PY) -m pytest -q

# ruff and mypy, configured in pyproject.toml (mypy strict on orchestrator/domain and shared);
# buf lint on protos/ (buf.yaml) when buf is installed (`npm install -g @bufbuild/buf`).
BUF ?= $(shell command -v buf 2>/dev/null)
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	@if [ -n "$(BUF)" ]; then echo "$(BUF) lint"; $(BUF) lint; \
	else echo "buf not installed: protos/ not linted (npm install -g @bufbuild/buf)"; fi

setup: system-packages $(VENV)/.installed

# Installs only what is missing, so a prepared machine pays nothing.
system-packages:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

$(VENV)/.installed: pyproject.toml
	[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

protos: setup
	$(PY) scripts/gen_protos.py

bench: setup
	$(PY) bench/overhead.py

clean:
	rm -rf var/demo
