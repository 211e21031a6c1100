# One command sets up and runs the main job (make demo), one runs the tests (make test).
# Both create .venv and install what they use on first use; nothing needs installing by hand.
#
# requirements.txt pins every distribution setup.cfg declares and is used as a constraints file
# (-c): each target installs only the extras it needs, at the pinned versions.
#   make demo     core + [piper,llm-server]     (Piper speaks, llama.cpp serves SmolLM2; no torch)
#   make test     core + [test]                 (everything: Coqui/torch, Piper, llama.cpp, ASR, pytest)

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_STAMP := $(VENV)/.installed-demo
TEST_STAMP := $(VENV)/.installed-test
PINS := requirements.txt setup.cfg pyproject.toml

.PHONY: install install-demo demo test clean

install: $(TEST_STAMP)
install-demo: $(DEMO_STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip setuptools wheel

$(DEMO_STAMP): $(PINS) | $(BIN)/python
	$(BIN)/pip install -c requirements.txt -e '.[piper,llm-server]'
	touch $(DEMO_STAMP)

# [test] brings [piper,llm-server] too, so a test install also serves the demo.
$(TEST_STAMP): $(PINS) | $(BIN)/python
	$(BIN)/pip install -c requirements.txt -e '.[test]'
	touch $(TEST_STAMP) $(DEMO_STAMP)

demo: $(DEMO_STAMP)
	$(BIN)/ivr-daemon demo

test: $(TEST_STAMP)
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) .cache
