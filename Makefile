# The README's two commands: `make demo` (install, then run the workflow on the embedded demo)
# and `make test` (install, then run the whole test suite). Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
CORES ?= 2
# The CPU wheel this project is developed against. With a GPU, use e.g. TORCH='torch>=2.3,<3'
# (pip then picks the CUDA build for your platform).
TORCH ?= torch==2.13.0
BIN := $(abspath $(VENV))/bin

.PHONY: install demo test
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

demo: install
	PATH="$(BIN):$$PATH" snakemake --cores $(CORES)

test: install
	PATH="$(BIN):$$PATH" python -m pytest
