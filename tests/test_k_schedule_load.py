"""k_schedule=load: the choice of k per step from the cost surface, its correction by measured steps, and the
speculative decoder's plain steps (k = 0) and changing k, exact against lone decodes."""

from __future__ import annotations

import itertools
import math
from collections import Counter
from dataclasses import replace

import pytest

from specbench.engine import CachedModel, ConstantK, DecodeSettings, ModelDrafter
from specbench.engine.costs import StepCosts
from specbench.engine.decode import SpeculativeDecoder
from specbench.engine.results import EngineRequest
from specbench.engine.sampling import TokenChooser
from specbench.engine.schedule import StepState
from specbench.engine.timing import Stopwatch
from specbench.load.k_schedule import RATIO_WINDOW, LoadAwareK
from specbench.load.model import quantile_steps
from specbench.testing import ScriptedPolicy, make_model, one_torch_thread
from tests.test_continuous import PROMPTS, VOCAB, alone, requests, served

single_thread = pytest.fixture(autouse=True, scope="module")(one_torch_thread)

# At 1 row the verify pass is almost flat in its tokens; at 64 rows it grows by a full step per token.
COSTS = StepCosts(
    verify_s={1: {1: 1.0, 2: 1.05, 3: 1.1}, 64: {1: 2.0, 2: 4.0, 3: 6.0}},
    draft_s={1: {"draft": 0.1}, 64: {"draft": 0.2}},
)


def seconds_per_token(alpha: float, k: int, step_s: float) -> float:
    return step_s / sum(alpha**i for i in range(k + 1))


def priced(schedule: LoadAwareK, k: int, step_s: float) -> float:
    """What the schedule should price a step of `step_s` seconds at k: drafting at the upper end of alpha's interval."""
    return seconds_per_token(schedule.alpha_bound, k, step_s)


def caught_up(occupancy: int) -> StepState:
    """A batch whose drafters have read everything (right after a drafting step), rows 64 tokens from their end."""
    return StepState(occupancy, unread_tokens=0, remaining_tokens=64, output_tokens=128)


def measured_at_0_8() -> LoadAwareK:
    """A schedule whose alpha, 0.8, has been measured on 200 rows' steps (500 drafted tokens): its upper bound is
    0.83."""
    schedule = LoadAwareK(COSTS, k_max=2, slots=128, prior_alpha=0.8, prior_steps=4.0)
    for accepted in (4, 0) * 100:  # 4 accepted drafts and 1 rejection a pair: alpha stays 0.8
        schedule.next(4, accepted, 4)
    return schedule


def test_the_choice_by_hand_drafts_at_one_row_and_not_at_a_full_batch():
    schedule = measured_at_0_8()
    assert schedule.alpha == pytest.approx(0.8)
    assert 0.8 < schedule.alpha_bound < 0.84
    # one row: k=2 yields about 2.5 tokens in 1.3 s, k=1 1.8 in 1.15 s, k=0 1 in 1 s
    assert schedule.seconds_per_token(2, caught_up(1)) == pytest.approx(priced(schedule, 2, 2 * 0.1 + 1.1))
    assert schedule.k_for_step(caught_up(1)) == 2
    # 64 rows: k=1 yields 1.8 tokens in 4.2 s, k=0 1 token in 2 s
    assert schedule.seconds_per_token(1, caught_up(64)) == pytest.approx(priced(schedule, 1, 0.2 + 4.0))
    assert schedule.k_for_step(caught_up(64)) == 0


def near_tie(slots: int, kind: type[LoadAwareK] = LoadAwareK) -> LoadAwareK:
    """At 64 rows k = 1 is a shade cheaper than a plain step on the mean: 3.6 s for 1.83 tokens, against 2 s for 1;
    alpha measured at 0.8 on 200 rows' steps (the bound is 0.83). `kind`: the policy, or a variant of it."""
    costs = StepCosts(verify_s={64: {1: 2.0, 2: 3.4}}, draft_s={64: {"draft": 0.2}})
    schedule = kind(costs, k_max=1, slots=slots, prior_alpha=0.8)
    for accepted in (4, 0) * 100:
        schedule.next(4, accepted, 4)
    return schedule


def test_at_a_full_batch_drafting_is_priced_by_the_row_unlucky_at_p99():
    below, full = near_tie(slots=128), near_tie(slots=64)
    state = StepState(64, unread_tokens=0, remaining_tokens=32, output_tokens=64)
    assert below.priced_tokens(1, state) == pytest.approx(1 + below.alpha_bound)
    assert below.k_for_step(state) == 1
    # every slot taken: the p99 row of 63 decoded tokens needs more steps than the mean's 34, so fewer tokens a step
    unlucky_steps = quantile_steps(round(full.alpha_bound, 3), 1, 63)
    assert unlucky_steps > 63 / (1 + full.alpha_bound) + 2
    assert full.priced_tokens(1, state) == pytest.approx(63 / unlucky_steps)
    assert full.seconds_per_token(1, state) == pytest.approx(3.6 * unlucky_steps / 63)
    assert full.seconds_per_token(0, state) == pytest.approx(2.0)  # a plain step yields one token, full or not
    assert full.k_for_step(state) == 0


def test_where_the_limits_spread_the_p99_rows_luck_adds_to_their_scatter_in_variance():
    """Rows whose output limits differ leave apart under the baseline too: the unlucky row's steps past the mean, a,
    and the limits' scatter at p99, b (in steps at k), add in variance, so drafting is priced at mean + hypot(a, b) - b
    steps, between the mean and the p99 row, nearer the mean the more the limits spread."""
    schedule = near_tie(slots=64)

    def full(limits_std: float) -> StepState:
        return StepState(64, unread_tokens=0, remaining_tokens=32, output_tokens=64, output_tokens_std=limits_std)

    alpha = round(schedule.alpha_bound, 3)
    mean_tokens = 1 + alpha
    mean_steps, unlucky_steps = 63 / mean_tokens, quantile_steps(alpha, 1, 63)
    luck, scatter = unlucky_steps - mean_steps, 2.326348 * 18.5 / mean_tokens  # z99 = 2.326
    priced_steps = mean_steps + math.hypot(luck, scatter) - scatter
    assert schedule.priced_tokens(1, full(18.5)) == pytest.approx(63 / priced_steps)
    assert schedule.priced_tokens(1, full(0.0)) == pytest.approx(63 / unlucky_steps)  # equal limits: the p99 row
    prices = [schedule.priced_tokens(1, full(limits_std)) for limits_std in (0.0, 4.0, 18.5, 1000.0)]
    assert prices == sorted(prices) and prices[-1] == pytest.approx(mean_tokens, rel=1e-3)
    assert schedule.k_for_step(full(18.5)) == 1 and schedule.k_for_step(full(0.0)) == 0


def test_at_a_full_batch_drafting_is_corrected_at_the_upper_end_of_its_corrections_interval():
    """A wrong draft at a full batch costs every row's tail: there a drafting k's correction is the upper end of its
    median's 95% interval. With spread limits k = 1 is 1% cheaper than a plain step at the median; steps measured
    6% either side of the surface put that end at 1.06, and the full batch goes plain. Below a full batch the
    median stands, and so it does where the steps were measured alike."""
    spread = StepState(64, unread_tokens=0, remaining_tokens=32, output_tokens=64, output_tokens_std=18.5)
    noisy, alike = near_tie(slots=64), near_tie(slots=64)
    for ratio in (0.94, 1.06) * 8:
        noisy.observe_step(1, 64, 3.6 * ratio)
    for _ in range(16):
        alike.observe_step(1, 64, 3.6)
    assert noisy.corrections[(1, 6)] == pytest.approx(1.0)  # the median, 17 ratios with the surface's 1 first
    assert noisy.correction(1, 64) == pytest.approx(1.06) and noisy.correction(0, 64) == 1.0
    assert noisy.k_for_step(spread) == 0
    assert noisy.correction(1, 32) == pytest.approx(1.0) and noisy.k_for_step(replace(spread, occupancy=32)) == 1
    assert alike.correction(1, 64) == pytest.approx(1.0) and alike.k_for_step(spread) == 1


def test_a_batch_the_arrivals_will_fill_is_priced_as_the_full_batch_it_will_be():
    """Little's law: requests arriving at rate x keep x L rows busy, L a request's life at full-batch plain steps
    (127 decoded tokens of 2 s here: 254 s). From 64 rows on (the slots) one row is priced as the full batch of 64,
    where a plain step wins, instead of alone, where k = 2 does."""
    schedule = LoadAwareK(COSTS, k_max=2, slots=64, prior_alpha=0.8, prior_steps=4.0)
    for accepted in (4, 0) * 100:
        schedule.next(4, accepted, 4)

    def at(now_s: float, arrived: int) -> StepState:
        return StepState(1, unread_tokens=0, remaining_tokens=64, output_tokens=128, now_s=now_s, arrived=arrived)

    assert schedule.k_for_step(at(127.0, 16)) == 2  # 16 arrivals in 127 s keep 32 rows busy: priced as one row
    assert schedule.demand_rows == pytest.approx(16 / 127 * 254)
    assert schedule.k_for_step(at(130.0, 40)) == 0  # 40 in 130 s keep 78: priced as 64 rows, plain
    # the window is the last lifetime (back to the last step before it): none arrived since 130 s, no rate
    assert schedule.k_for_step(at(400.0, 40)) == 2 and schedule.demand_rows == 0
    # a burst of 7 gives no rate (too few to count); the clock going back starts another trace's window
    assert schedule.k_for_step(at(0.001, 7)) == 2 and schedule.demand_rows == 0
    assert schedule.k_for_step(at(0.002, 8)) == 0  # 8 in 2 ms: a rate of 4000 a second
    # a batch already full is priced as it is, arrivals or none
    assert schedule.k_for_step(caught_up(64)) == 0


def test_a_batch_that_only_drains_is_priced_by_its_p99_row_too():
    """No request arrived over the last lifetime (63 decoded tokens at plain steps of 2 s: 126 s): no queue is left
    for drafting to keep short, so 64 rows of 128 slots are priced by their p99 row, as a full batch is."""
    schedule = near_tie(slots=128)

    def at(now_s: float, arrived: int) -> StepState:
        return StepState(64, unread_tokens=0, remaining_tokens=32, output_tokens=64, now_s=now_s, arrived=arrived)

    assert schedule.k_for_step(at(10.0, 3)) == 1  # too few arrivals for a rate, but arrivals: the mean's price
    assert not schedule.draining
    assert schedule.k_for_step(at(100.0, 3)) == 1  # none since 10 s, but 10 s is within the lifetime
    assert schedule.k_for_step(at(137.0, 3)) == 0 and schedule.draining  # none over the last 126 s: plain at p99
    assert schedule.k_for_step(at(138.0, 4)) == 1 and not schedule.draining  # one arrived: the mean again
    assert schedule.k_for_step(StepState(64, 0, 32, 64)) == 1  # outside a served trace nothing arrives: never draining


def test_measured_steps_correct_the_surface_where_they_were_taken_and_nearby():
    schedule = measured_at_0_8()
    assert schedule.correction(2, 1) == 1.0  # nothing ran: the surface
    for _ in range(3):  # steps at k=2 take twice what the surface says, at 1 row
        schedule.observe_step(2, 1, 2 * schedule.modelled_step_s(2, 1))
    assert schedule.correction(2, 1) == pytest.approx(2.0)  # the surface worth one step: median of 1, 2, 2, 2
    assert schedule.correction(1, 1) == pytest.approx(2.0)  # another draft length at the bucket borrows its r
    assert schedule.correction(2, 2) == pytest.approx(2.0)  # so does drafting at a bucket not yet run
    assert schedule.correction(0, 1) == 1.0  # a plain step is never priced by a drafting one's: trying it is cheap
    assert schedule.k_for_step(caught_up(1)) == 0  # 1 s a token beats 2 x 1.3 / 2.5 and 2 x 1.15 / 1.8
    schedule.observe_step(1, 1, 1.2 * schedule.modelled_step_s(1, 1))
    assert schedule.correction(1, 1) == pytest.approx(1.1)  # median of 1, 1.2: its own, once run
    schedule.observe_step(2, 64, schedule.modelled_step_s(2, 64))
    assert schedule.correction(2, 64) == pytest.approx(1.0)
    assert schedule.correction(2, 32) == pytest.approx(1.0)  # nearer to 64's bucket than to 1's
    assert schedule.correction(1, 32) == pytest.approx(1.0)  # the nearest bucket before the nearest k
    schedule.observe_step(0, 1, 3 * schedule.modelled_step_s(0, 1))
    assert schedule.correction(0, 1) == pytest.approx(2.0)
    assert schedule.corrections == pytest.approx({(2, 0): 2.0, (1, 0): 1.1, (2, 6): 1.0, (0, 0): 2.0})
    assert schedule.correction(0, 2) == 1.0  # nor by another bucket's plain steps


def test_one_slow_step_does_not_condemn_a_draft_length_and_the_correction_follows_the_recent_steps():
    schedule = measured_at_0_8()
    for ratio in (1.0, 10.0, 1.0):  # a stall in the middle of steps that match the surface
        schedule.observe_step(2, 1, ratio * schedule.modelled_step_s(2, 1))
    assert schedule.correction(2, 1) == pytest.approx(1.0)  # a mean would say 3.25
    assert schedule.k_for_step(caught_up(1)) == 2
    for _ in range(RATIO_WINDOW):  # the surface became wrong: only the last RATIO_WINDOW steps count
        schedule.observe_step(2, 1, 3 * schedule.modelled_step_s(2, 1))
    assert schedule.correction(2, 1) == pytest.approx(3.0)
    assert schedule.k_for_step(caught_up(1)) == 0


def test_the_read_cost_is_fitted_to_the_reads_and_a_size_alone_is_scaled():
    schedule = LoadAwareK(COSTS, k_max=2, slots=128)
    assert schedule.read_s(100) == 0.0  # nothing read yet: switching looks free
    schedule.observe_read(10, 0.2)
    assert schedule.read_s(20) == pytest.approx(0.4)  # one size: proportional
    for tokens in (10, 50, 200, 10, 50):  # R(u) = 0.1 + 0.01 u
        schedule.observe_read(tokens, 0.1 + 0.01 * tokens)
    assert schedule.read_s(100) == pytest.approx(1.1, rel=0.02)  # the first read, 0.2 at 10, weighs in a little


def test_a_plain_run_is_left_only_when_drafting_earns_back_the_reading_it_skipped():
    schedule = measured_at_0_8()
    schedule.observe_read(100, 10.0)  # reading 100 skipped tokens takes 10 s
    behind = StepState(occupancy=1, unread_tokens=100, remaining_tokens=20, output_tokens=64)
    # drafting saves about 1 - 1.3 / 2.5 = 0.48 s a token; over 20 tokens that is 9.6 s, less than the 10 s read
    assert schedule.k_for_step(behind) == 0
    assert schedule.seconds_per_token(2, behind) == pytest.approx(priced(schedule, 2, 1.3) + 10 / 20)
    longer = StepState(1, unread_tokens=100, remaining_tokens=40, output_tokens=64)
    assert schedule.k_for_step(longer) == 2  # 19 s saved
    assert schedule.k_for_step(caught_up(1)) == 2


def test_a_prior_that_favours_plain_steps_does_not_keep_the_run_from_drafting():
    schedule = LoadAwareK(COSTS, k_max=2, slots=128, prior_alpha=0.2, prior_steps=4.0)
    for _ in range(4):  # at 64 rows and alpha 0.2 the model says plain, but alpha has not been measured yet
        assert schedule.seconds_per_token(0, caught_up(64)) < schedule.seconds_per_token(1, caught_up(64))
        assert schedule.k_for_step(caught_up(64)) == 1
        schedule.next(1, 0, 1)  # each row's draft rejected
    assert schedule.k_for_step(caught_up(64)) == 0  # measured on 4 rows' steps: plain
    offers_nothing = LoadAwareK(COSTS, k_max=2, slots=128, prior_alpha=0.2, prior_steps=4.0)
    assert [offers_nothing.k_for_step(caught_up(64)) for _ in range(5)] == [1, 1, 1, 1, 0]  # no offer, no lesson


def test_an_estimate_that_unlucky_drafts_pulled_low_does_not_stop_drafting_for_good():
    schedule = LoadAwareK(COSTS, k_max=2, slots=128, prior_alpha=0.5, prior_steps=4.0)
    for k in (1, 2):  # at one row drafting costs 1.5x the surface
        for _ in range(3):
            schedule.observe_step(k, 1, 1.5 * schedule.modelled_step_s(k, 1))
    for accepted in (1, 0) * 4:  # 8 rows drafted k = 1 once: 4 accepted, 4 rejected
        schedule.next(1, accepted, 1)
    assert schedule.alpha == pytest.approx(0.5)
    # at the estimate every drafting k loses to a plain step (1 s a token) ...
    assert min(seconds_per_token(0.5, k, 1.5 * schedule.modelled_step_s(k, 1)) for k in (1, 2)) > 1.0
    # ... but 8 drafts (and the prior's 8) say little: priced at the upper end of alpha's interval, it drafts
    assert schedule.alpha_bound > 0.7
    assert schedule.k_for_step(caught_up(1)) == 2
    for accepted in (1, 0) * 200:  # a draft that really is accepted half the time: the bound comes down to it
        schedule.next(1, accepted, 1)
    assert schedule.alpha_bound < 0.56
    assert schedule.k_for_step(caught_up(1)) == 0


def test_acceptance_is_learned_from_rows_steps():
    schedule = LoadAwareK(COSTS, k_max=2, slots=128, prior_alpha=0.5, prior_steps=4.0)
    for _ in range(200):
        schedule.next(2, 0, 2)  # every draft rejected
    assert schedule.alpha < 0.05
    assert schedule.k_for_step(caught_up(1)) == 0


def test_the_drafter_reads_skipped_tokens_so_that_it_proposes_as_if_it_had_never_skipped():
    model = make_model("llama", VOCAB, seed=2, layers=1)
    contexts = [PROMPTS[0][:8], PROMPTS[3], PROMPTS[1]]
    skipping = ModelDrafter("skipping", CachedModel(model, VOCAB))
    skipping.prefill(contexts)
    grown = [context + [11, 12, 13][: 3 - row] for row, context in enumerate(contexts)]  # 3, 2 and 1 tokens skipped
    skipping.catch_up([grown[0], [], grown[2]])  # the empty row is not read
    assert skipping.model.lengths == [len(grown[0]) - 1, len(contexts[1]) - 1, len(grown[2]) - 1]
    fresh = ModelDrafter("fresh", CachedModel(model, VOCAB))
    fresh.prefill(grown)
    greedy = [TokenChooser(DecodeSettings(3), seed) for seed in range(3)]
    assert [p.tokens for p in skipping.propose(grown, [3, 3, 3], greedy)] == [
        p.tokens for p in fresh.propose(grown, [3, 3, 3], greedy)
    ]


FRESH_BATCHES = 2  # the trace's last request arrives after the batch has emptied: it starts a second batch


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
    # the policy sees the running rows' output limits, their mean and spread: requests 0 and 1 (12 and 20) first, the
    # last alone
    assert (policy.states[0].output_tokens, policy.states[-1].output_tokens) == (16, 5)
    assert (policy.states[0].output_tokens_std, policy.states[-1].output_tokens_std) == (4, 0)
    # and the scheduler's clock with the requests arrived by then: all of them once the last one runs
    arrivals = sorted(request.arrival_s for request in requests())
    assert all(state.arrived == sum(at <= state.now_s for at in arrivals) for state in policy.states)
    assert [state.now_s for state in policy.states] == sorted(state.now_s for state in policy.states)
    assert policy.states[-1].arrived == len(arrivals)
    assert {k for k, _, _ in policy.observed} == {0, 1, 2, 3, 4} and all(s >= 0 for _, _, s in policy.observed)
    plain = [step for step in result.steps if step.k == 0]
    assert plain and all(step.proposed == step.accepted == 0 for step in plain)
    drafting = [step for step in result.steps if step.k > 0]
    assert all(step.accepted == step.proposed > 0 for step in drafting)
    # after a drafting step only rows that joined since are unread; every step that drafted with tokens unread
    # (joined rows', or plain steps') read them, priced apart from its step (the other reads are the drafters'
    # prefills of a fresh batch)
    ks = [k for k, _, _ in policy.observed]
    after_drafting = [state for previous, state in zip(ks[:-1], policy.states[1:], strict=True) if previous > 0]
    assert after_drafting and any(state.unread_tokens == 0 for state in after_drafting)
    assert any(state.unread_tokens for state in after_drafting)  # a row joined right after a drafting step
    reading = [state.unread_tokens for k, state in zip(ks, policy.states, strict=True) if k > 0 and state.unread_tokens]
    assert any(previous == 0 < k for previous, k in itertools.pairwise(ks))  # switches back to drafting
    assert len(policy.reads) == len(reading) + FRESH_BATCHES
    assert Counter(reading) <= Counter(tokens for tokens, _ in policy.reads)
    assert all(tokens > 0 and seconds >= 0 for tokens, seconds in policy.reads)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("max_len", [None, 160], ids=["dynamic", "static"])
def test_plain_steps_read_ahead_under_a_step_policy_and_decode_every_request_as_if_alone(arch, max_len):
    """A plain step queues the next forward when the policy's next k is 0 (as on a GPU): rows join, leave and
    the batch is re-formed while a forward is queued, and drafting resumes after queued plain steps."""
    verifier_model = make_model(arch, VOCAB, seed=1, layers=2)
    verifier = CachedModel(verifier_model, VOCAB, max_len=max_len)
    free = alone(verifier, requests()[1], DecodeSettings(20))
    settings = DecodeSettings(20, eos_token_ids=frozenset({free[9]}))  # a queued forward fed one token too many
    policy = ScriptedPolicy([0, 0, 0, 2, 0, 0, 0, 0, 3])
    drafter = ModelDrafter("self", CachedModel(verifier_model, VOCAB, max_len=max_len))
    decoder = SpeculativeDecoder(
        verifier, [drafter], settings, ConstantK(4), Stopwatch(verifier.devices), step_policy=policy, read_ahead=True
    )
    while_queued: set[str] = set()  # what the scheduler did to the batch while a plain forward was queued
    for name in ("admit", "release", "keep_rows", "step"):
        method = getattr(decoder, name)

        def spied(*args, _method=method, _name=name):
            if decoder._plain.queued is not None:
                while_queued.add(_name)
            return _method(*args)

        setattr(decoder, name, spied)
    result = served(decoder, settings, [drafter.name], bucketed=max_len is not None)
    reference = CachedModel(verifier_model, VOCAB)
    for request, record in zip(requests(), result.requests, strict=True):
        assert record.tokens == alone(reference, request, settings), request.request_id
    assert while_queued == {"admit", "release", "keep_rows", "step"}
    ks = [step.k for step in result.steps]
    assert 0 in ks and {2, 3} <= set(ks)
    assert all(step.accepted == step.proposed > 0 for step in result.steps if step.k)
    # queued plain steps are not timed for the policy (their host work overlaps the forward): only drafting steps
    assert [k for k, _, _ in policy.observed] == [k for k in ks if k]


@pytest.mark.parametrize("read_ahead", [False, True])
def test_a_row_that_joined_early_in_a_long_plain_run_leaves_room_for_the_catch_up(read_ahead):
    """A catch-up forward adds its widest feed to every row's columns: were a row that joined early in a plain
    run (many tokens, none to catch up) read first, the other rows' catch-up would overflow the static cache."""
    max_len = 120  # holds either row alone (75 + 30 and 4 + 40 tokens), not 75 + 26 with 26 more columns
    verifier_model = make_model("llama", VOCAB, seed=1, layers=2)
    verifier = CachedModel(verifier_model, VOCAB, max_len=max_len)
    settings = DecodeSettings(40)
    trace = [EngineRequest(0, 0.0, PROMPTS[4], 40, seed=0), EngineRequest(1, 3.0, PROMPTS[2], 30, seed=1)]
    policy = ScriptedPolicy([2] + [0] * 25 + [3])
    drafter = ModelDrafter("self", CachedModel(verifier_model, VOCAB, max_len=max_len))
    decoder = SpeculativeDecoder(
        verifier,
        [drafter],
        settings,
        ConstantK(4),
        Stopwatch(verifier.devices),
        step_policy=policy,
        read_ahead=read_ahead,
    )
    result = served(decoder, settings, [drafter.name], bucketed=True, max_batch_size=2, trace=trace)
    reference = CachedModel(verifier_model, VOCAB)
    for request, record in zip(trace, result.requests, strict=True):
        assert record.tokens == alone(reference, request, settings), request.request_id
    switch = next(step for step in result.steps[1:] if step.k)  # the first drafting step after the plain run
    assert switch.rows == 2 and switch.accepted == switch.proposed > 0
