"""Records (PubMedQA, or any prompt file) and the prompts built from them.

PubMedQA records come from the HuggingFace hub (`qiaojin/PubMedQA`, `pqa_labeled`)
or a local file: JSONL in the HF schema (`context` = {contexts, labels}),
flattened JSONL (`context` as plain text, or `contexts`/`abstract`), or the
authors' `ori_pqal.json` (one object keyed by PMID); their `final_decision` is
kept as the gold answer. Other prompt files (`dataset.kind=prompts`) are read by
`prompt_files`. Records may then be narrowed to some categories, or to the first
N of each. A prompt is the record's text in a template; one that does not fit the
models' context is cut in the abstract (or context), never in the question.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from transformers import PreTrainedTokenizerBase

from specbench.config import ChatTemplate, DatasetConfig, DatasetKind
from specbench.errors import DataError

DECISIONS = ("yes", "no", "maybe")


@dataclass(frozen=True)
class Record:
    """One question (or prompt) with its abstract (or context) split in labelled sections, maybe none."""

    pubid: str  # the record's id (PubMedQA's pubid, a prompt file's id)
    question: str
    sections: tuple[tuple[str, str], ...]  # (label, text); label may be ""
    category: str | None = None
    answer: str | None = None  # the gold decision (yes / no / maybe), when the data has one

    def abstract(self, max_chars: int | None = None) -> str:
        """The sections as text, one per line, `LABEL: text`; optionally cut to `max_chars`."""
        text = "\n".join(f"{label}: {body}" if label else body for label, body in self.sections)
        return text if max_chars is None else text[:max_chars]


@dataclass(frozen=True)
class Prompt:
    """A prompt ready to decode."""

    pubid: str
    text: str
    input_ids: list[int]
    truncated: bool
    category: str | None = None
    answer: str | None = None


def load_records(cfg: DatasetConfig) -> list[Record]:
    """The records a run decodes, from `cfg.path` or the hub.

    Only the records of `categories` (all when empty); then the first `per_category`
    of each category, or else the `num_samples` records from `start` on.
    """
    if cfg.kind is DatasetKind.prompts:
        from specbench.prompt_files import read_prompt_file

        records = read_prompt_file(Path(cfg.path), cfg)
    else:
        records = read_file(Path(cfg.path)) if cfg.path else _read_hub(cfg)
    source = cfg.path or f"{cfg.hub_id}/{cfg.hub_config}"
    records = select_categories(records, cfg.categories, cfg.per_category, source)
    if cfg.per_category is not None:
        return records
    available = len(records) - cfg.start
    if cfg.num_samples > available:
        raise DataError(
            f"dataset.num_samples={cfg.num_samples} but {source} has only {max(available, 0)} records "
            f"{'of the chosen categories ' if cfg.categories else ''}from dataset.start={cfg.start}: "
            "lower dataset.num_samples."
        )
    return records[cfg.start : cfg.start + cfg.num_samples]


def records_table(records: list[Record]) -> pd.DataFrame:
    """The records as a table: id, question, abstract, and category and gold answer when any record has one."""
    table = pd.DataFrame(
        {
            "id": [record.pubid for record in records],
            "question": [record.question for record in records],
            "abstract": [record.abstract() for record in records],
            "category": [record.category for record in records],
            "answer": [record.answer for record in records],
        }
    )
    return table.dropna(axis="columns", how="all")


def select_categories(
    records: list[Record], categories: list[str], per_category: int | None, source: str
) -> list[Record]:
    """The records of `categories` (all if empty), at most `per_category` of each, in file order."""
    if not categories and per_category is None:
        return records
    present = list(dict.fromkeys(record.category for record in records if record.category is not None))
    if not present:
        raise DataError(
            f"{source} has no categories, so dataset.categories and dataset.per_category do not apply: "
            "drop them, or set dataset.category_field to the field that holds each record's category."
        )
    unknown = [name for name in categories if name not in present]
    if unknown:
        raise DataError(
            f"dataset.categories names {', '.join(map(repr, unknown))}, which no record of {source} has: "
            f"choose from {', '.join(present)}."
        )
    wanted = set(categories or present)
    kept, counts = [], dict.fromkeys(wanted, 0)
    for record in records:
        if record.category in wanted and (per_category is None or counts[record.category] < per_category):
            kept.append(record)
            counts[record.category] += 1
    return kept


def read_file(path: Path) -> list[Record]:
    """Records from a local JSONL or JSON file (any of the supported layouts)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"cannot read dataset file {path} ({error}): check dataset.path.") from error
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{error.lineno}: not valid JSON ({error.msg}); fix the file.") from error
        if isinstance(data, dict):  # ori_pqal.json: {pmid: {QUESTION, CONTEXTS, LABELS, ...}}
            return [_parse_record(path, None, {"pubid": key, **value}) for key, value in data.items()]
        return [_parse_record(path, index + 1, item) for index, item in enumerate(data)]
    records = []
    # split on "\n" only: str.splitlines() also splits at U+2028 and friends, which occur inside PubMedQA strings
    for line_number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(
                f"{path}:{line_number}: not valid JSON ({error.msg} at column {error.colno}); fix or remove that line."
            ) from error
        records.append(_parse_record(path, line_number, item))
    if not records:
        raise DataError(f"{path} holds no records: point dataset.path at a PubMedQA file.")
    return records


def _read_hub(cfg: DatasetConfig) -> list[Record]:
    import datasets

    try:
        rows = datasets.load_dataset(cfg.hub_id, cfg.hub_config, split=cfg.split)
    except Exception as error:  # the hub raises many types: connection, missing repo, offline mode
        raise DataError(
            f"cannot load {cfg.hub_id}/{cfg.hub_config} from the HuggingFace hub ({type(error).__name__}): "
            "set dataset.path to a local PubMedQA file."
        ) from error
    return [_parse_record(Path(cfg.hub_id), index + 1, row) for index, row in enumerate(rows)]


def _field(item: dict[str, Any], *names: str) -> Any:
    return next((item[name] for name in names if name in item), None)


def _parse_record(path: Path, line: int | None, item: Any) -> Record:
    where = f"{path}:{line}" if line is not None else str(path)
    if not isinstance(item, dict):
        raise DataError(f"{where}: expected a JSON object per record, got {type(item).__name__}.")

    def fail(field: str, problem: str) -> DataError:
        return DataError(f"{where}: field '{field}' {problem}; each record needs pubid, question and context.")

    pubid = _field(item, "pubid", "id", "PMID")
    if pubid is None or str(pubid).strip() == "":
        raise fail("pubid", "is missing")
    question = _field(item, "question", "QUESTION")
    if not isinstance(question, str) or not question.strip():
        raise fail("question", "is missing or empty")
    sections = context_sections(
        _field(item, "context", "contexts", "CONTEXTS", "abstract"), _field(item, "labels", "LABELS")
    )
    if not sections:
        raise fail("context", "is missing or not text (a string, a list of strings, or {contexts: [...]})")
    return Record(str(pubid), question.strip(), sections, answer=decision(item.get("final_decision")))


def context_sections(context: Any, labels: Any = None) -> tuple[tuple[str, str], ...] | None:
    """(label, text) sections of a context given as text, a list of texts, or {contexts, labels}; None if not text."""
    if isinstance(context, dict):
        context, labels = context.get("contexts"), context.get("labels", labels)
    if isinstance(context, str):
        context = [context]
    if not isinstance(context, list) or not context or not all(isinstance(part, str) for part in context):
        return None
    if not isinstance(labels, list) or len(labels) != len(context):
        labels = [""] * len(context)
    return tuple(zip(map(str, labels), context, strict=True))


def decision(value: Any) -> str | None:
    """A gold yes / no / maybe answer in lower case; None for anything else (absent, empty, another label)."""
    text = str(value).strip().lower() if value is not None else ""
    return text if text in DECISIONS else None


class PromptBuilder:
    """Turns records into token ids that fit `max_tokens`, cutting only the abstract."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, template: str, chat_template: ChatTemplate, max_tokens: int
    ) -> None:
        self.tokenizer = tokenizer
        self.template = template
        self.max_tokens = max_tokens
        has_template = bool(getattr(tokenizer, "chat_template", None))
        self.use_chat = chat_template is ChatTemplate.on or (chat_template is ChatTemplate.auto and has_template)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` as the model will see it (inside the chat template if used)."""
        if self.use_chat:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
            )
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return list(self.tokenizer(text)["input_ids"])

    def format(self, record: Record, abstract: str) -> str:
        """The template filled with the record: `{question}`, `{abstract}`, and `{prompt}` (question, then abstract)."""
        prompt = f"{record.question}\n\n{abstract}" if abstract else record.question
        return self.template.format(question=record.question, abstract=abstract, prompt=prompt)

    def build(self, record: Record) -> Prompt:
        """The record as a prompt of at most `max_tokens` tokens."""
        text = self.format(record, record.abstract())
        ids = self.encode(text)
        if len(ids) <= self.max_tokens:
            return self._prompt(record, text, ids, truncated=False)
        abstract_ids = self.tokenizer(record.abstract(), add_special_tokens=False)["input_ids"]
        keep = max(len(abstract_ids) - (len(ids) - self.max_tokens), 0)
        while True:  # re-encoding a cut text can shift by a token or two: shrink until it fits, down to nothing
            text = self.format(record, self.tokenizer.decode(abstract_ids[:keep]))
            ids = self.encode(text)
            if len(ids) <= self.max_tokens:
                return self._prompt(record, text, ids, truncated=True)
            if keep == 0:
                break
            keep = max(keep - (len(ids) - self.max_tokens), 0)
        needed = len(ids)
        without = " without any abstract" if record.sections else ""
        raise DataError(
            f"the prompt of pubid {record.pubid} needs {needed} tokens{without} but only "
            f"{self.max_tokens} fit the models' context after generation.max_new_tokens: "
            "lower generation.max_new_tokens or use models with a longer context."
        )

    @staticmethod
    def _prompt(record: Record, text: str, ids: list[int], truncated: bool) -> Prompt:
        return Prompt(record.pubid, text, ids, truncated, record.category, record.answer)
