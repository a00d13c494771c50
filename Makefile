# The commands of the README. Each sets up what it needs (a virtual environment in
# .venv with jaxsim and its extras), then runs its job.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
OUT ?= results
DOCS ?= build/docs
# Pins for this machine and CI only (the CPU build of torch); users' installs are
# not constrained by it.
CONSTRAINTS := constraints/ci.txt
PIP := $(BIN)/python -m pip --disable-pip-version-check
PDOC := -m pdoc --docformat google --math

.PHONY: demo test docs clean

# The uninstall: a .venv made before the rename to jax-similarity holds the same
# import package under the distribution name `jaxsim`.
$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) uninstall --quiet --yes jaxsim 2>/dev/null || true
	$(PIP) install --quiet -c $(CONSTRAINTS) -e ".[test,notebooks]"
	touch $(STAMP)

demo: $(STAMP)  ## set up, then the quick scaling experiment: a table and plots in $(OUT)/
	$(BIN)/python -m experiments.scaling --quick --out $(OUT)

# The API reference (warnings are errors), the suite (notebooks included) on both cores
# (pytest-xdist; by file, since the report test reads what its module's tests wrote), then
# every docstring example under the suite's strict promotion rules.
# Two pytest runs: the suite's conftest must set the CPU device count before jax starts.
# A worker that dies is not replaced: with --dist loadfile xdist can wait forever for a
# replacement (pytest-xdist #784), and failing at once names the test it died in.
test: $(STAMP) docs  ## set up, then the docs build, the whole test suite and the doctests
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --max-worker-restart 0
	JAX_NUMPY_DTYPE_PROMOTION=strict JAX_NUMPY_RANK_PROMOTION=raise \
	  $(BIN)/python -m pytest -q -p no:cacheprovider --doctest-modules jaxsim

docs: $(STAMP)  ## set up, then the API reference as HTML in $(DOCS)/ (warnings are errors)
	rm -rf $(DOCS)
	$(BIN)/python -W error $(PDOC) -o $(DOCS) jaxsim
	@echo "API reference: $(DOCS)/index.html"

clean:
	rm -rf $(VENV) $(OUT) $(DOCS) dist .pytest_cache
