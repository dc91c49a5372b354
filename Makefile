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
# buf lint on protos/ (buf.yaml), buf installed from npm into .tools/.
BUF_VERSION := 1.75.0
BUF := .tools/node_modules/.bin/buf
lint: setup $(BUF)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(BUF) lint

# npm from the distribution only where none is installed (a machine may have its own Node.js).
$(BUF):
	command -v npm >/dev/null || { $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends npm; }
	npm install --no-audit --no-fund --prefix .tools @bufbuild/buf@$(BUF_VERSION)

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

# The benchmark suite of issue 13 (bench/README.md): its last line is one JSON object.
bench: setup
	$(PY) bench/run.py

clean:
	rm -rf var/demo
