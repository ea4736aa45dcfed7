"""PubMedQA loading in every supported layout, clear errors for broken files, and prompt truncation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from specbench.config import ChatTemplate, DatasetConfig
from specbench.data import DataError, PromptBuilder, Record, load_records, read_file

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "pubmedqa"
TEMPLATE = DatasetConfig().template


def write_lines(path: Path, items: list) -> Path:
    path.write_text("".join((item if isinstance(item, str) else json.dumps(item)) + "\n" for item in items))
    return path


def test_hf_schema_jsonl(pubmedqa_file):
    records = read_file(pubmedqa_file)
    assert len(records) == 8
    first = records[0]
    assert first.pubid == "1000" and first.question.endswith("?")
    assert [label for label, _ in first.sections] == ["BACKGROUND", "RESULTS"]
    assert first.abstract().startswith("BACKGROUND: ")


def test_flattened_layouts(tmp_path):
    path = write_lines(
        tmp_path / "flat.jsonl",
        [
            {"pubid": 1, "question": "Q1?", "context": "plain text abstract"},
            {"id": "2", "question": "Q2?", "contexts": ["part one", "part two"], "labels": ["A", "B"]},
            {"pubid": "3", "question": "Q3?", "abstract": "an abstract"},
        ],
    )
    records = read_file(path)
    assert [r.pubid for r in records] == ["1", "2", "3"]
    assert records[0].abstract() == "plain text abstract"
    assert records[1].abstract() == "A: part one\nB: part two"


def test_authors_ori_pqal_json(tmp_path):
    path = tmp_path / "ori_pqal.json"
    path.write_text(
        json.dumps({"123": {"QUESTION": "Q?", "CONTEXTS": ["c1", "c2"], "LABELS": ["BACKGROUND", "METHODS"]}})
    )
    (record,) = read_file(path)
    assert record == Record("123", "Q?", (("BACKGROUND", "c1"), ("METHODS", "c2")))


def test_hf_jsonl_and_the_authors_json_of_the_same_records_agree(tmp_path):
    """The two published layouts of PubMedQA (HF schema, authors' ori_pqal.json), written here with made-up
    records, read to the same records."""
    items = {
        "1001": ("Does tea reduce fatigue?", ["Fatigue is common.", "Tea drinkers slept more."],
                     ["BACKGROUND", "RESULTS"]),
        "1002": ("Is the scale valid?", ["A survey of 200 patients."], ["METHODS"]),
        "1003": ("Does it help?", ["One.", "Two.", "Three."], ["BACKGROUND", "METHODS", "RESULTS"]),
    }  # fmt: skip
    ori = tmp_path / "ori_pqal.json"
    ori.write_text(
        json.dumps(
            {
                pubid: {"QUESTION": q, "CONTEXTS": c, "LABELS": labels, "final_decision": "yes"}
                for pubid, (q, c, labels) in items.items()
            }
        )
    )
    hf = write_lines(
        tmp_path / "pqa_labeled.jsonl",
        [
            {
                "pubid": int(pubid),  # the hub's parquet stores pubids as integers
                "question": q,
                "context": {"contexts": c, "labels": labels, "meshes": []},
                "long_answer": "made up",
                "final_decision": "yes",
            }
            for pubid, (q, c, labels) in items.items()
        ],
    )
    from_ori, from_hf = read_file(ori), read_file(hf)
    assert from_hf == from_ori
    assert [r.pubid for r in from_hf] == list(items)
    assert from_hf[0] == Record(
        "1001",
        "Does tea reduce fatigue?",
        (("BACKGROUND", "Fatigue is common."), ("RESULTS", "Tea drinkers slept more.")),
        answer="yes",  # final_decision, kept for task accuracy
    )


@pytest.mark.skipif(not SHARED.exists(), reason="extra check: the shared PubMedQA copy is not beside this checkout")
def test_real_pubmedqa_files_agree():
    jsonl = read_file(SHARED / "pqa_labeled.jsonl")
    ori = read_file(SHARED / "ori_pqal.json")
    assert len(jsonl) == len(ori) == 1000
    assert jsonl[0] == ori[0] and jsonl[0].pubid == "21645374"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"pubid": "1", "question": "Q?", "context": "x"', "not valid JSON"),
        ('{"pubid": "1", "context": "x"}', "field 'question'"),
        ('{"question": "Q?", "context": "x"}', "field 'pubid'"),
        ('{"pubid": "1", "question": "Q?", "context": {"labels": []}}', "field 'context'"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_malformed_lines_name_file_line_and_field(tmp_path, line, message):
    path = write_lines(tmp_path / "bad.jsonl", [{"pubid": "0", "question": "fine?", "context": "ok"}, line])
    with pytest.raises(DataError) as error:
        read_file(path)
    assert f"{path}:2" in str(error.value) and message in str(error.value)


def test_missing_file_and_too_few_records(tmp_path, pubmedqa_file):
    with pytest.raises(DataError, match="cannot read dataset file"):
        read_file(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match=r"has only 8 records.*lower dataset.num_samples"):
        load_records(DatasetConfig(path=str(pubmedqa_file), num_samples=9))
    assert len(load_records(DatasetConfig(path=str(pubmedqa_file), num_samples=3, start=5))) == 3


def test_long_prompts_are_cut_in_the_abstract_only(tokenizer):
    record = Record("9", "Does the question survive intact?", (("RESULTS", "patients treatment study " * 200),))
    builder = PromptBuilder(tokenizer, TEMPLATE, ChatTemplate.off, max_tokens=120)
    prompt = builder.build(record)
    assert prompt.truncated and len(prompt.input_ids) <= 120
    assert "Question: Does the question survive intact?" in prompt.text
    short = builder.build(Record("10", "Short?", (("", "patients study"),)))
    assert not short.truncated and short.input_ids == list(tokenizer(short.text)["input_ids"])
    with pytest.raises(DataError, match=r"pubid 9 needs .* tokens without any abstract"):
        PromptBuilder(tokenizer, TEMPLATE, ChatTemplate.off, max_tokens=5).build(record)


def test_chat_template_wraps_the_prompt():
    from specbench.testing import train_tokenizer

    chat = train_tokenizer()
    chat.chat_template = "{% for m in messages %}<user>{{ m['content'] }}</user>{% endfor %}<bot>"
    record = Record("1", "Q?", (("", "abstract"),))
    wrapped = PromptBuilder(chat, TEMPLATE, ChatTemplate.auto, 500).build(record)
    plain = PromptBuilder(chat, TEMPLATE, ChatTemplate.off, 500).build(record)
    assert chat.decode(wrapped.input_ids).startswith("<user>Question: Q?")
    assert chat.decode(wrapped.input_ids).endswith("<bot>")
    assert len(wrapped.input_ids) > len(plain.input_ids)
