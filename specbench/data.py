"""Records (PubMedQA, or any prompt file) and the prompts built from them.

PubMedQA records come from the HuggingFace hub (`qiaojin/PubMedQA`, `pqa_labeled`)
or a local file: JSONL in the HF schema (`context` = {contexts, labels}),
flattened JSONL (`context` as plain text, or `contexts`/`abstract`), or the
authors' `ori_pqal.json` (one object keyed by PMID); their `final_decision` is
kept as the gold answer. Other prompt files (`dataset.kind=prompts`) are read by
`prompt_files`. Records may then be narrowed to some categories, or to the first
N of each. A prompt is the record's text in a template; one that does not fit the
models' context is cut in the abstract (or context), never in the question. One
that does not fit even without it follows `dataset.too_long`: an error naming the
record (the default), skipped (the next record takes its place), or its text cut
from its start so that its end is kept.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd
from transformers import PreTrainedTokenizerBase

from specbench.config import ChatTemplate, DatasetConfig, DatasetKind, TooLong
from specbench.errors import DataError

log = logging.getLogger(__name__)

DECISIONS = ("yes", "no", "maybe")


@dataclass(frozen=True)
class Record:
    """One question (or prompt) with its abstract (or context) split in labelled sections, maybe none."""

    pubid: str  # the record's id (PubMedQA's pubid, a prompt file's id)
    question: str
    sections: tuple[tuple[str, str], ...]  # (label, text); label may be ""
    category: str | None = None
    answer: str | None = None  # the gold decision (yes / no / maybe), when the data has one
    id_name: str = "pubid"  # what its dataset calls the id (a prompt file's id field), for messages

    @property
    def name(self) -> str:
        """The record as messages name it: its dataset's id word and its id ("question_id 81", "pubid 241")."""
        return f"{self.id_name} {self.pubid}"

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
    truncated: bool  # cut to fit the context: its abstract shortened, or its text cut from its start
    category: str | None = None
    answer: str | None = None
    id_name: str = "pubid"
    cut_from_start: bool = False  # its text cut from its start (dataset.too_long=truncate)

    @property
    def name(self) -> str:
        """The prompt as messages name it, like its record."""
        return f"{self.id_name} {self.pubid}"


def load_records(cfg: DatasetConfig) -> list[Record]:
    """The records a run decodes, from `cfg.path` or the hub.

    Only the records of `categories` (all when empty); then the first `per_category`
    of each category, or else the `num_samples` records from `start` on.
    """
    return choose_records(read_records(cfg), cfg)


def read_records(cfg: DatasetConfig) -> list[Record]:
    """Every record of the dataset, in file order."""
    if cfg.kind is DatasetKind.prompts:
        from specbench.prompt_files import read_prompt_file

        return read_prompt_file(Path(cfg.path), cfg)
    return read_file(Path(cfg.path)) if cfg.path else _read_hub(cfg)


def choose_records(
    records: list[Record], cfg: DatasetConfig, fits: Callable[[Record], bool] | None = None
) -> list[Record]:
    """The records `cfg` selects (see `load_records`), counting only those that `fits` accepts when given.

    Without `fits`, too few records is an error; with it, the selection takes what the dataset has.
    """
    source = cfg.path or f"{cfg.hub_id}/{cfg.hub_config}"
    records = select_categories(records, cfg.categories, cfg.per_category, source, fits)
    if cfg.per_category is not None:
        return records
    if fits is not None:
        return list(itertools.islice(filter(fits, records[cfg.start :]), cfg.num_samples))
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
    records: list[Record],
    categories: list[str],
    per_category: int | None,
    source: str,
    fits: Callable[[Record], bool] | None = None,
) -> list[Record]:
    """The records of `categories` (all if empty), at most `per_category` of each, in file order.

    With `fits`, a record it refuses does not count towards its category's `per_category`.
    """
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
        if record.category not in wanted or (per_category is not None and counts[record.category] >= per_category):
            continue
        if per_category is not None and fits is not None and not fits(record):
            continue
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

    id_name = next((name for name in ("pubid", "id", "PMID") if name in item), "pubid")
    pubid = item.get(id_name)
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
    answer = decision(item.get("final_decision"))
    return Record(str(pubid), question.strip(), sections, answer=answer, id_name=id_name)


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
    """Turns records into token ids that fit `max_tokens`, cutting the abstract first.

    `context` (the models' context length, when known) only sharpens the advice of an error.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        template: str,
        chat_template: ChatTemplate,
        max_tokens: int,
        context: int | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.template = template
        self.max_tokens = max_tokens
        self.context = context
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

    def build(self, record: Record, too_long: TooLong = TooLong.error) -> Prompt | None:
        """The record as a prompt of at most `max_tokens` tokens, its abstract cut if need be.

        A record that does not fit even without its abstract follows `too_long`: a DataError naming it
        (error), None (skip), or its text (the question) cut from its start until it fits (truncate).
        """
        text = self.format(record, record.abstract())
        ids = self.encode(text)
        if len(ids) <= self.max_tokens:
            return self._prompt(record, text, ids, truncated=False)
        fitted = self._shrink(record.abstract(), lambda kept: self.format(record, kept), keep_end=False)
        if fitted is not None:
            return self._prompt(record, *fitted, truncated=True)
        if too_long is TooLong.skip:
            return None
        if too_long is TooLong.truncate:
            fitted = self._shrink(
                record.question, lambda kept: self.format(replace(record, question=kept), ""), keep_end=True
            )
            if fitted is not None:
                return replace(self._prompt(record, *fitted, truncated=True), cut_from_start=True)
        needed = len(self.encode(self.format(record, "")))
        without = " without any abstract" if record.sections else ""
        if too_long is TooLong.truncate:
            raise DataError(
                f"the prompt of {record.name} cannot be cut to fit: the template around its "
                f"text leaves no room in the {self.max_tokens} tokens that fit beside the generated ones; "
                "shorten dataset.template or use models with a longer context."
            )
        shorter_output = "lower generation.max_new_tokens, " if self.context and needed < self.context else ""
        raise DataError(
            f"the prompt of {record.name} needs {needed} tokens{without} but only "
            f"{self.max_tokens} fit the models' context beside the generated tokens: set dataset.too_long=skip "
            f"to leave such prompts out or dataset.too_long=truncate to keep their end, {shorter_output}"
            "or use models with a longer context."
        )

    def _shrink(self, part: str, fill: Callable[[str], str], keep_end: bool) -> tuple[str, list[int]] | None:
        """The text `fill` makes of the longest piece of `part` (its start, or its end with `keep_end`) that fits,
        and its ids; None when it does not fit. A kept end needs at least one token of `part`."""
        part_ids = self.tokenizer(part, add_special_tokens=False)["input_ids"]
        least = 1 if keep_end else 0
        keep = len(part_ids)
        while True:  # re-encoding a cut text can shift by a token or two: shrink until it fits
            piece = part_ids[len(part_ids) - keep :] if keep_end else part_ids[:keep]
            text = fill(self.tokenizer.decode(piece))
            ids = self.encode(text)
            if len(ids) <= self.max_tokens:
                return text, ids
            if keep <= least:
                return None
            keep = max(keep - (len(ids) - self.max_tokens), least)

    @staticmethod
    def _prompt(record: Record, text: str, ids: list[int], truncated: bool) -> Prompt:
        return Prompt(record.pubid, text, ids, truncated, record.category, record.answer, record.id_name)


def build_prompts(
    builder: PromptBuilder, records: list[Record], cfg: DatasetConfig
) -> tuple[list[Prompt], list[Record]]:
    """The prompts of `records` (`load_records(cfg)`) under `cfg.too_long`, and the records skipped as too long.

    With skip, the next records of the dataset that fit take the skipped ones' places: of the same
    category with `per_category`, else the records after the selection (as far as the dataset goes).
    """
    built = {record.pubid: builder.build(record, cfg.too_long) for record in records}
    if all(prompt is not None for prompt in built.values()):
        prompts: list[Prompt] = list(built.values())
        _warn_cut(prompts)
        return prompts, []

    def fits(record: Record) -> bool:
        if record.pubid not in built:
            built[record.pubid] = builder.build(record, cfg.too_long)
        return built[record.pubid] is not None

    all_records = read_records(cfg)
    chosen = choose_records(all_records, cfg, fits)
    skipped = [record for record in all_records if record.pubid in built and built[record.pubid] is None]
    names = ", ".join(record.name for record in skipped)
    if not chosen:
        raise DataError(
            f"every record examined is too long for the {builder.max_tokens} tokens that fit beside the generated "
            f"ones ({names}): use dataset.too_long=truncate or models with a longer context."
        )
    log.warning("dataset.too_long=skip: left out %d prompts too long for the context (%s)", len(skipped), names)
    if len(chosen) < len(records):
        log.warning("only %d prompts fit, of the %d the dataset settings ask for", len(chosen), len(records))
    return [built[record.pubid] for record in chosen], skipped


def _warn_cut(prompts: list[Prompt]) -> None:
    cut = [prompt.name for prompt in prompts if prompt.cut_from_start]
    if cut:
        log.warning("dataset.too_long=truncate: cut %d prompts from their start to fit (%s)", len(cut), ", ".join(cut))
