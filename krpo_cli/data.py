"""Datasets and prompts.

A dataset is a list of rows, each a dict with at least `question` and `answer` strings
(other fields, such as `num_terms`, are kept for per-group reporting). Prompts are built
with the model's chat template.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import json
import math
import random
import re
from collections.abc import Sequence
from pathlib import Path

from krpo_cli.arithmetic import DIFFICULTIES, arithmetic_split, difficulty_of
from krpo_cli.config import DataSettings
from krpo_cli.errors import KrpoError
from krpo_cli.hub import dataset_maybe_cached, datasets_offline, hub_reachable, missing_dataset_message
from krpo_cli.models import short
from krpo_cli.rewards import extract_boxed, extract_gsm8k_answer, reference_from_solution


class DataError(KrpoError):
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


_noted: set[str] = set()


def _note(message: str) -> None:
    """Print a remark about the data on stderr, once: training loads a file for each split."""
    if message in _noted:
        return
    _noted.add(message)
    from rich.console import Console

    Console(stderr=True).print(message, markup=False, highlight=False, soft_wrap=True)


def _json_records(path: Path) -> list[dict] | None:
    """The records of a .jsonl or .json file that holds a list of records or JSON Lines.

    Read with Python's json module rather than the datasets library: values stay as written (an
    answer 30 stays an int, where pyarrow turns it into 30.0 in a column that also holds 2.5), and
    a malformed line is reported by its number. None for a .json document of another shape (a
    mapping of columns), which the datasets library reads.
    """
    text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is not part of the JSON
    document_error = None
    try:  # one document: a list of records, in a .json file or (as the datasets library accepts) a .jsonl one
        document = json.loads(text)
    except json.JSONDecodeError as err:
        document_error = err  # JSON Lines, or a malformed document
    except RecursionError:
        pass  # nested past Python's limit: the line reading below says which line
    else:
        if isinstance(document, list):
            for number, record in enumerate(document, 1):
                if not isinstance(record, dict):
                    raise DataError(f"dataset file '{path}' item {number}: not a JSON object ({type(record).__name__})")
            return document
        if path.suffix.lower() == ".json":
            return None
        # else a .jsonl file of one line: read below as JSON Lines
    records = []
    for number, line in enumerate(text.split("\n"), 1):  # not splitlines(): JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if document_error is not None and not records:  # a (pretty-printed) document, not lines
                err, number = document_error, document_error.lineno
            raise DataError(f"dataset file '{path}' line {number}: not valid JSON: {err.msg} (column {err.colno})") from None
        except RecursionError:
            raise DataError(f"dataset file '{path}' line {number}: JSON nested too deeply to read") from None
        if not isinstance(record, dict):
            raise DataError(f"dataset file '{path}' line {number}: not a JSON object ({type(record).__name__})")
        records.append(record)
    return records


def _csv_column_count(path: Path) -> int:
    """The number of columns of a CSV file's header; refused when no row follows it."""
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        header = next((row for row in reader if row), None)  # blank lines are skipped, as pandas does
        if header is None or next((row for row in reader if row), None) is None:
            raise DataError(f"dataset file '{path}' has no rows" + (" (only a header)" if header else ""))
    return len(header)


def _load_file(path: Path) -> list[dict]:
    """The records of a local file, read as its suffix says."""
    if not path.is_file():
        raise DataError(f"dataset file '{path}' does not exist")
    builder = DataSettings.FILE_FORMATS.get(path.suffix.lower())
    if builder is None:
        raise DataError(
            f"dataset file '{path}': unsupported format; use one of {', '.join(DataSettings.FILE_FORMATS)}"
        )
    if path.stat().st_size == 0:
        raise DataError(f"dataset file '{path}' is empty")
    if builder != "parquet" and not _is_utf8(path):
        raise DataError(f"dataset file '{path}' is not UTF-8 text; convert it (e.g. iconv -t UTF-8)")
    options = {}
    if builder == "json":
        records = _json_records(path)
        if records is not None:
            if not records:
                raise DataError(f"dataset file '{path}' has no rows")
            return records
    elif builder == "csv":
        # Every cell as the text written: left to infer, pandas reads a numeric column with one
        # empty cell as float ("30" becomes "30.0"), and "NA" or "null" as missing.
        options = {"converters": {i: str for i in range(_csv_column_count(path))}, "keep_default_na": False}
    import datasets

    datasets.disable_progress_bars()
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its own error line would precede krpo's
    try:
        if builder == "parquet":
            import pyarrow.parquet

            if pyarrow.parquet.read_metadata(path).num_rows == 0:
                raise DataError(f"dataset file '{path}' has no rows")
        return list(datasets.load_dataset(builder, data_files=str(path), split="train", **options))
    except DataError:
        raise
    except Exception as err:  # the datasets library raises many types for a malformed file
        raise DataError(f"cannot read '{path}' as {builder}: {short(_root_cause(err))}") from None
    finally:
        datasets.logging.set_verbosity(verbosity)


def _load_table(settings: DataSettings, split_name: str) -> Sequence[dict] | None:
    """The records of one split of a local file (a list) or hub dataset (a `datasets.Dataset`, which
    yields dicts); None if the split does not exist."""
    if settings.source == "file":
        if split_name != settings.train_split:
            return None  # a single file is one split; the test rows are held out from it
        return _load_file(Path(settings.path).expanduser())

    # If not reachable, the local cache only, failing at once when it is not there.
    reachable = not datasets_offline() and hub_reachable()
    if not reachable and not dataset_maybe_cached(settings.path):
        raise DataError(missing_dataset_message(settings.path))  # without the seconds that importing datasets takes
    import datasets

    datasets.disable_progress_bars()
    try:
        names = datasets.get_dataset_split_names(settings.path, settings.config)
        base = split_name.split("[")[0]
        if base not in names:
            return None
        return datasets.load_dataset(settings.path, settings.config, split=split_name)  # rows read one at a time
    except Exception as err:
        if not reachable:
            raise DataError(missing_dataset_message(settings.path)) from None
        raise DataError(f"cannot load '{settings.path}' from the hub: {short(err)}") from None


def _missing(value) -> bool:
    """A question or answer cell that holds no usable text: absent, null, NaN, blank text, or a list
    or mapping (which would be asked, or graded against, as its Python repr)."""
    if value is None or not isinstance(value, (str, int, float)):
        return True
    if isinstance(value, float):
        return math.isnan(value)
    return isinstance(value, str) and not value.strip()


_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _text(value) -> str:
    """A cell as text; a lone surrogate (JSON allows "\\ud800", no text encoding does) becomes U+FFFD."""
    return _SURROGATE.sub("\ufffd", str(value))


def _normalise(record: dict, settings: DataSettings) -> dict | None:
    """A source record as krpo's row: question, answer (extracted), and its other short columns.

    None for a record without a question or an answer: it could only be asked as "None" or
    graded against "None".
    """
    history = None
    if settings.messages_field:
        history, question = _conversation(record.get(settings.messages_field))
    else:
        question = record.get(settings.question_field)
    answer = record.get(settings.answer_field)
    if _missing(question) or _missing(answer):
        return None
    answer = _text(answer)  # a JSON int 30 gives "30"; a float 30.0 stays "30.0", as the user wrote it
    if settings.answer_format == "auto":
        answer = reference_from_solution(answer)
    elif settings.answer_format == "gsm8k":
        answer = extract_gsm8k_answer(answer) or answer.strip()
    elif settings.answer_format == "boxed":
        answer = extract_boxed(answer) or answer.strip()
    if not answer.strip():  # e.g. an empty \boxed{}
        return None
    row = {"question": _text(question), "answer": answer}
    if history is not None:
        row["history"] = history
    for key, value in record.items():
        if key not in (_question_source(settings), settings.answer_field) and isinstance(value, (str, int, bool)):
            if not isinstance(value, str) or len(value) <= 100:  # keep labels, not long texts
                row[key] = _text(value) if isinstance(value, str) else value
    return row


def _question_source(settings: DataSettings) -> str:
    """The field a question comes from: data.messages_field when set, else data.question_field."""
    return settings.messages_field or settings.question_field


def _conversation(value) -> tuple[list[dict] | None, str | None]:
    """A conversational cell (a list of {role, content}) as (the turns before its last user turn, that
    turn's content); (None, None) when it is not such a list or has no user turn."""
    if not isinstance(value, list) or not all(
        isinstance(turn, dict) and isinstance(turn.get("role"), str) and isinstance(turn.get("content"), str)
        for turn in value
    ):
        return None, None
    users = [i for i, turn in enumerate(value) if turn["role"] == "user"]
    if not users:
        return None, None
    last = users[-1]
    history = [{"role": turn["role"], "content": _text(turn["content"])} for turn in value[:last]]
    return history, value[last]["content"]


def _usable_rows(records: Sequence[dict], settings: DataSettings, where: str) -> tuple[list[dict], int]:
    """krpo's rows of `records` and how many were skipped for lacking a question or an answer.

    A field that no record has is a wrong field name, not a gap in the data: an error. So is a
    source with no usable row at all.
    """
    fields = (_question_source(settings), settings.answer_field)
    columns = getattr(records, "column_names", None) or list(dict.fromkeys(key for record in records for key in record))
    for name in fields:
        if records and name not in columns:
            raise DataError(
                f"{where}: rows have no field '{name}' (columns: {', '.join(columns)}); "
                "set data.question_field / data.answer_field"
            )
    rows = [row for row in (_normalise(record, settings) for record in records) if row is not None]
    if records and not rows:
        raise DataError(
            f"{where}: none of its {len(records)} rows has both a question ('{fields[0]}') and an answer "
            f"('{fields[1]}') as text; set data.question_field / data.answer_field"
        )
    return rows, len(records) - len(rows)


def _rows(records: Sequence[dict], settings: DataSettings, where: str) -> list[dict]:
    rows, skipped = _usable_rows(records, settings, where)
    if skipped:
        _note(
            f"data: skipped {skipped} of {len(records)} rows of {where} with an empty or missing "
            f"'{_question_source(settings)}' or '{settings.answer_field}', or one that is a list or mapping, not text"
        )
    return rows


def _held_out_count(test_size: float, total: int, where: str) -> int:
    """How many of `total` rows `data.test_size` holds out (a fraction below 1, else a count).

    Refused above half the rows (rounded up) or at all of them: a hub recipe's
    count (openmath's 500) pointed at a small local file would otherwise train on one row.
    """
    held = min(int(test_size) if test_size >= 1 else round(test_size * total), total)
    # Half, rounded up (test_size=0.5 of 7 rows holds out round(3.5) = 4), and never every row.
    at_most = min((total + 1) // 2, total - 1)
    if held > at_most:
        raise DataError(
            f"data.test_size={test_size:g} would hold out {held} of the {total} rows of {where}, leaving "
            f"{total - held} to train on; set data.test_size to at most {at_most}"
        )
    return held


def _table_rows(settings: DataSettings, split: str) -> list[dict]:
    """Train or test rows of a file/hub dataset; a source with one split gets a seeded hold-out."""
    test_table = _load_table(settings, settings.test_split) if settings.test_split else None
    if split == "test" and test_table is not None:  # the train split is not needed
        return _rows(test_table, settings, f"the {settings.test_split} split of '{settings.path}'")
    train_table = _load_table(settings, settings.train_split)
    if train_table is None:
        raise DataError(f"'{settings.path}' has no split '{settings.train_split}' (set data.train_split)")
    if test_table is not None:
        return _rows(train_table, settings, f"the {settings.train_split} split of '{settings.path}'")
    rows = _rows(train_table, settings, f"'{settings.path}'")
    held = _held_out_count(settings.test_size, len(rows), f"'{settings.path}'")
    order = list(range(len(rows)))
    random.Random(settings.split_seed).shuffle(order)
    chosen = sorted(order[:held]) if split == "test" else sorted(order[held:])
    return [rows[i] for i in chosen]


def _filter(rows: list[dict], settings: DataSettings) -> list[dict]:
    for field_name, allowed in settings.filters.items():
        columns = list(dict.fromkeys(key for row in rows for key in row))  # rows of a JSON file may differ in keys
        if rows and field_name not in columns:
            raise DataError(f"data.filters: rows have no field '{field_name}' (columns: {', '.join(columns)})")
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
        single_split = settings.source == "file" or (settings.source == "hub" and not settings.test_split)
        if split == "test" and single_split and settings.test_size == 0:  # nothing held out, yet evaluated
            raise DataError("no test rows: data.test_size is 0; hold some out (e.g. data.test_size=0.1) or set eval.every=0")
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
    rows = _filter(_rows(_load_file(Path(spec).expanduser()), chosen, f"'{spec}'"), chosen)
    if not rows:
        raise DataError(f"'{spec}' has no rows (after filters)")
    return rows, spec


def build_prompt(tokenizer, settings: DataSettings, question: str, history: list[dict] | None = None) -> str:
    """The prompt text for one question: the chat template when the tokenizer has one (with
    data.chat_template_kwargs). `history`: a conversational row's turns before the question; the
    system prompt leads unless they hold a system turn of their own."""
    user = settings.prompt_template.replace("{question}", question)
    messages = [*(history or []), {"role": "user", "content": user}]
    if settings.system_prompt and not any(turn["role"] == "system" for turn in messages):
        messages.insert(0, {"role": "system", "content": settings.system_prompt})
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, **settings.chat_template_kwargs
        )
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "


def row_prompt(tokenizer, settings: DataSettings, row: dict) -> str:
    """The prompt text for one data row: its question, after a conversational row's earlier turns."""
    return build_prompt(tokenizer, settings, row["question"], row.get("history"))


def prompt_token_budget(model, tokenizer, max_new_tokens: int) -> int | None:
    """The most prompt tokens that leave room for max_new_tokens in the model's context; None if unknown."""
    sizes = [getattr(getattr(model, "config", None), "max_position_embeddings", None),
             getattr(tokenizer, "model_max_length", None)]
    known = [size for size in sizes if isinstance(size, int) and 0 < size < 10**7]  # tokenizers say 1e30 for none
    return min(known) - max_new_tokens if known else None


def drop_overlong(rows: list[dict], tokenizer, settings: DataSettings, budget: int | None, where: str) -> list[dict]:
    """The rows whose prompt fits in `budget` tokens; the others are skipped, with a note.

    A question of 100 KB would otherwise be generated from with a context the model does not have
    and a memory need that grows with its square. Only a prompt whose UTF-8 length exceeds the
    budget is tokenized: a token is at least one byte.
    """
    if budget is None or not rows:
        return rows
    overhead = len(build_prompt(tokenizer, settings, "").encode("utf-8")) + 8

    def fits(row: dict) -> bool:
        turns = [row["question"]] + [turn["content"] for turn in row.get("history") or []]
        if overhead + sum(len(text.encode("utf-8")) + 16 for text in turns) <= budget:  # 16: a turn's markers
            return True
        prompt = row_prompt(tokenizer, settings, row)
        return len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) <= budget

    kept = [row for row in rows if fits(row)]
    if not kept:
        raise DataError(
            f"no question of {where} fits the model's context: each prompt has more than {max(budget, 0)} tokens "
            "(the context less generation.max_new_tokens); shorten them, or lower generation.max_new_tokens"
        )
    if len(kept) < len(rows):
        _note(f"data: skipped {len(rows) - len(kept)} of {len(rows)} rows of {where} whose prompt has more than "
              f"{budget} tokens (the model's context less generation.max_new_tokens)")
    return kept


def rows_digest(rows: list[dict]) -> str:
    """A sha256 of the rows, in order: whether a resumed run reads the data its checkpoint was made on."""
    digest = hashlib.sha256()
    for row in rows:  # row by row: no one string the size of the dataset; ASCII escapes encode any text
        digest.update(json.dumps(row, sort_keys=True, default=str).encode("ascii") + b"\n")
    return digest.hexdigest()


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
