"""Checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint is `RUN/checkpoints/step_NNNNNN/` with the adapter (PEFT files), the optimizer
and scheduler state, every RNG state (Python, NumPy, torch, CUDA), the prompt sampler's order
and position, and the step. It is written into a temporary directory that is renamed into
place, so a process killed mid-write leaves the previous checkpoint intact; only the last
`output.keep_checkpoints` are kept. States are loaded with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from krpo_cli.models import save_adapter
from krpo_cli.run_dir import ADAPTER, CHECKPOINTS, CheckpointError, list_checkpoints


TRAINER_STATE = "trainer_state.pt"


def _fsync_tree(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            with file.open("rb") as f:
                os.fsync(f.fileno())


def rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss, "gauss": gauss},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_summary(path: Path) -> dict:
    """A checkpoint's step.json: "step" (steps done) and "data_digest" (of the training rows), read
    before any weights so that a resume that cannot work is refused before the model loads."""
    try:
        summary = json.loads((path / "step.json").read_text(encoding="utf-8"))
        return {"step": int(summary["step"]), "data_digest": summary.get("data_digest")}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise CheckpointError(f"checkpoint '{path}' has no readable step.json; resume from another one with --resume-from PATH") from None


def save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, trainer_state: dict, keep: int) -> Path:
    root = run_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    staging = root / f".tmp-step_{step:06d}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir()
        save_adapter(model, staging / ADAPTER)
        torch.save(
            {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state(), **trainer_state},
            staging / TRAINER_STATE,
        )
        summary = {"step": step, "data_digest": trainer_state.get("data_digest")}
        (staging / "step.json").write_text(json.dumps(summary) + "\n", encoding="utf-8")
        _fsync_tree(staging)
    except BaseException:  # a full disk, a read-only folder, an interrupt: no half checkpoint stays behind
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    staging.rename(final)  # atomic: the checkpoint either exists whole or not at all
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_checkpoint_file(file: Path, read):
    """`read(file)`, or a CheckpointError naming the file: missing, or damaged (e.g. cut short)."""
    older = "resume from an older checkpoint with --resume-from PATH"
    if not file.is_file():
        raise CheckpointError(f"checkpoint file '{file}' is missing; {older}")
    try:
        return read(file)
    except Exception as err:  # safetensors' and torch's errors for a truncated or foreign file have no common base
        detail = " ".join(str(err).split())[:120]
        raise CheckpointError(f"checkpoint file '{file}' cannot be read, it is damaged ({type(err).__name__}: {detail}); {older}") from None


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    """Restore adapter, optimizer and scheduler in place; returns the trainer state (RNG not yet set)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights_file = path / ADAPTER / "adapter_model.safetensors"
    weights = read_checkpoint_file(weights_file, lambda f: load_file(str(f)))
    state = read_checkpoint_file(path / TRAINER_STATE, lambda f: torch.load(f, weights_only=True))
    if not isinstance(state, dict) or not {"optimizer", "scheduler", "step"} <= state.keys():
        raise CheckpointError(f"checkpoint file '{path / TRAINER_STATE}' lacks the optimizer, scheduler or step; "
                              "resume from an older checkpoint with --resume-from PATH")
    try:
        result = set_peft_model_state_dict(model, weights)
    except RuntimeError as err:  # e.g. a LoRA rank other than the recipe's: size mismatch
        detail = " ".join(str(err).split())[:200]
        raise CheckpointError(f"checkpoint file '{weights_file}' does not fit this recipe's adapter: {detail}") from None
    if getattr(result, "unexpected_keys", None):
        raise CheckpointError(f"checkpoint '{path}' does not fit this model (unexpected weights, e.g. {result.unexpected_keys[0]})")
    try:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"checkpoint file '{path / TRAINER_STATE}' does not fit this recipe's adapter: {err}") from None
    return state
