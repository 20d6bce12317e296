#!/usr/bin/env bash
# The GPU checks of krpo in one run on your own CUDA machine: the CUDA tests, the generation
# sweep (bf16 and NF4) and the train_step comparison with TRL, on a random-weight
# Qwen2.5-0.5B-shaped model. At most 8 minutes in all on an H200 (the stages' limits; likely less).
# The GPU machine may be offline: first, on a machine with network access and krpo installed,
#     bash bench/device/prepare.sh
# then, in a copy of this checkout on the GPU machine (with the .whl/ and .gpu/ folders it made),
#     bash bench/device/run.sh          # or name some stages: bash bench/device/run.sh tests train
# The GPU machine needs Python 3.12 with torch (CUDA), transformers, peft and accelerate.
# Each stage has its own time limit, and a failed stage does not stop the next. Logs and JSON
# go to $OUT (default /tmp/krpo-device), and each log's tail is printed; train_step
# writes its JSON after every worker, so a stage cut short still leaves what it measured.
set -uo pipefail
OUT=${OUT:-/tmp/krpo-device}
STAGES=${*:-tests generation train}
MODEL=/tmp/qwen0.5b-random
mkdir -p "$OUT"

[ -d .whl ] && [ -d .gpu/tokenizer ] || { echo "no .whl/ or .gpu/: run bench/device/prepare.sh first and copy both here"; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HOME=/tmp/hf \
    TOKENIZERS_PARALLELISM=false KRPO_CACHE=/tmp/krpo-cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 - <<'PY'
import importlib
for name in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "trl", "datasets", "pydantic"):
    try:
        print(f"{name} {importlib.import_module(name).__version__}", end="; ")
    except Exception as err:  # report every missing piece at once
        print(f"{name} FAILED ({err})", end="; ")
print()
PY

stage() {  # stage NAME SECONDS COMMAND...: run under a time limit, log to $OUT/NAME.log, print its tail
    local name=$1 limit=$2 start=$SECONDS status
    shift 2
    echo "== $name (limit ${limit} s): $*"
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    status=$?
    tail -n 30 "$OUT/$name.log"
    echo "== $name: exit $status after $((SECONDS - start)) s"
}

if [[ " $STAGES " == *" generation "* || " $STAGES " == *" train "* ]]; then
    python3 bench/device/random_model.py --tokenizer .gpu/tokenizer --out $MODEL || exit 1
fi
for name in $STAGES; do
    case $name in
        tests) stage cuda-tests 90 python3 -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py ;;
        generation)
            stage generation-bf16 60 python3 bench/generation.py --model $MODEL --json "$OUT/generation_bf16.json"
            stage generation-nf4 60 python3 bench/generation.py --model $MODEL --quantization nf4 \
                --json "$OUT/generation_nf4.json" ;;
        train) stage train-step 240 python3 bench/train_step.py --model $MODEL --rounds 1 --steps 3 \
                   --json "$OUT/train_step.json" ;;
        *) echo "unknown stage '$name' (tests, generation, train)" ;;
    esac
done
