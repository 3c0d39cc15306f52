# Two commands do all set-up on a fresh machine: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The unit tests also run under Python 3.12 (CI), in a venv of their own with the same constraints.
# (the first that runs: a pyenv shim for an inactive version is on PATH but fails)
PYTHON312 ?= $(shell for p in $$HOME/.pyenv/versions/3.12*/bin/python3.12 $$(command -v python3.12); do \
	"$$p" -V >/dev/null 2>&1 && { echo "$$p"; break; }; done)
VENV312 := .venv312
STAMP312 := $(VENV312)/.installed

.PHONY: demo test test312 venv info clean

# constraints.txt: the exact tested versions; pyproject.toml only states the supported ranges.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

$(STAMP312): pyproject.toml constraints.txt
	@test -n "$(PYTHON312)" || { echo "python3.12 not found: set PYTHON312=/path/to/python3.12"; exit 1; }
	test -x $(VENV312)/bin/python || $(PYTHON312) -m venv $(VENV312)
	$(VENV312)/bin/python -m pip install --quiet --upgrade pip
	$(VENV312)/bin/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP312)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m modsquad_ds.demo

info: $(STAMP)
	$(PY) -m modsquad_ds.info

test: $(STAMP)
	$(PY) -m pytest -q

test312: $(STAMP312)
	$(VENV312)/bin/python -m pytest -q tests/unit

clean:
	rm -rf $(VENV) $(VENV312) runs .pytest_cache
