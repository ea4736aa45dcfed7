"""Prompt files of any origin (`dataset.kind=prompts`): JSONL, JSON (a list of objects) or CSV, one record each.

Spec-Bench's `data/spec_bench/question.jsonl` loads as it is, one line per record:

    {"question_id": 81, "category": "writing", "turns": ["first turn", "second turn"]}

Where a record keeps its text, id, category and gold answer is configurable
(`dataset.text_field`, `id_field`, `category_field`, `answer_field`). By default
the text is `prompt`, else the first of `turns` (later turns of a conversation
are not decoded), else `question` with its `context` as the abstract; the id is
`id`, else `question_id`, else the record's number in the file. Every problem is
reported with its file and line.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

from specbench.categories import metric_suffix
from specbench.config import DatasetConfig
from specbench.data import Record, context_sections, decision
from specbench.errors import DataError

TEXT_FIELDS = ("prompt", "turns", "question")
ID_FIELDS = ("id", "question_id")
_BETWEEN_ITEMS = re.compile(r"[\s,]*")


def read_prompt_file(path: Path, cfg: DatasetConfig) -> list[Record]:
    """Every record of a JSONL, JSON or CSV prompt file, in file order."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"cannot read prompt file {path} ({error}): check dataset.path.") from error
    if path.suffix.lower() == ".csv":
        rows = _csv_rows(path, text, cfg)
    elif path.suffix.lower() == ".json":
        rows = _json_rows(path, text)
    else:
        rows = _jsonl_rows(path, text)
    if not rows:
        raise DataError(f"{path} holds no records: point dataset.path at a file with one prompt per record.")
    records = [_record(where, number, item, cfg) for number, (where, item) in enumerate(rows, start=1)]
    _check_ids_and_categories(records, [where for where, _ in rows])
    return records


def _jsonl_rows(path: Path, text: str) -> list[tuple[str, Any]]:
    rows = []
    for line_number, line in enumerate(text.split("\n"), start=1):  # "\n" only: U+2028 may occur inside strings
        if not line.strip():
            continue
        try:
            rows.append((f"{path}:{line_number}", json.loads(line)))
        except json.JSONDecodeError as error:
            raise DataError(
                f"{path}:{line_number}: not valid JSON ({error.msg} at column {error.colno}); fix or remove that line."
            ) from error
    return rows


def _json_rows(path: Path, text: str) -> list[tuple[str, Any]]:
    """The items of a JSON list, each with the line it starts on."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}:{error.lineno}: not valid JSON ({error.msg}); fix the file.") from error
    if not isinstance(data, list):
        raise DataError(
            f"{path}:1: expected a JSON list of records, got a JSON {type(data).__name__}: "
            "write the records as [{...}, {...}] or one per line in a .jsonl file."
        )
    decoder, rows = json.JSONDecoder(), []
    position = text.index("[") + 1
    for _ in data:  # decode again item by item, only to learn where each one starts
        position = _BETWEEN_ITEMS.match(text, position).end()
        item, end = decoder.raw_decode(text, position)
        rows.append((f"{path}:{text.count(chr(10), 0, position) + 1}", item))
        position = end
    return rows


def _csv_rows(path: Path, text: str, cfg: DatasetConfig) -> list[tuple[str, Any]]:
    reader = csv.DictReader(text.splitlines(keepends=True))
    columns = reader.fieldnames or []
    wanted = [cfg.text_field] if cfg.text_field else list(TEXT_FIELDS)
    if not set(wanted) & set(columns):
        raise DataError(
            f"{path}:1: the CSV header ({', '.join(columns) or 'empty'}) has no {' or '.join(wanted)} column: "
            "add one, or name the text column with dataset.text_field=COLUMN."
        )
    rows, start = [], 2
    for row in reader:
        # empty cells are absent values (a short row's missing cells are None, a long row's extras keyed None)
        values = {key: value for key, value in row.items() if key is not None and value not in ("", None)}
        rows.append((f"{path}:{start}", values))
        start = reader.line_num + 1
    return rows


def _first_text(value: Any) -> str | None:
    """A non-empty string, or the first element of a list that is one (a conversation's first turn)."""
    if isinstance(value, list) and value:
        value = value[0]
    return value.strip() if isinstance(value, str) and value.strip() else None


def _record(where: str, number: int, item: Any, cfg: DatasetConfig) -> Record:
    if not isinstance(item, dict):
        raise DataError(f"{where}: expected an object per record, got {type(item).__name__}; fix that record.")
    question, sections = _text(where, item, cfg)
    id_names = [cfg.id_field] if cfg.id_field else ID_FIELDS
    id_name = next((name for name in id_names if item.get(name) not in (None, "")), None)
    if id_name is None and cfg.id_field:
        raise DataError(f"{where}: field '{cfg.id_field}' (dataset.id_field) is missing; add it or unset it.")
    record_id = number if id_name is None else item[id_name]
    category = item.get(cfg.category_field)
    return Record(
        pubid=str(record_id),
        question=question,
        sections=sections,
        category=None if category in (None, "") else str(category),
        answer=decision(item.get(cfg.answer_field)),
        id_name=id_name or "record",  # numbered in file order: "record 3"
    )


def _text(where: str, item: dict[str, Any], cfg: DatasetConfig) -> tuple[str, tuple[tuple[str, str], ...]]:
    """The record's text, and its context as sections when the text is a `question` with a `context`."""
    if cfg.text_field:
        text = _first_text(item.get(cfg.text_field))
        if text is None:
            raise DataError(
                f"{where}: field '{cfg.text_field}' (dataset.text_field) is missing, empty or not text; "
                "fix that record or set dataset.text_field to the field that holds the prompt."
            )
        return text, ()
    name = next((name for name in TEXT_FIELDS if name in item), None)
    text = _first_text(item.get(name)) if name else None
    if name is None or text is None:
        problem = f"field '{name}' is empty or not text" if name else f"none of the fields {', '.join(TEXT_FIELDS)}"
        raise DataError(
            f"{where}: no prompt text ({problem}; the record has {', '.join(item) or 'no fields'}): "
            "fix that record or name its text field with dataset.text_field=FIELD."
        )
    if name != "question" or item.get("context") in (None, ""):
        return text, ()
    sections = context_sections(item["context"])
    if sections is None:
        raise DataError(
            f"{where}: field 'context' is not text (a string, a list of strings, or {{contexts: [...]}}); fix it."
        )
    return text, sections


def _check_ids_and_categories(records: list[Record], places: list[str]) -> None:
    """Ids must be unique (results are joined by id); categories must stay distinct as MLflow keys."""
    seen: dict[str, str] = {}
    for record, where in zip(records, places, strict=True):
        if record.pubid in seen:
            raise DataError(
                f"{where}: {record.name} repeats the id at {seen[record.pubid]}: ids must be unique; "
                "fix the file or name another id field with dataset.id_field."
            )
        seen[record.pubid] = where
    by_key: dict[str, str] = {}
    for record, where in zip(records, places, strict=True):
        if record.category is None:
            continue
        key = metric_suffix(record.category)
        if not key:
            raise DataError(f"{where}: category {record.category!r} has no letter or digit; rename it.")
        if by_key.setdefault(key, record.category) != record.category:
            raise DataError(
                f"{where}: categories {by_key[key]!r} and {record.category!r} both become '{key}' in MLflow "
                "metric keys: rename one of them."
            )
