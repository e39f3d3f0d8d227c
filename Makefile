# Two commands on a fresh machine: `make run` (the main job) and `make test`.
# Both create .venv and install the project into it; reruns skip the install.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
OUT ?= runs/main
SEED ?= 0

.PHONY: run test setup browser clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[test]"
	-git config core.hooksPath .githooks 2>/dev/null
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/nanoseek speedrun --out $(OUT) --seed $(SEED)

# The chat page's browser test drives Debian's Chromium; installed here when missing and we
# may (root with apt-get), else that test skips and says why.
browser:
	@if ! command -v chromium >/dev/null && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium \
			|| echo "make: Chromium could not be installed; the browser test will skip"; fi

test: $(STAMP) browser
	$(PY) -m pytest

clean:
	rm -rf $(VENV) runs
