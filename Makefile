# One command sets up and runs the main job (make demo), one runs the tests (make test).
# Both create .venv and install what they use on first use; nothing needs installing by hand.
#
# requirements.txt pins every distribution setup.cfg declares and is used as a constraints file
# (-c): each target installs only the extras it needs, at the pinned versions.
#   make demo     core + [piper,llm-server,asr] (Piper speaks, llama.cpp serves SmolLM2, pocketsphinx for --asr; no torch)
#   make test     core + [test]                 (everything: Coqui/torch, Piper, llama.cpp, ASR, pytest)
# `make demo DEMO_ARGS=--asr`: the caller speaks (Piper audio through ivr-daemon asr-server).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_STAMP := $(VENV)/.installed-demo
TEST_STAMP := $(VENV)/.installed-test
PINS := requirements.txt setup.cfg pyproject.toml

# The talk page's test (tests/test_talk_browser.py) drives Debian's chromium through its driver:
# installed with apt-get when missing (CI runs as root; elsewhere through sudo).
CHROMEDRIVER := /usr/bin/chromedriver
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install install-demo demo test clean

install: $(TEST_STAMP)
install-demo: $(DEMO_STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip setuptools wheel

$(DEMO_STAMP): $(PINS) | $(BIN)/python
	$(BIN)/pip install -c requirements.txt -e '.[piper,llm-server,asr]'
	touch $(DEMO_STAMP)

# [test] brings [piper,llm-server,asr] too, so a test install also serves the demo.
$(TEST_STAMP): $(PINS) | $(BIN)/python
	$(BIN)/pip install -c requirements.txt -e '.[test]'
	touch $(TEST_STAMP) $(DEMO_STAMP)

demo: $(DEMO_STAMP)
	$(BIN)/ivr-daemon demo $(DEMO_ARGS)

# The records tests run a throwaway PostgreSQL server (initdb + pg_ctl): Debian's postgresql package.
PG_INITDB := /usr/lib/postgresql/15/bin/initdb

test: $(TEST_STAMP) $(CHROMEDRIVER) $(PG_INITDB)
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
