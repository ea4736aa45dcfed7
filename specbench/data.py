"""PubMedQA records and the prompts built from them.

Records come from the HuggingFace hub (`qiaojin/PubMedQA`, `pqa_labeled`) or a
local file: JSONL in the HF schema (`context` = {contexts, labels}), flattened
JSONL (`context` as plain text, or `contexts`/`abstract`), or the authors'
`ori_pqal.json` (one object keyed by PMID). A prompt is the question plus the
abstract sections in a template; one that does not fit the models' context is
cut in the abstract, never in the question.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from specbench.config import ChatTemplate, DatasetConfig
from specbench.errors import DataError


@dataclass(frozen=True)
class Record:
    """One question with its abstract, split in labelled sections."""

    pubid: str
    question: str
    sections: tuple[tuple[str, str], ...]  # (label, text); label may be ""

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


def load_records(cfg: DatasetConfig) -> list[Record]:
    """The `num_samples` records from `start` on, from `cfg.path` or the hub."""
    records = read_file(Path(cfg.path)) if cfg.path else _read_hub(cfg)
    source = cfg.path or f"{cfg.hub_id}/{cfg.hub_config}"
    available = len(records) - cfg.start
    if cfg.num_samples > available:
        raise DataError(
            f"dataset.num_samples={cfg.num_samples} but {source} has only {max(available, 0)} records "
            f"from dataset.start={cfg.start}: lower dataset.num_samples."
        )
    return records[cfg.start : cfg.start + cfg.num_samples]


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
    context = _field(item, "context", "contexts", "CONTEXTS", "abstract")
    labels = _field(item, "labels", "LABELS")
    if isinstance(context, dict):
        context, labels = context.get("contexts"), context.get("labels", labels)
    if isinstance(context, str):
        context = [context]
    if not isinstance(context, list) or not context or not all(isinstance(part, str) for part in context):
        raise fail("context", "is missing or not text (a string, a list of strings, or {contexts: [...]})")
    if not isinstance(labels, list) or len(labels) != len(context):
        labels = [""] * len(context)
    return Record(str(pubid), question.strip(), tuple(zip(map(str, labels), context, strict=True)))


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

    def build(self, record: Record) -> Prompt:
        """The record as a prompt of at most `max_tokens` tokens."""
        text = self.template.format(question=record.question, abstract=record.abstract())
        ids = self.encode(text)
        if len(ids) <= self.max_tokens:
            return Prompt(record.pubid, text, ids, truncated=False)
        abstract_ids = self.tokenizer(record.abstract(), add_special_tokens=False)["input_ids"]
        keep = max(len(abstract_ids) - (len(ids) - self.max_tokens), 0)
        while True:  # re-encoding a cut text can shift by a token or two: shrink until it fits, down to nothing
            abstract = self.tokenizer.decode(abstract_ids[:keep])
            text = self.template.format(question=record.question, abstract=abstract)
            ids = self.encode(text)
            if len(ids) <= self.max_tokens:
                return Prompt(record.pubid, text, ids, truncated=True)
            if keep == 0:
                break
            keep = max(keep - (len(ids) - self.max_tokens), 0)
        needed = len(ids)
        raise DataError(
            f"the prompt of pubid {record.pubid} needs {needed} tokens without any abstract but only "
            f"{self.max_tokens} fit the models' context after generation.max_new_tokens: "
            "lower generation.max_new_tokens or use models with a longer context."
        )
