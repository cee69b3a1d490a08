# Two entry points: `make demo` (the main job) and `make test`. Both create .venv and install what they need.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: install demo test family tasks clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m transfertune.demo

test: $(STAMP)
	$(PY) -m pytest tests

family: $(STAMP)
	$(PY) scripts/build_family.py

tasks: $(STAMP)
	$(PY) scripts/make_tasks.py

clean:
	rm -rf outputs .pytest_cache
