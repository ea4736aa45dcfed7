"""Prompt files (`dataset.kind=prompts`): Spec-Bench's format, JSON and CSV, configurable fields, category selection,
templates, and one sentence with file:line for every broken input."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest

from specbench.config import SAMPLES_PACKAGE, ChatTemplate, DatasetConfig, DatasetKind, TooLong, package_file
from specbench.data import PromptBuilder, Record, build_prompts, load_records, read_file, records_table
from specbench.errors import DataError
from specbench.pipeline import prompt_set_metrics, prompt_set_notes
from specbench.prompt_files import read_prompt_file
from tests.test_cli import common_args, run_cli

SAMPLE = package_file(SAMPLES_PACKAGE, "prompts_sample.jsonl")
SAMPLE_CATEGORIES = ["qa", "translation", "summarization", "math_reasoning"]


def prompts(path: Path | str, **settings) -> DatasetConfig:
    return DatasetConfig(name="prompts", kind=DatasetKind.prompts, path=str(path), template="{prompt}", **settings)


def write_lines(path: Path, items: list) -> Path:
    path.write_text("".join((item if isinstance(item, str) else json.dumps(item)) + "\n" for item in items))
    return path


def test_the_shipped_sample_is_in_spec_bench_format():
    lines = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
    assert all(set(line) == {"question_id", "category", "turns"} for line in lines)
    assert all(isinstance(line["question_id"], int) and isinstance(line["turns"], list) for line in lines)
    records = read_prompt_file(SAMPLE, prompts(SAMPLE))
    assert len(records) == 12 and [r.pubid for r in records] == [str(i) for i in range(1, 13)]
    assert list(dict.fromkeys(r.category for r in records)) == SAMPLE_CATEGORIES
    assert records[0].question == lines[0]["turns"][0] and records[0].sections == () and records[0].answer is None


def test_spec_bench_records_load_as_they_are(tmp_path):
    """Spec-Bench's own layout: several turns (the first is decoded) and a reference answer that is not a decision."""
    path = write_lines(
        tmp_path / "question.jsonl",
        [
            {"question_id": 81, "category": "writing", "turns": ["Write a haiku about rain.", "Now make it sad."]},
            {"question_id": 161, "category": "translation", "turns": ["Translate: Hallo"], "reference": ["Hello"]},
        ],
    )
    first, second = load_records(prompts(path, num_samples=2))
    assert (first.pubid, first.category, first.question) == ("81", "writing", "Write a haiku about rain.")
    assert (second.pubid, second.category, second.answer) == ("161", "translation", None)


def test_json_csv_and_the_question_context_layout(tmp_path):
    json_file = tmp_path / "p.json"
    json_file.write_text(
        json.dumps([{"id": "a", "prompt": "first", "category": "x"}, {"id": "b", "prompt": "second"}], indent=2)
    )
    assert [(r.pubid, r.question, r.category) for r in read_prompt_file(json_file, prompts(json_file))] == [
        ("a", "first", "x"),
        ("b", "second", None),
    ]
    csv_file = tmp_path / "p.csv"
    csv_file.write_text('question_id,category,prompt\n7,qa,"a prompt, with a comma\nand a second line"\n8,,plain\n')
    records = read_prompt_file(csv_file, prompts(csv_file))
    assert [(r.pubid, r.category) for r in records] == [("7", "qa"), ("8", None)]
    assert records[0].question == "a prompt, with a comma\nand a second line"
    context = write_lines(tmp_path / "qc.jsonl", [{"question": "Why?", "context": ["part one", "part two"]}])
    (record,) = read_prompt_file(context, prompts(context))
    assert (record.pubid, record.question, record.abstract()) == ("1", "Why?", "part one\npart two")


def test_field_names_are_configurable(tmp_path):
    path = write_lines(
        tmp_path / "custom.jsonl",
        [{"uid": "u1", "task": "coding", "instruction": ["Write a loop."], "label": "Yes"}],
    )
    cfg = prompts(
        path, text_field="instruction", id_field="uid", category_field="task", answer_field="label", num_samples=1
    )
    (record,) = load_records(cfg)
    assert record == Record("u1", "Write a loop.", (), category="coding", answer="yes", id_name="uid")


def test_categories_filter_and_per_category_keep_file_order():
    chosen = load_records(prompts(SAMPLE, categories=["translation", "qa"], num_samples=6))
    assert [r.pubid for r in chosen] == ["1", "2", "3", "4", "5", "6"]  # file order, not the filter's
    two_each = load_records(prompts(SAMPLE, per_category=2, num_samples=3))  # num_samples does not apply
    assert [r.pubid for r in two_each] == ["1", "2", "4", "5", "7", "8", "10", "11"]
    one_of_two = load_records(prompts(SAMPLE, categories=["math_reasoning", "qa"], per_category=1))
    assert [(r.pubid, r.category) for r in one_of_two] == [("1", "qa"), ("10", "math_reasoning")]
    with pytest.raises(DataError, match=r"has only 5 records of the chosen categories from dataset.start=1"):
        load_records(prompts(SAMPLE, categories=["qa", "translation"], start=1, num_samples=8))


def test_pubmedqa_keeps_its_gold_answer(pubmedqa_file, tmp_path):
    assert {record.answer for record in read_file(pubmedqa_file)} == {"yes"}
    odd = write_lines(
        tmp_path / "odd.jsonl",
        [
            {"pubid": "1", "question": "Q?", "context": "c", "final_decision": " Maybe "},
            {"pubid": "2", "question": "Q?", "context": "c", "final_decision": "unsure"},
            {"pubid": "3", "question": "Q?", "context": "c"},
        ],
    )
    assert [record.answer for record in read_file(odd)] == ["maybe", None, None]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("none.jsonl", None, "cannot read prompt file"),
        ("text.jsonl", '{"id": 1, "prompt": "ok"}\n{"id": 2, "body": "x"}\n', ":2: no prompt text (none of the fields"),
        ("empty.jsonl", '{"id": 1, "turns": []}\n', ":1: no prompt text (field 'turns' is empty"),
        ("header.csv", "id,text\n1,hello\n", ":1: the CSV header (id, text) has no prompt or turns or question column"),
        ("dup.jsonl", '{"id": 1, "prompt": "a"}\n\n{"id": 1, "prompt": "b"}\n', ":3: id 1 repeats the id at"),
        ("bad.jsonl", '{"id": 1, "prompt": "a"}\n{"id": 2, "prompt": \n', ":2: not valid JSON"),
        ("list.json", '[\n  {"prompt": "a"},\n  "oops"\n]', ":3: expected an object per record, got str"),
        ("object.json", '{"prompt": "a"}', ":1: expected a JSON list of records"),
        ("keys.jsonl", '{"prompt": "a", "category": "a b"}\n{"prompt": "b", "category": "a-b"}\n', "both become 'a_b'"),
        ("blank.jsonl", "\n\n", "holds no records"),
    ],
)
def test_broken_prompt_files_name_file_line_and_fix(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError) as error:
        read_prompt_file(path, prompts(path))
    assert message in str(error.value) and str(path) in str(error.value)
    assert str(error.value).count("\n") == 0


def test_selection_errors_name_the_choices(pubmedqa_file):
    with pytest.raises(DataError, match=r"names 'coding', which no record of .* has: choose from qa, translation"):
        load_records(prompts(SAMPLE, categories=["qa", "coding"]))
    with pytest.raises(DataError, match=r"has no categories, so dataset.categories and dataset.per_category"):
        load_records(DatasetConfig(path=str(pubmedqa_file), per_category=1))
    with pytest.raises(DataError, match=r"field 'uid' \(dataset.id_field\) is missing"):
        load_records(prompts(SAMPLE, id_field="uid"))


def test_prompt_template_and_context_truncation(tokenizer):
    builder = PromptBuilder(tokenizer, "{prompt}", ChatTemplate.off, max_tokens=60)
    plain = builder.build(Record("1", "What is a cohort study?", (), category="qa"))
    assert plain.text == "What is a cohort study?" and plain.category == "qa" and not plain.truncated
    long = Record("2", "Does the question survive?", (("", "patients treatment study " * 100),), answer="no")
    cut = builder.build(long)
    assert cut.truncated and len(cut.input_ids) <= 60 and cut.answer == "no"
    assert cut.text.startswith("Does the question survive?\n\npatients treatment")
    with pytest.raises(DataError, match=r"pubid 3 needs \d+ tokens but only 5 fit"):
        PromptBuilder(tokenizer, "{prompt}", ChatTemplate.off, max_tokens=5).build(Record("3", "Long prompt " * 5, ()))


def test_records_table_holds_what_the_dataset_input_describes():
    table = records_table(load_records(prompts(SAMPLE, per_category=1)))
    assert list(table.columns) == ["id", "question", "abstract", "category"]  # no gold answers: no answer column
    assert table["category"].tolist() == SAMPLE_CATEGORIES


LONG = "filler words for a prompt far too long " * 40 + "so what is the answer at the very end?"


@pytest.fixture
def spec_bench_file(tmp_path) -> Path:
    """Spec-Bench's layout: qa records 1 (too long), 2 and 4, a translation record 3."""
    turns = {1: LONG, 2: "Short question?", 3: "Translate: Hallo", 4: "Another short one?"}
    categories = {1: "qa", 2: "qa", 3: "translation", 4: "qa"}
    return write_lines(
        tmp_path / "question.jsonl",
        [{"question_id": i, "category": categories[i], "turns": [text]} for i, text in turns.items()],
    )


def test_a_prompt_too_long_for_the_context_names_the_setting_and_its_own_id(tokenizer, spec_bench_file):
    cfg = prompts(spec_bench_file, per_category=1)
    records = load_records(cfg)
    beyond_the_context = PromptBuilder(tokenizer, "{prompt}", ChatTemplate.off, max_tokens=40, context=52)
    with pytest.raises(DataError) as error:
        build_prompts(beyond_the_context, records, cfg)
    message = str(error.value)
    assert message.startswith("the prompt of question_id 1 needs ")  # the file's own id word, not pubid
    assert "set dataset.too_long=skip" in message and "dataset.too_long=truncate" in message
    assert "max_new_tokens" not in message  # it needs more than the whole context: fewer new tokens cannot help
    within_the_context = PromptBuilder(tokenizer, "{prompt}", ChatTemplate.off, max_tokens=40, context=2000)
    with pytest.raises(DataError, match=r"lower generation\.max_new_tokens"):
        build_prompts(within_the_context, records, cfg)


def test_skip_takes_the_next_record_of_the_same_category(tokenizer, spec_bench_file):
    builder = PromptBuilder(tokenizer, "{prompt}", ChatTemplate.off, max_tokens=40)
    one_each = prompts(spec_bench_file, per_category=1, too_long=TooLong.skip)
    chosen, skipped = build_prompts(builder, load_records(one_each), one_each)
    assert [(prompt.pubid, prompt.category) for prompt in chosen] == [("2", "qa"), ("3", "translation")]
    assert [record.name for record in skipped] == ["question_id 1"]
    first_two = prompts(spec_bench_file, num_samples=2, too_long=TooLong.skip)  # the next record in file order
    chosen, skipped = build_prompts(builder, load_records(first_two), first_two)
    assert [prompt.pubid for prompt in chosen] == ["2", "3"] and len(skipped) == 1
    fitting = prompts(spec_bench_file, num_samples=2, start=1, too_long=TooLong.skip)
    assert build_prompts(builder, load_records(fitting), fitting)[1] == []


def test_truncate_keeps_the_end_of_the_prompt(tokenizer, spec_bench_file):
    cfg = prompts(spec_bench_file, num_samples=2, too_long=TooLong.truncate)
    builder = PromptBuilder(tokenizer, "Q: {prompt}\nA:", ChatTemplate.off, max_tokens=40)
    (cut, kept), skipped = build_prompts(builder, load_records(cfg), cfg)
    assert skipped == [] and len(cut.input_ids) <= 40 < len(tokenizer(LONG)["input_ids"])
    assert cut.cut_from_start and cut.truncated and cut.text.startswith("Q: ")
    assert cut.text.endswith("\nA:") and LONG.endswith(cut.text.removeprefix("Q: ").removesuffix("\nA:"))
    assert len(cut.input_ids) >= 38  # as much of the end as fits (re-encoding a cut text may shift a token)
    assert not kept.cut_from_start and kept.text == "Q: Short question?\nA:"


def test_the_prompts_too_long_are_counted_by_category_and_named(tokenizer, spec_bench_file):
    cfg = prompts(spec_bench_file, num_samples=3, too_long=TooLong.truncate)
    builder = PromptBuilder(tokenizer, "{prompt}", ChatTemplate.off, max_tokens=40)
    cut, _ = build_prompts(builder, load_records(cfg), cfg)
    skipped = [Record("9", LONG, (), category="translation", id_name="question_id")]
    setup = SimpleNamespace(prompts=cut, skipped_too_long=skipped)
    assert prompt_set_metrics(setup) == {
        "prompts_skipped_too_long": 1,
        "prompts_skipped_too_long_cat_translation": 1,
        "prompts_truncated": 1,
        "prompts_truncated_cat_qa": 1,
    }
    assert [note.rsplit(": ", 1)[1] for note in prompt_set_notes(setup)] == ["question_id 9.", "question_id 1."]


def test_a_run_that_skips_a_prompt_says_which(models_dir, spec_bench_file, tmp_path, monkeypatch, capsys):
    """Through the CLI: question 1 needs more than the tiny models' 512-token context; question 2 takes its place."""
    spec_bench_file.write_text(spec_bench_file.read_text().replace(LONG, LONG * 4))
    args = [arg for arg in common_args(models_dir, spec_bench_file, tmp_path) if not arg.startswith("dataset.num")]
    args += ["dataset=prompts", "dataset.per_category=1", "dataset.too_long=skip", "cost_curve=false"]
    args += ["quality.perplexity=false", "quality.embedder=none"]
    code, out, err = run_cli(args, monkeypatch, capsys)
    assert code == 0, err
    assert (
        "Left out as too long for the models' context (dataset.too_long=skip), the next records taking their "
        "places: question_id 1." in out.splitlines()
    )
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    (run,) = mlflow.search_runs(experiment_names=["specbench"], output_format="list")
    metrics = run.data.metrics
    assert (metrics["prompts_skipped_too_long"], metrics["prompts_skipped_too_long_cat_qa"]) == (1, 1)
    assert metrics["prompts_truncated"] == 0 and metrics["num_prompts"] == 2  # question 2 (qa) and 3 (translation)
