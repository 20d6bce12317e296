"""Datasets and prompts.

A dataset is a list of rows, each a dict with at least `question` and `answer` strings
(other fields, such as `num_terms`, are kept for per-group reporting). Prompts are built
with the model's chat template.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from krpo_cli.arithmetic import DIFFICULTIES, arithmetic_split, difficulty_of
from krpo_cli.config import DataSettings


class DataError(Exception):
    """A dataset a user pointed at cannot be used; the message says why."""


def digit_problems(seed: int = 0) -> list[dict]:
    """Every one-digit `a + b` and `a - b` (a, b in 0..9), shuffled with `seed`: 200 rows.

    The quickstart's task: easy enough that a 135M model starts around a coin flip, so
    that learning is visible within minutes on a CPU.
    """
    rows = []
    for a in range(10):
        for b in range(10):
            rows.append({"question": f"{a} + {b}", "answer": str(a + b), "op": "+"})
            rows.append({"question": f"{a} - {b}", "answer": str(a - b), "op": "-"})
    random.Random(seed).shuffle(rows)
    for i, row in enumerate(rows):
        row["id"] = str(i)
    return rows


DIGITS_TEST_SIZE = 50


def _read_jsonl(path: Path, question_field: str, answer_field: str) -> list[dict]:
    if not path.is_file():
        raise DataError(f"dataset file '{path}' does not exist")
    rows = []
    try:
        with path.open(encoding="utf-8") as f:
            for line_number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{line_number}: not valid JSON ({err.msg})") from None
                if not isinstance(row, dict) or question_field not in row or answer_field not in row:
                    raise DataError(
                        f"{path}:{line_number}: a row needs the fields '{question_field}' and '{answer_field}' "
                        "(set data.question_field / data.answer_field)"
                    )
                row = dict(row)
                row["question"] = str(row.pop(question_field))
                row["answer"] = str(row.pop(answer_field))
                rows.append(row)
    except UnicodeDecodeError:
        raise DataError(f"dataset file '{path}' is not UTF-8 text") from None
    if not rows:
        raise DataError(f"dataset file '{path}' has no rows")
    return rows


def load_rows(settings: DataSettings, split: str = "train") -> list[dict]:
    """Rows of the recipe's dataset for `split` ('train' or 'test')."""
    if split not in ("train", "test"):
        raise DataError(f"unknown split '{split}'; expected train or test")
    if settings.source == "arithmetic":
        rows = arithmetic_split(split, settings.difficulty)
        for row in rows:
            row["difficulty"] = difficulty_of(row["num_terms"], row["num_digits"])
    elif settings.source == "digits":
        rows = digit_problems()
        rows = rows[DIGITS_TEST_SIZE:] if split == "train" else rows[:DIGITS_TEST_SIZE]
    else:
        rows = _read_jsonl(Path(settings.path), settings.question_field, settings.answer_field)
    if split == "train" and settings.max_samples is not None:
        rows = rows[: settings.max_samples]
    return rows


BUILTIN_DATASETS = ("digits", "arithmetic", *(f"arithmetic-{d}" for d in DIFFICULTIES))


def load_eval_rows(spec: str | None, settings: DataSettings, split: str = "test") -> tuple[list[dict], str]:
    """Rows to evaluate on and a name for them.

    `spec` is None (the recipe's own dataset), a built-in name (`digits`, `arithmetic`,
    `arithmetic-easy|normal|hard`) or a local JSONL file with the recipe's field names.
    """
    if spec is None:
        name = settings.path if settings.source == "jsonl" else settings.source
        if settings.source == "arithmetic":
            name = f"arithmetic-{settings.difficulty}"
        return load_rows(settings, split), f"{name} ({split})"
    if spec in BUILTIN_DATASETS:
        source, _, difficulty = spec.partition("-")
        chosen = settings.model_copy(update={"source": source, "difficulty": difficulty or "hard", "max_samples": None})
        return load_rows(chosen, split), f"{spec} ({split})"
    chosen = settings.model_copy(update={"source": "jsonl", "path": spec, "max_samples": None})
    return load_rows(chosen, split), spec


def build_prompt(tokenizer, settings: DataSettings, question: str) -> str:
    """The prompt text for one question: the chat template when the tokenizer has one."""
    user = settings.prompt_template.replace("{question}", question)
    messages = [{"role": "user", "content": user}]
    if settings.system_prompt:
        messages.insert(0, {"role": "system", "content": settings.system_prompt})
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "


class PromptSampler:
    """Yields prompts in a seeded order, reshuffling at each pass over the data."""

    def __init__(self, rows: list[dict], seed: int):
        self.rows = rows
        self.rng = random.Random(seed)
        self.order: list[int] = []
        self.position = 0
        self.epoch = 0

    def next_batch(self, size: int) -> list[dict]:
        batch = []
        while len(batch) < size:
            if self.position >= len(self.order):
                self.order = list(range(len(self.rows)))
                self.rng.shuffle(self.order)
                self.position = 0
                self.epoch += 1
            batch.append(self.rows[self.order[self.position]])
            self.position += 1
        return batch
