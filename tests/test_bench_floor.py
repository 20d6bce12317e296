"""bench/generation.py's floor of a whole generation, on hand-computed numbers."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def run_floor_seconds():
    spec = importlib.util.spec_from_file_location("bench_generation", BENCH / "generation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.run_floor_seconds


def test_compute_bound_floor_counts_the_prompts_and_one_decode_step_fewer(run_floor_seconds):
    # 100 parameters, 20 of them the output head; 1,000 FLOP/s; reading the weights takes 0.001 s.
    # Prompts: 2·80·30 + 2·20·4 = 4,960 FLOPs → 4.96 s. A decode step: 2·100·4 = 800 FLOPs → 0.8 s; 2 of them.
    seconds = run_floor_seconds(batch=4, prompt_tokens=30, new_tokens=3, params=100, head_params=20,
                                weight_bytes=1, flops=1000.0, bandwidth=1000.0)
    assert seconds == pytest.approx(4.96 + 2 * 0.8)


def test_memory_bound_floor_reads_the_weights_once_per_pass(run_floor_seconds):
    # The same model with 10,000 bytes of weights at 1,000 bytes/s: every pass takes 10 s, the prompts' too.
    seconds = run_floor_seconds(batch=4, prompt_tokens=30, new_tokens=3, params=100, head_params=20,
                                weight_bytes=10_000, flops=1000.0, bandwidth=1000.0)
    assert seconds == pytest.approx(3 * 10.0)
