"""Task accuracy: the yes / no / maybe decision in each output, against the record's gold answer (PubMedQA).

A decision is read from an output in this order:

1. its first word, past quotes, bullets and markdown ("Yes.", "**No**, because ...", "- maybe, as");
2. else the first "answer" or "decision" followed by "is" or ":" ("Answer: no",
   "The answer to the question is yes", "Final decision - maybe");
3. else nothing: the output counts as unparsed (and as wrong in the accuracy).

The first word wins over a later "Answer:" line because a model that answers at
once and keeps writing often invents a new question with its own answer.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import pandas as pd

from specbench.data import DECISIONS, Prompt
from specbench.metrics import PromptOutcome

_CHOICE = "|".join(DECISIONS)
_LEADING = re.compile(rf"^[\s*_#>+\"'`(\[-]*({_CHOICE})\b", re.IGNORECASE)
_MARKED = re.compile(
    rf"\b(?:answer|decision)\b(?:[^.\n:]{{0,40}}?\b(?:is|would be)\b|\s*[:=\-])[\s*_\"'`(\[:]*({_CHOICE})\b",
    re.IGNORECASE,
)
MODES = ("baseline", "spec")


def parse_decision(text: str) -> str | None:
    """The yes / no / maybe an output gives, in lower case; None when it gives none that can be read."""
    match = _LEADING.match(text) or _MARKED.search(text)
    return match[1].lower() if match else None


def add_answer_columns(table: pd.DataFrame, outcomes: Sequence[PromptOutcome], prompts: Sequence[Prompt]) -> None:
    """Add the gold answer and each mode's parsed decision to the per-prompt table, when records have gold answers.

    `outcomes` are the table's rows, in order; gold answers are joined on the id.
    """
    gold = {prompt.pubid: prompt.answer for prompt in prompts}
    if all(answer is None for answer in gold.values()):
        return
    table["gold_answer"] = table["pubid"].map(gold)
    table["baseline_answer"] = [parse_decision(outcome.baseline_text) for outcome in outcomes]
    table["spec_answer"] = [parse_decision(outcome.spec_text) for outcome in outcomes]


def accuracy_metrics(table: pd.DataFrame) -> dict[str, float]:
    """Accuracy and unparsed share of each mode over the prompts that have a gold answer; none without any."""
    if "gold_answer" not in table:
        return {}
    graded = table[table["gold_answer"].notna()]
    results: dict[str, float] = {}
    for mode in MODES:
        answers = graded[f"{mode}_answer"]
        results[f"accuracy_{mode}"] = float((answers == graded["gold_answer"]).mean()) if len(graded) else math.nan
        results[f"unparsed_rate_{mode}"] = float(answers.isna().mean()) if len(graded) else math.nan
    return results
