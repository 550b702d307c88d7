# jlremote: developer tasks. `make test` sets up everything on a fresh Debian machine.
SHELL := /bin/sh
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ROOT := $(shell [ "$$(id -u)" = 0 ] && echo yes)
# The test remote's own JupyterLab: for the namespace remote (root) it must be readable by
# an unprivileged user, so it is built from Debian's Python outside any home directory.
REMOTE_VENV ?= $(if $(ROOT),/opt/jlremote-testbed/venv,$(CURDIR)/.venv-remote)
REMOTE_PYTHON ?= $(if $(wildcard /usr/bin/python3),/usr/bin/python3,$(PYTHON))
DEMO_DIR ?= $(CURDIR)/.demo
export JLREMOTE_TEST_REMOTE_VENV := $(REMOTE_VENV)

.PHONY: help system-deps dev testbed-venv lint docs unit test bench recovery demo demo-down clean

help:
	@echo "make test       install what the tests need, lint, run the whole suite"
	@echo "make lint       ruff + mypy --strict on the package, shellcheck on jlremote/sh"
	@echo "make docs       build the documentation site into .site/ (mkdocs --strict)"
	@echo "make unit       only the fast tests (no sshd needed)"
	@echo "make bench      time jlremote against its baselines (prints a table)"
	@echo "make recovery   how fast a URL works again after real faults (about 4 min)"
	@echo "make demo       a throwaway local 'remote' (sshd + JupyterLab) and a real start"
	@echo "make demo-down  stop the demo session and tear the sandbox down"

# Debian packages the end-to-end tests use (installed only when missing, only as root):
# OpenSSH and iproute2 for the namespace remote, Slurm and munge for the --slurm tests,
# Chromium for the page that must ride out an outage (driven over its DevTools protocol).
system-deps:
	@missing=""; optional=""; \
	[ -x /usr/sbin/sshd ] || missing="$$missing openssh-server"; \
	command -v ssh >/dev/null 2>&1 || missing="$$missing openssh-client"; \
	command -v ip >/dev/null 2>&1 || [ -x /usr/sbin/ip ] || [ -x /sbin/ip ] || missing="$$missing iproute2"; \
	command -v ps >/dev/null 2>&1 || missing="$$missing procps"; \
	[ -x /usr/bin/python3 ] || missing="$$missing python3"; \
	/usr/bin/python3 -c 'import ensurepip, venv' 2>/dev/null || missing="$$missing python3-venv"; \
	[ -x /usr/sbin/slurmctld ] && [ -x /usr/sbin/slurmd ] && command -v sbatch >/dev/null 2>&1 \
	  || optional="$$optional slurm-wlm"; \
	[ -x /usr/sbin/munged ] || optional="$$optional munge"; \
	command -v chromium >/dev/null 2>&1 || optional="$$optional chromium"; \
	if [ -n "$$missing$$optional" ] && [ -n "$(ROOT)" ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing:$$missing$$optional"; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing $$optional \
	  || { apt-get update -q && DEBIAN_FRONTEND=noninteractive \
	       apt-get install -y -q --no-install-recommends $$missing $$optional; } || exit 1; \
	elif [ -n "$$missing" ]; then \
	  echo "missing:$$missing (install them, or run as root on Debian)"; exit 1; \
	elif [ -n "$$optional" ]; then \
	  echo "note:$$optional not installed: the tests that need them (and root) will be skipped"; \
	fi

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,docs]'
	touch $@

dev: $(BIN)/.installed

$(REMOTE_VENV)/bin/jupyter-lab:
	$(REMOTE_PYTHON) -m venv $(REMOTE_VENV)
	$(REMOTE_VENV)/bin/pip install -q jupyterlab notebook

testbed-venv: system-deps $(REMOTE_VENV)/bin/jupyter-lab

# The remote scripts are checked as they run: each after lib.sh, as sh (POSIX) and as bash.
lint: dev
	$(BIN)/ruff check jlremote tests
	$(BIN)/ruff format --check jlremote
	$(BIN)/mypy --strict jlremote
	@for f in jlremote/sh/*.sh; do [ "$$f" = jlremote/sh/lib.sh ] && continue; \
	  for s in sh bash; do cat jlremote/sh/lib.sh "$$f" | $(BIN)/shellcheck -s $$s -S warning - \
	    || { echo "shellcheck ($$s): $$f"; exit 1; }; done; done; echo "shellcheck: jlremote/sh ok"

unit: dev
	$(BIN)/python -m pytest -q -m 'not e2e'

# The documentation site: the CLI reference is generated from the typer app, then
# `mkdocs build --strict` (a broken link or a page missing from the nav fails it).
docs: dev
	$(BIN)/typer jlremote.cli utils docs --name jlremote --title "CLI reference" \
	  --output docs/pages/reference.md
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict -f docs/mkdocs.yml
	@echo "docs built in .site/ (open .site/index.html)"

test: system-deps dev testbed-venv lint docs
	$(BIN)/python -m pytest -q

# Bytecode first, as an installed package has it (this machine sets PYTHONDONTWRITEBYTECODE,
# which would make every measured command compile jlremote from source).
bench: system-deps dev testbed-venv
	$(BIN)/python -m compileall -q jlremote
	$(BIN)/python -m tests.harness.bench

recovery: system-deps dev testbed-venv
	$(BIN)/python -m tests.harness.recovery

demo: system-deps dev testbed-venv
	@$(BIN)/python -m tests.harness.testbed up $(DEMO_DIR)
	@JLREMOTE_SSH_CONFIG=$(DEMO_DIR)/ssh_config JLREMOTE_STATE_DIR=$(DEMO_DIR)/state \
	  $(BIN)/jlremote start remote --no-open
	@echo
	@echo "Open the URL above in a browser on this machine. Then:"
	@echo "  export JLREMOTE_SSH_CONFIG=$(DEMO_DIR)/ssh_config JLREMOTE_STATE_DIR=$(DEMO_DIR)/state"
	@echo "  $(BIN)/jlremote status          # what runs"
	@echo "  $(BIN)/jlremote stop remote     # stop it"
	@echo "  make demo-down                  # stop everything and remove the sandbox"

demo-down: dev
	@-JLREMOTE_SSH_CONFIG=$(DEMO_DIR)/ssh_config JLREMOTE_STATE_DIR=$(DEMO_DIR)/state \
	  $(BIN)/jlremote stop --all --forget --grace 3
	@$(BIN)/python -m tests.harness.testbed down $(DEMO_DIR)
	@rm -rf $(DEMO_DIR)
	@echo "demo sandbox removed"

clean:
	rm -rf $(VENV) .venv-remote .pytest_cache .mypy_cache .ruff_cache *.egg-info .site docs/pages/reference.md
