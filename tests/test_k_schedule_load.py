"""k_schedule=load: the choice of k per step from the cost surface, its correction by measured steps, and the
speculative decoder's plain steps (k = 0) and changing k, exact against lone decodes."""

from __future__ import annotations

import pytest

from specbench.engine import CachedModel, ConstantK, DecodeSettings, ModelDrafter
from specbench.engine.costs import StepCosts
from specbench.engine.decode import SpeculativeDecoder
from specbench.engine.timing import Stopwatch
from specbench.load.k_schedule import RATIO_WINDOW, LoadAwareK
from specbench.testing import make_model, one_torch_thread
from tests.test_continuous import VOCAB, alone, requests, served

single_thread = pytest.fixture(autouse=True, scope="module")(one_torch_thread)

# At 1 row the verify pass is almost flat in its tokens; at 64 rows it grows by a full step per token.
COSTS = StepCosts(
    verify_s={1: {1: 1.0, 2: 1.05, 3: 1.1}, 64: {1: 2.0, 2: 4.0, 3: 6.0}},
    draft_s={1: {"draft": 0.1}, 64: {"draft": 0.2}},
)


def expected_rate(alpha: float, k: int, step_s: float) -> float:
    return sum(alpha**i for i in range(k + 1)) / step_s


def test_the_choice_by_hand_drafts_at_one_row_and_not_at_a_full_batch():
    schedule = LoadAwareK(COSTS, k_max=2, prior_alpha=0.8, prior_steps=4.0)
    assert schedule.alpha == pytest.approx(0.8)
    # one row: k=2 yields 2.44 tokens in 1.3 s, k=1 1.8 in 1.15 s, k=0 1 in 1 s
    assert schedule.expected_tokens_per_s(2, 1) == pytest.approx(expected_rate(0.8, 2, 2 * 0.1 + 1.1))
    assert schedule.k_for_step(1) == 2
    # 64 rows: k=1 yields 1.8 tokens in 4.2 s, k=0 1 token in 2 s
    assert schedule.expected_tokens_per_s(1, 64) == pytest.approx(expected_rate(0.8, 1, 0.2 + 4.0))
    assert schedule.k_for_step(64) == 0


def test_measured_steps_correct_the_surface_where_they_were_taken():
    schedule = LoadAwareK(COSTS, k_max=2, prior_alpha=0.8, prior_steps=4.0)
    for _ in range(3):  # steps at k=2 take twice what the surface says, at 1 row
        schedule.observe_step(2, 1, 2 * schedule.modelled_step_s(2, 1))
    assert schedule.correction(2, 1) == pytest.approx(1 + 3 / 4)  # (1 + 2 + 2 + 2) / 4
    assert schedule.correction(1, 1) == schedule.correction(2, 2) == 1.0  # other cells keep the surface
    assert schedule.k_for_step(1) == 1  # 1.8 / 1.15 beats 2.44 / (1.75 x 1.3)
    for _ in range(3 * RATIO_WINDOW):  # the mean follows the recent steps, at most RATIO_WINDOW of them
        schedule.observe_step(2, 1, schedule.modelled_step_s(2, 1))
    assert schedule.correction(2, 1) == pytest.approx(1.0, abs=0.02)  # (1 - 1/32)^94 of the excess is left
    assert schedule.k_for_step(1) == 2


def test_acceptance_is_learned_from_rows_steps():
    schedule = LoadAwareK(COSTS, k_max=2, prior_alpha=0.5, prior_steps=4.0)
    for _ in range(200):
        schedule.next(2, 0, 2)  # every draft rejected
    assert schedule.alpha < 0.05
    assert schedule.k_for_step(1) == 0


class ScriptedPolicy:
    """k per step from a script (0: plain steps), and the steps it was told about."""

    def __init__(self, ks: list[int]) -> None:
        self.ks, self.calls, self.observed = ks, 0, []

    def k_for_step(self, occupancy: int) -> int:
        self.calls += 1
        return self.ks[(self.calls - 1) % len(self.ks)]

    def observe_step(self, k: int, occupancy: int, seconds: float) -> None:
        self.observed.append((k, occupancy, seconds))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("max_len", [None, 160], ids=["dynamic", "static"])
def test_plain_and_speculative_steps_mixed_decode_every_request_as_if_alone(arch, max_len):
    verifier_model = make_model(arch, VOCAB, seed=1, layers=2)
    verifier = CachedModel(verifier_model, VOCAB, max_len=max_len)
    settings = DecodeSettings(20)
    policy = ScriptedPolicy([0, 0, 3, 0, 1, 4, 0, 0, 0, 2])  # the drafter reads the skipped tokens when it drafts
    # the verifier drafts for itself: every draft is accepted only if the drafter read the tokens it skipped
    drafter = ModelDrafter("self", CachedModel(verifier_model, VOCAB, max_len=max_len))
    decoder = SpeculativeDecoder(
        verifier, [drafter], settings, ConstantK(4), Stopwatch(verifier.devices), step_policy=policy
    )
    result = served(decoder, settings, [drafter.name], bucketed=max_len is not None)
    reference = CachedModel(verifier_model, VOCAB)
    for request, record, row in zip(requests(), result.requests, result.results, strict=True):
        assert record.tokens == alone(reference, request, settings), request.request_id
        assert len(row.k_per_step) == len(row.offered_per_step) == row.steps == row.verifier_calls - 1
    assert [step.k for step in result.steps] == [k for k, _, _ in policy.observed]
    assert {k for k, _, _ in policy.observed} == {0, 1, 2, 3, 4} and all(s >= 0 for _, _, s in policy.observed)
    plain = [step for step in result.steps if step.k == 0]
    assert plain and all(step.proposed == step.accepted == 0 for step in plain)
    drafting = [step for step in result.steps if step.k > 0]
    assert all(step.accepted == step.proposed > 0 for step in drafting)
