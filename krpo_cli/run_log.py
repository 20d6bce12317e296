"""Run logging: metrics.jsonl / samples.jsonl writers, optional TensorBoard / W&B, the figures' formatting.

metrics.jsonl is always written; `output.log_to` adds TensorBoard event files under
RUN/tensorboard/ and/or a Weights & Biases run, with the same numbers under the same keys.
The progress display is krpo_cli/progress.py.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING


from krpo_cli.errors import KrpoError
from krpo_cli.run_dir import TENSORBOARD, WANDB_ID_FILE


def counted(number: int, noun: str) -> str:
    """"1 step", "2 steps", "1,500 training rows": a count and its noun, in the printed figures."""
    words = noun.split()
    words[-1] += "" if number == 1 else "s"
    return f"{number:,} {' '.join(words)}"


class JsonlWriter:
    """Appends one JSON object per line and flushes, so a crash loses nothing written."""

    def __init__(self, path: Path, mode: str = "a"):
        self.path = path
        self._file = path.open(mode, encoding="utf-8")

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


if TYPE_CHECKING:
    from krpo_cli.config import Recipe

INSTALL_HINTS = {
    "tensorboard": "pip install tensorboard  (or pip install 'krpo[tensorboard]')",
    "wandb": "pip install wandb  (or pip install 'krpo[wandb]')",
}

class LoggingBackendError(KrpoError):
    """A logging backend the recipe asks for is not installed or cannot start."""


def _import_backend(name: str):
    """The module behind a backend; a missing package is a LoggingBackendError saying how to install it."""
    try:
        if name == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

            return SummaryWriter
        import wandb

        return wandb
    except ImportError:
        raise LoggingBackendError(
            f"output.log_to includes {name}, but the {name} package is not installed; install it with: "
            f"{INSTALL_HINTS[name]}"
        ) from None


def check_logging_backends(log_to: list[str]) -> None:
    """Fail before any loading when a requested backend is missing, not after the model is up."""
    for name in log_to:
        _import_backend(name)


def numeric_scalars(metrics: dict) -> dict[str, float]:
    """The metrics a plot can show: numbers (not bools), without the step itself."""
    return {
        key: float(value)
        for key, value in metrics.items()
        if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)
    }


class MetricsLogger:
    """Fans each step's metrics out to metrics.jsonl and the backends in `output.log_to`.

    On resume (`first_step` > 1) the backends append: TensorBoard writes a new event file in
    the same directory with purge_step = first_step, so points a crashed run logged after its
    checkpoint are hidden; W&B continues the run whose id was saved in RUN/wandb_run_id.txt
    (resume="allow"). W&B ignores steps it has already recorded, so steps a crashed run logged
    after its checkpoint keep their first values there (equal to the new ones, timings aside).
    """

    def __init__(self, run_dir: Path, recipe: "Recipe", first_step: int = 1):
        self.jsonl = JsonlWriter(run_dir / "metrics.jsonl")  # creates the file (append mode)
        self.tensorboard = None
        self.wandb_run = None
        log_to = recipe.output.log_to
        if "tensorboard" in log_to:
            SummaryWriter = _import_backend("tensorboard")
            self.tensorboard = SummaryWriter(
                log_dir=str(run_dir / TENSORBOARD), purge_step=first_step if first_step > 1 else None
            )
        if "wandb" in log_to:
            self.wandb_run = self._start_wandb(run_dir, recipe, first_step)

    @staticmethod
    def _start_wandb(run_dir: Path, recipe: "Recipe", first_step: int):
        wandb = _import_backend("wandb")
        id_file = run_dir / WANDB_ID_FILE
        run_id = id_file.read_text(encoding="utf-8").strip() if first_step > 1 and id_file.is_file() else None
        try:
            # WANDB_MODE (online/offline/disabled) and the other WANDB_* variables are read by wandb itself.
            run = wandb.init(
                project=recipe.output.wandb_project or os.environ.get("WANDB_PROJECT") or "krpo",
                name=recipe.run.name,
                dir=str(run_dir),
                config=recipe.model_dump(mode="json"),
                id=run_id,
                resume="allow" if run_id else None,
            )
        except Exception as err:  # wandb raises its own error types (not logged in, no network, …)
            raise LoggingBackendError(
                f"wandb could not start a run ({type(err).__name__}: {err}); run `wandb login`, "
                "or set WANDB_MODE=offline to log locally"
            ) from None
        id_file.write_text(f"{run.id}\n", encoding="utf-8")
        return run

    def write(self, metrics: dict) -> None:
        self.jsonl.write(metrics)
        step = metrics["step"]
        scalars = numeric_scalars(metrics)
        if self.tensorboard is not None:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(key, value, global_step=step)
            self.tensorboard.flush()  # like metrics.jsonl: a crash loses nothing already logged
        if self.wandb_run is not None:
            self.wandb_run.log(scalars, step=step)

    def close(self) -> None:
        self.jsonl.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def format_number(value) -> str:
    """A figure for a progress line or a table: 3 decimals, or 3 significant digits when tiny or huge."""
    if value is None:
        return "—"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.3g}" if abs(value) < 1e-3 or abs(value) >= 1e4 else f"{value:.3f}"
    return str(value)

