# Two commands on a fresh machine: `make run` (the main job) and `make test`.
# Both create .venv and install the project into it; reruns skip the install.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
OUT ?= runs/main

.PHONY: run test setup clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[test]"
	-git config core.hooksPath .githooks 2>/dev/null
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/nanoseek speedrun --out $(OUT)

test: $(STAMP)
	$(PY) -m pytest

clean:
	rm -rf $(VENV) runs
