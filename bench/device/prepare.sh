#!/usr/bin/env bash
# Run on a machine with network access before bench/device/run.sh runs on a GPU machine that may be
# offline and have only torch and the Hugging Face libraries: this puts what that machine lacks into
# two folders git ignores, to copy to it with the checkout:
#   .whl/  Python 3.12 wheels of bench/device/wheels.txt (~46 MB)
#   .gpu/  the embedded model's tokenizer (3.5 MB; its weights are too big to carry, and the
#          benchmarks build a random-weight model of the shape they need on the GPU instead)
# PYTHON: an interpreter with krpo installed (default .venv/bin/python, as `make install` makes).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
PYTHON=${PYTHON:-.venv/bin/python}

for folder in .whl .gpu; do
    grep -qxF "/$folder/" .git/info/exclude 2>/dev/null || echo "/$folder/" >> .git/info/exclude
done

rm -rf .whl && mkdir .whl
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
    platforms+=(--platform "${tag}_x86_64")
done
grep -v '^#' bench/device/wheels.txt | xargs "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp "${platforms[@]}" -d .whl

rm -rf .gpu && mkdir -p .gpu/tokenizer
"$PYTHON" - <<'PY'
import shutil
from pathlib import Path

from krpo_cli.models import resolve_model_path

source = Path(resolve_model_path("smollm2-135m-instruct"))
for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
    shutil.copy(source / name, Path(".gpu/tokenizer") / name)
PY
du -sh .whl .gpu
echo "copy this checkout with .whl/ and .gpu/ to the GPU machine and run there: bash bench/device/run.sh"
