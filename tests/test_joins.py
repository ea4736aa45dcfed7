"""The join gates: a join's cost line fitted to what joins took, and when coalesced joins let requests in."""

from __future__ import annotations

import pytest

from specbench.engine.costs import CostLine
from specbench.engine.joins import CoalescedJoins, DelayedJoins, EagerJoins, make_join_gate


def test_the_cost_line_fits_a_fixed_part_and_a_slope_and_falls_back_where_it_cannot():
    line = CostLine()
    assert line.coefficients == (0.0, 0.0)  # nothing observed
    line.observe(10, 0.3)
    assert line.coefficients == pytest.approx((0.0, 0.03))  # one size: proportional
    for units in (20, 30, 40):
        line.observe(units, 0.2 + 0.01 * units)
    assert line.coefficients == pytest.approx((0.2, 0.01))  # the first point was on the line too
    assert line.predict(50) == pytest.approx(0.7)
    recent, lasting = CostLine(window=4), CostLine(window=10_000)
    for fit in (recent, lasting):
        fit.observe(10, 1.0)  # an old outlier: in `recent` its weight falls by a quarter at every later join
        for units in (10, 20, 30, 10, 20, 30, 10, 20, 30):
            fit.observe(units, 0.2 + 0.01 * units)
    assert abs(recent.coefficients[0] - 0.2) < abs(lasting.coefficients[0] - 0.2) / 2
    cheaper = CostLine()
    cheaper.observe(10, 0.5)
    cheaper.observe(20, 0.3)
    assert cheaper.coefficients[1] == 0.0 and 0.3 < cheaper.coefficients[0] < 0.5  # bigger not dearer: the mean
    steep = CostLine()
    steep.observe(10, 0.1)
    steep.observe(20, 0.5)
    assert steep.coefficients[0] == 0.0 and steep.coefficients[1] > 0  # a negative fixed part: through the origin


def test_coalesced_joins_wait_until_the_requests_waited_as_long_as_the_rows_would_stall():
    gate = CoalescedJoins()
    assert gate.ready(1.0, 4, [0.5])  # no join timed yet: no fixed part known, at once
    gate.joined(1.0, 0.3, 10, into_running=True)
    assert gate.ready(2.0, 4, [1.5])  # one size seen: still no fixed part
    gate.joined(2.0, 0.5, 30, into_running=True)
    gate.joined(3.0, 0.7, 50, into_running=True)
    assert gate.fixed_s == pytest.approx(0.2)  # 0.2 s + 0.01 s a token, from the joins into a running batch
    gate.joined(3.0, 9.0, 10, into_running=False)  # a fresh batch's prefill: not a join's cost
    assert gate.fixed_s == pytest.approx(0.2)
    # 4 running rows would stall 4 x 0.2 = 0.8 row-seconds: the joinable requests' waits must add up to that
    assert not gate.ready(10.0, 4, [])
    assert not gate.ready(10.5, 4, [10.2, 10.4])  # 0.3 + 0.1
    assert gate.ready(10.7, 4, [10.2, 10.4, 10.6])  # + 0.2 + 0.2 + 0.1 = 0.9
    gate.joined(10.7, 0.5, 30, into_running=True)
    assert not gate.ready(10.8, 4, [10.75])  # the count starts again after a join
    assert gate.ready(10.8, 0, [10.75])  # an empty batch takes them at once
    gate.joined(10.8, 0.5, 30, into_running=False)
    assert not gate.ready(11.0, 1, [10.9])  # one running row would stall 0.2 s; 0.1 waited
    assert gate.ready(11.2, 1, [10.9])  # 0.1 + 0.2


def test_make_join_gate_gives_one_gate_and_refuses_two_ways_at_once():
    assert isinstance(make_join_gate(), EagerJoins)
    assert isinstance(make_join_gate(2.0), DelayedJoins)
    assert isinstance(make_join_gate(coalesce=True), CoalescedJoins)
    assert make_join_gate(coalesce=True) is not make_join_gate(coalesce=True)  # each serve needs its own
    with pytest.raises(ValueError, match="choose one"):
        make_join_gate(2.0, coalesce=True)
    with pytest.raises(ValueError, match="0 \\(no delay\\) or more"):
        make_join_gate(-1.0)
