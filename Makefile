# The two commands of the README. Each sets up everything it needs (a virtual
# environment in .venv with jaxsim and its extras), then runs its job.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
OUT ?= results

.PHONY: demo test clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[test,notebooks]"
	touch $(STAMP)

demo: $(STAMP)  ## set up, then the quick scaling experiment: a table and plots in $(OUT)/
	$(BIN)/python -m experiments.scaling --quick --out $(OUT)

test: $(STAMP)  ## set up, then the whole test suite (notebooks included)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache
