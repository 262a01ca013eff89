# The two commands of the README. Both install what is missing first
# (scripts/install.sh is idempotent and cheap when everything is there).

VENV := .venv
BIN := $(VENV)/bin

.PHONY: up test install lint typecheck unit bench soak-ci

install:
	scripts/install.sh

up: install
	$(BIN)/cityops up

test: install lint typecheck
	$(BIN)/pytest -q

lint:
	$(BIN)/ruff check .

typecheck:
	$(BIN)/mypy

unit: install
	$(BIN)/pytest -q -m "not slow"

bench: install
	$(BIN)/python -m bench.ingest
	$(BIN)/python -m bench.history
	$(BIN)/python -m bench.live
	$(BIN)/python -m bench.api
	$(BIN)/python -m bench.console
	$(BIN)/python -m bench.rules
	$(BIN)/python -m bench.rules_latency
	$(BIN)/python -m bench.scaleout
	$(BIN)/python -m bench.soak --minutes 10

# The soak benchmark's short version (bench/soak.py): fails on a lost or duplicated reading.
soak-ci: install
	$(BIN)/python -m bench.soak --minutes 5
