"""Reading yes / no / maybe from model outputs, and accuracy against the gold answers."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from specbench.answers import accuracy_metrics, parse_decision

PHRASINGS = [
    ("Yes.", "yes"),
    ("yes", "yes"),
    (" No, the study found no difference.", "no"),
    ("maybe, because the sample was small", "maybe"),
    ("YES!", "yes"),
    ("**No**. The trial was stopped early.", "no"),
    ('"Maybe" is the honest answer here.', "maybe"),
    ("\n\n- Yes: mortality fell.", "yes"),
    ("Answer: no", "no"),
    ("answer:yes", "yes"),
    ("The answer is yes", "yes"),
    ("The answer is: Maybe.", "maybe"),
    ("In conclusion, the answer to the question is no.", "no"),
    ("The results are mixed.\n\nFinal answer: **Yes**", "yes"),
    ("Reasoning first: the cohort was small.\nAnswer: [maybe]", "maybe"),
    ("Final decision - maybe", "maybe"),
    ("My answer would be no", "no"),
    # the first word wins over a later, invented question-and-answer
    ("Yes.\n\nQuestion: Does aspirin prevent stroke?\nAnswer: no", "yes"),
    # nothing that can be read
    ("", None),
    ("   ", None),
    ("The results suggest that the treatment works.", None),
    ("Nope, not at all.", None),
    ("Not clear from the abstract.", None),
    ("Yesterday the patients were discharged.", None),
    ("I cannot answer this; maybe later.", None),
    ("The answer is not given in the abstract.", None),
    ("There is no evidence either way.", None),
]


@pytest.mark.parametrize(("text", "decision"), PHRASINGS, ids=[repr(text)[:40] for text, _ in PHRASINGS])
def test_parse_decision(text, decision):
    assert parse_decision(text) == decision


def test_accuracy_counts_unparsed_outputs_as_wrong_and_skips_prompts_without_gold():
    table = pd.DataFrame(
        {
            "pubid": ["1", "2", "3", "4", "5"],
            "gold_answer": ["yes", "no", "maybe", "yes", None],
            "baseline_answer": ["yes", "no", None, "no", "yes"],
            "spec_answer": ["yes", "no", "maybe", None, None],
        }
    )
    assert accuracy_metrics(table) == {
        "accuracy_baseline": 0.5,
        "unparsed_rate_baseline": 0.25,
        "accuracy_spec": 0.75,
        "unparsed_rate_spec": 0.25,
    }
    assert accuracy_metrics(table.drop(columns="gold_answer")) == {}
    none_graded = accuracy_metrics(table.iloc[4:])
    assert math.isnan(none_graded["accuracy_spec"])
