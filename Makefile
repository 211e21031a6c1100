# One command sets up and runs the main job (make demo), one runs the tests (make test).
# Both create .venv and install everything on first use; nothing needs installing by hand.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test clean

install: $(STAMP)

$(STAMP): requirements.txt setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip setuptools wheel
	$(BIN)/pip install -r requirements.txt
	$(BIN)/pip install --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/ivr-daemon demo

# The records tests run a throwaway PostgreSQL server (initdb + pg_ctl): Debian's postgresql package.
PG_INITDB := /usr/lib/postgresql/15/bin/initdb
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)

test: $(STAMP) $(PG_INITDB)
	$(BIN)/python -m pytest

$(PG_INITDB):
	$(SUDO) apt-get update
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql

clean:
	rm -rf $(VENV) .cache
