PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[test,bench,cluster]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/shadowmmu demo

test: $(STAMP)
	$(PY) -m pytest -q -n 2 -p no:cacheprovider tests

bench: $(STAMP)
	$(VENV)/bin/shadowmmu bench walk

clean:
	rm -rf $(VENV) build src/*.egg-info
