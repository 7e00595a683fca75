PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench bench-boot kernels reach mutate clean

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

# Mutation testing of the shadow MMU and the x86 walker with mutmut (slow: not part of
# `make test`).  The mutated files and the fast test selection are in pyproject.toml
# ([tool.mutmut]); docs/mutation.md has the last results.  MUTATE_JOBS workers (the
# machine has 2 cores).  `mutmut results` lists survivors, `mutmut show NAME` one diff.
MUTATE_JOBS ?= 2
MUTATE_STAMP := $(VENV)/.installed-mutate

$(MUTATE_STAMP): pyproject.toml | $(STAMP)
	$(PY) -m pip install -q -e '.[test,mutate]'
	touch $(MUTATE_STAMP)

mutate: $(MUTATE_STAMP)
	rm -rf mutants
	env -u PYTHONPATH $(VENV)/bin/mutmut run --max-children $(MUTATE_JOBS)
	env -u PYTHONPATH $(VENV)/bin/mutmut results

# branch coverage of mmu/ and x86/ reached by a fixed lockstep campaign (minutes, not part of test)
reach: $(STAMP)
	$(PY) -m shadowmmu.verify.reach --steps $(or $(STEPS),2000) --seed $(or $(SEED),7)

bench: $(STAMP)
	$(VENV)/bin/shadowmmu bench walk

# the real x86 guest kernels (gcc, as, ld): kernels/build/{mm,selftest,stores}-{32,pae,pae-pte64,64,la57}.elf
# (make test builds its own copy; this one is for shadowmmu boot, compare --real and bench boot)
kernels:
	$(MAKE) -s -C kernels PTE64=1 LA57=1

bench-boot: $(STAMP) kernels
	$(VENV)/bin/shadowmmu bench boot

clean:
	rm -rf $(VENV) build src/*.egg-info mutants kernels/build
