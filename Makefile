# One command sets up and runs the main job (make demo), one runs the tests (make test).
# Both create .venv and install everything on first use; nothing needs installing by hand.
# `make demo DEMO_ARGS=--asr`: the caller speaks (Piper audio through ivr-daemon asr-server).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# The talk page's test (tests/test_talk_browser.py) drives Debian's chromium through its driver:
# installed with apt-get when missing (CI runs as root; elsewhere through sudo).
CHROMEDRIVER := /usr/bin/chromedriver
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install demo test clean

install: $(STAMP)

$(STAMP): requirements.txt setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip setuptools wheel
	$(BIN)/pip install -r requirements.txt
	$(BIN)/pip install --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/ivr-daemon demo $(DEMO_ARGS)

# The records tests run a throwaway PostgreSQL server (initdb + pg_ctl): Debian's postgresql package.
PG_INITDB := /usr/lib/postgresql/15/bin/initdb

test: $(STAMP) $(CHROMEDRIVER) $(PG_INITDB)
	$(BIN)/python -m pytest

$(CHROMEDRIVER):
	$(SUDO) apt-get update
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver
	test -x $@

$(PG_INITDB):
	$(SUDO) apt-get update
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql
	test -x $@

clean:
	rm -rf $(VENV) .cache
