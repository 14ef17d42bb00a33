# The two commands of the README. Each sets up what it needs (idempotent: scripts/setup.sh).
PY := .venv/bin/python

.PHONY: setup demo test bench clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) -m paged_attention.lab.cli run smoke

test: setup
	$(PY) -m pytest -n 2 -q -rs

clean:
	rm -rf .venv .pytest_cache build *.egg-info
