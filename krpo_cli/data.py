"""Datasets and prompts.

A dataset is a list of rows, each a dict with at least `question` and `answer` strings
(other fields, such as `num_terms`, are kept for per-group reporting). Prompts are built
with the model's chat template.
"""

from __future__ import annotations

import codecs
import random
from pathlib import Path

from krpo_cli.arithmetic import DIFFICULTIES, arithmetic_split, difficulty_of
from krpo_cli.config import DataSettings
from krpo_cli.models import hub_reachable, short
from krpo_cli.rewards import extract_boxed, extract_gsm8k_answer, reference_from_solution


class DataError(Exception):
    """A dataset a user pointed at cannot be used; the message says why."""


def digit_problems(seed: int = 0) -> list[dict]:
    """Every one-digit `a + b` and `a - b` (a, b in 0..9), shuffled with `seed`: 200 rows.

    The quickstart's task: easy enough that a 135M model already gets some right (mean
    sampled reward ~0.2 at the start), so that learning is visible within minutes on a CPU.
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
FILE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def _is_utf8(path: Path) -> bool:
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                decoder.decode(chunk)
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


def _root_cause(err: BaseException) -> BaseException:
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__
    return err


def _load_table(settings: DataSettings, split_name: str):
    """One split of a local file or hub dataset as a `datasets.Dataset` (None if the split does not exist)."""
    if settings.source == "file":
        path = Path(settings.path).expanduser()
        if not path.is_file():
            raise DataError(f"dataset file '{path}' does not exist")
        builder = FILE_FORMATS.get(path.suffix.lower())
        if builder is None:
            raise DataError(f"dataset file '{path}': unsupported format; use one of {', '.join(FILE_FORMATS)}")
        if split_name != settings.train_split:
            return None  # a single file is one split; the test rows are held out from it
        if path.stat().st_size == 0:
            raise DataError(f"dataset file '{path}' is empty")
        if builder != "parquet" and not _is_utf8(path):
            raise DataError(f"dataset file '{path}' is not UTF-8 text; convert it (e.g. iconv -t UTF-8)")
        import datasets

        datasets.disable_progress_bars()
        try:
            return datasets.load_dataset(builder, data_files=str(path), split="train")
        except Exception as err:  # the datasets library raises many types for a malformed file
            raise DataError(f"cannot read '{path}' as {builder}: {short(_root_cause(err))}") from None

    reachable = hub_reachable()  # if not, the local cache only, failing at once when it is not there
    import datasets

    datasets.disable_progress_bars()
    try:
        names = datasets.get_dataset_split_names(settings.path, settings.config)
        base = split_name.split("[")[0]
        if base not in names:
            return None
        return datasets.load_dataset(settings.path, settings.config, split=split_name)
    except Exception as err:
        if not reachable:
            raise DataError(
                f"cannot reach the hub to fetch '{settings.path}' and it is not in the local cache; "
                "save it as a JSONL/Parquet/CSV file and set data.source=file data.path=FILE"
            ) from None
        raise DataError(f"cannot load '{settings.path}' from the hub: {short(err)}") from None


def _normalise(record: dict, settings: DataSettings, where: str) -> dict:
    """A source record as krpo's row: question, answer (extracted), and its other short columns."""
    missing = [f for f in (settings.question_field, settings.answer_field) if f not in record]
    if missing:
        raise DataError(
            f"{where}: rows have no field '{missing[0]}' (columns: {', '.join(record)}); "
            "set data.question_field / data.answer_field"
        )
    answer = str(record[settings.answer_field])
    if settings.answer_format == "auto":
        answer = reference_from_solution(answer)
    elif settings.answer_format == "gsm8k":
        answer = extract_gsm8k_answer(answer) or answer.strip()
    elif settings.answer_format == "boxed":
        answer = extract_boxed(answer) or answer.strip()
    row = {"question": str(record[settings.question_field]), "answer": answer}
    for key, value in record.items():
        if key not in (settings.question_field, settings.answer_field) and isinstance(value, (str, int, bool)):
            if not isinstance(value, str) or len(value) <= 100:  # keep labels, not long texts
                row[key] = value
    return row


def _table_rows(settings: DataSettings, split: str) -> list[dict]:
    """Train or test rows of a file/hub dataset; a source with one split gets a seeded hold-out."""
    where = settings.path
    train_table = _load_table(settings, settings.train_split)
    if train_table is None:
        raise DataError(f"'{where}' has no split '{settings.train_split}' (set data.train_split)")
    test_table = _load_table(settings, settings.test_split) if settings.test_split else None
    if test_table is None:
        rows = [_normalise(r, settings, where) for r in train_table]
        held = settings.test_size if settings.test_size >= 1 else round(settings.test_size * len(rows))
        held = int(min(held, len(rows) - 1))
        order = list(range(len(rows)))
        random.Random(settings.split_seed).shuffle(order)
        chosen = sorted(order[:held]) if split == "test" else sorted(order[held:])
        return [rows[i] for i in chosen]
    table = train_table if split == "train" else test_table
    return [_normalise(r, settings, where) for r in table]


def _filter(rows: list[dict], settings: DataSettings) -> list[dict]:
    for field_name, allowed in settings.filters.items():
        if rows and field_name not in rows[0]:
            raise DataError(f"data.filters: rows have no field '{field_name}' (columns: {', '.join(rows[0])})")
        wanted = {str(v) for v in allowed}
        rows = [row for row in rows if str(row.get(field_name)) in wanted]
    if settings.max_question_chars is not None:
        rows = [row for row in rows if len(row["question"]) <= settings.max_question_chars]
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
        rows = _table_rows(settings, split)
    rows = _filter(rows, settings)
    if split == "train" and settings.max_samples is not None:
        rows = rows[: settings.max_samples]
    if not rows:
        raise DataError(f"the {split} split of the dataset is empty (after filters)")
    return rows


BUILTIN_DATASETS = ("digits", "arithmetic", *(f"arithmetic-{d}" for d in DIFFICULTIES))


def load_eval_rows(spec: str | None, settings: DataSettings, split: str = "test") -> tuple[list[dict], str]:
    """Rows to evaluate on and a name for them.

    `spec` is None (the recipe's own dataset, test split), a built-in name (`digits`,
    `arithmetic`, `arithmetic-easy|normal|hard`) or a local file with the recipe's field
    names (all of its rows).
    """
    if spec is None:
        name = settings.path if settings.source in ("file", "hub") else settings.source
        if settings.source == "arithmetic":
            name = f"arithmetic-{settings.difficulty}"
        return load_rows(settings, split), f"{name} ({split})"
    if spec in BUILTIN_DATASETS:
        source, _, difficulty = spec.partition("-")
        chosen = settings.model_copy(update={"source": source, "difficulty": difficulty or "hard", "max_samples": None})
        return load_rows(chosen, split), f"{spec} ({split})"
    chosen = settings.model_copy(update={"source": "file", "path": spec, "max_samples": None, "test_size": 0})
    rows = _filter([_normalise(r, chosen, spec) for r in _load_table(chosen, chosen.train_split)], chosen)
    if not rows:
        raise DataError(f"'{spec}' has no rows (after filters)")
    return rows, spec


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

    def state(self) -> dict:
        version, internal, gauss = self.rng.getstate()
        return {"rng": (version, list(internal), gauss), "order": self.order, "position": self.position, "epoch": self.epoch}

    def load_state(self, state: dict) -> None:
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.order, self.position, self.epoch = list(state["order"]), state["position"], state["epoch"]

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
