"""The oracle draft: the reference continuation kept with probability alpha, draws fixed by seed and position."""

from __future__ import annotations

import random

from scipy.stats import binomtest

from specbench.engine import CachedModel, DecodeSettings, ModelDrafter
from specbench.engine.oracle import OracleDrafter
from specbench.engine.sampling import TokenChooser
from specbench.testing import make_model

VOCAB = 97  # the verifier's; the cost model's is smaller, so the oracle maps the ids it feeds it
DEPTH = 4


def _oracle(acceptance: float, references: dict[tuple[int, ...], list[int]]) -> OracleDrafter:
    cost = ModelDrafter("cost", CachedModel(make_model("gpt2", 50, seed=0), 50))
    oracle = OracleDrafter("oracle", acceptance, cost, VOCAB)
    oracle.set_references(references)
    return oracle


def _rows(count: int) -> tuple[dict[tuple[int, ...], list[int]], list[list[int]]]:
    """References for `count` random prompts, and each row's tokens: its prompt and a prefix of its reference."""
    draw = random.Random(0)
    references, rows = {}, []
    for index in range(count):
        prompt = [draw.randrange(VOCAB) for _ in range(5 + index % 3)]
        references[tuple(prompt)] = [draw.randrange(VOCAB) for _ in range(100)]
        rows.append(prompt + references[tuple(prompt)][: 1 + index % 20])
    return references, rows


def _propose(oracle: OracleDrafter, rows: list[list[int]], seeds: list[int]) -> list[list[int]]:
    choosers = [TokenChooser(DecodeSettings(max_new_tokens=32), seed) for seed in seeds]
    oracle.reset(len(rows))
    oracle.prefill(rows)
    return [proposal.tokens for proposal in oracle.propose(rows, [DEPTH] * len(rows), choosers)]


def test_the_oracle_keeps_each_reference_token_with_probability_alpha():
    references, rows = _rows(300)
    oracle = _oracle(0.7, references)
    kept = offered = 0
    for tokens, drafted in zip(rows, _propose(oracle, rows, list(range(len(rows)))), strict=True):
        prompt_length = next(length for length in (7, 6, 5) if tuple(tokens[:length]) in references)
        reference = references[tuple(tokens[:prompt_length])]
        start = len(tokens) - prompt_length
        assert len(drafted) == DEPTH
        for position, token in enumerate(drafted, start):
            if position < len(reference):
                offered += 1
                kept += token == reference[position]  # a replacement always differs from the reference token
            assert 0 <= token < VOCAB
    assert oracle.off_path_steps == 0
    assert binomtest(kept, offered, 0.7).pvalue > 1e-3, f"{kept} of {offered} kept"
    assert binomtest(kept, offered, 0.6).pvalue < 1e-3  # the test tells 0.7 from a neighbouring alpha


def test_the_oracle_draws_depend_on_the_seed_and_position_alone():
    references, rows = _rows(40)
    batch = _propose(_oracle(0.5, references), rows, list(range(len(rows))))
    alone = _oracle(0.5, references)
    for index in reversed(range(len(rows))):  # another order, and each seed's draws made first for 96 positions
        prompt_length = 5 + index % 3
        later = rows[index][:prompt_length] + references[tuple(rows[index][:prompt_length])][:92]
        _propose(alone, [later], [index])
        assert _propose(alone, [rows[index]], [index]) == [batch[index]]


def test_a_row_off_its_reference_path_is_counted_and_drafts_random_tokens():
    references, rows = _rows(4)
    oracle = _oracle(1.0, references)
    parted = [[*tokens[:-1], (tokens[-1] + 1) % VOCAB] for tokens in rows]
    drafted = _propose(oracle, parted, [0, 1, 2, 3])
    assert oracle.off_path_steps == 4
    on_path = _propose(_oracle(1.0, references), rows, [0, 1, 2, 3])
    assert drafted != on_path and all(len(tokens) == DEPTH for tokens in drafted)


def test_the_cost_model_reads_what_a_real_draft_would_after_its_drafts_are_accepted():
    references, rows = _rows(6)
    oracle = _oracle(1.0, references)
    choosers = [TokenChooser(DecodeSettings(max_new_tokens=32), seed) for seed in range(len(rows))]
    drafted = _propose(oracle, rows, list(range(len(rows))))
    accepted = [tokens + drafts + [0] for tokens, drafts in zip(rows, drafted, strict=True)]  # and its own token
    before = oracle.cost.model.fed_positions
    oracle.propose(accepted, [DEPTH] * len(rows), choosers)
    # the last draft and the verifier's token, then one token for each further draft step: not all five again
    assert oracle.cost.model.fed_positions - before == len(rows) * (2 + DEPTH - 1)
