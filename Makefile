PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench reach clean

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

# branch coverage of mmu/ and x86/ reached by a fixed lockstep campaign (minutes, not part of test)
reach: $(STAMP)
	$(PY) -m shadowmmu.vm.reach --steps $(or $(STEPS),2000) --seed $(or $(SEED),7)

bench: $(STAMP)
	$(VENV)/bin/shadowmmu bench walk

clean:
	rm -rf $(VENV) build src/*.egg-info
