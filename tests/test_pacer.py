"""Tests for the pacer (GCRA) and the pause gate on plain numbers: no event loop, no clock."""

from __future__ import annotations

import math

import pytest

from flux_async._exceptions import ValidationError
from flux_async._gate import PauseGate
from flux_async._pacer import DEFAULT_HORIZON, Pacer

# -- Pacer -----------------------------------------------------------------------------


def test_a_fresh_pacer_has_no_startup_burst_and_books_within_the_horizon() -> None:
    """One permit at once, the rest one interval apart, none beyond the horizon (0.25 s)."""
    pacer = Pacer(10.0, burst=5)
    assert [pacer.reserve(0.0) for _ in range(4)] == pytest.approx([0.0, 0.1, 0.2, None])
    assert pacer.last_slot == pytest.approx(0.2)
    # Refused beyond the horizon, nothing was booked: asked again once it is in reach.
    assert pacer.reachable_at() == pytest.approx(0.05)
    assert pacer.reserve(0.05) == pytest.approx(0.3)


def test_n_permits_take_n_minus_1_intervals() -> None:
    """101 permits at 10/s, each taken when due, span exactly 10 s."""
    pacer = Pacer(10.0)
    now = 0.0
    for _ in range(101):
        slot = pacer.reserve(now)
        assert slot is not None
        now = slot
    assert now == pytest.approx(10.0)


def test_a_late_wake_up_does_not_delay_later_slots() -> None:
    """The next slot is one interval after the last one's theoretical time, not after now."""
    pacer = Pacer(10.0)
    assert pacer.reserve(0.0) == 0.0
    assert pacer.reserve(0.05) == pytest.approx(0.1)  # booked ahead
    assert pacer.reserve(0.13) == pytest.approx(0.2)  # woke 0.03 late: still 0.2


def test_idle_credit_is_capped_at_burst() -> None:
    """However long idle, exactly ``burst`` permits are due at once, then pacing resumes."""
    pacer = Pacer(10.0, burst=3)
    assert pacer.take_due(0.0)
    assert not pacer.take_due(0.0)
    assert [pacer.take_due(100.0) for _ in range(4)] == [True, True, True, False]
    assert pacer.reserve(100.0) == pytest.approx(100.1)


def test_unpaced_every_permit_is_due_at_once() -> None:
    """rate=None: take_due always says yes and reserve books ``now``; no burst arithmetic."""
    pacer = Pacer()
    assert pacer.rate is None
    assert all(pacer.take_due(1.0) for _ in range(1000))
    assert pacer.reserve(2.5) == 2.5
    assert (pacer.last_slot, pacer.tat) == (2.5, None)
    pacer.hold_until(10.0)  # nothing to hold while unpaced: the gate alone holds callers
    assert pacer.reserve(3.0) == 3.0


def test_a_cut_applies_from_the_last_slot_booked() -> None:
    """Slower: the next slot is one new interval after the last one booked, bucket full."""
    pacer = Pacer(10.0, burst=2)
    assert [pacer.reserve(0.0), pacer.reserve(0.0)] == pytest.approx([0.0, 0.1])
    pacer.set_rate(5.0, cut=True)  # interval 0.2, tau 0.2
    assert pacer.tat == pytest.approx(0.1 + 0.2 + 0.2)
    assert [pacer.reserve(0.2), pacer.reserve(0.3)] == pytest.approx([0.3, 0.5])


def test_growing_keeps_the_next_slot_and_brings_later_ones_closer() -> None:
    """Faster: ``tat`` is untouched, so the next slot is one old interval on; later ones
    come one new interval apart."""
    pacer = Pacer(5.0)
    assert pacer.reserve(0.0) == 0.0
    pacer.set_rate(10.0)
    assert [pacer.reserve(0.2), pacer.reserve(0.2)] == pytest.approx([0.2, 0.3])


def test_a_cut_of_a_pacer_that_never_booked_leaves_tat_alone() -> None:
    """No slot booked yet: nothing to apply a cut from; the first permit still goes at once."""
    pacer = Pacer(10.0)
    pacer.set_rate(2.0, cut=True)
    assert pacer.tat is None
    assert pacer.reserve(7.0) == 7.0
    fresh = Pacer()
    fresh.take_due(3.0)  # an unpaced grant counts as a slot
    fresh.set_rate(4.0, cut=True)
    assert fresh.reserve(3.0) == pytest.approx(3.25)


def test_hold_until_releases_at_the_paced_rate_without_burst_credit() -> None:
    """After a hold, the first slot is at ``until`` and the rest one interval apart."""
    pacer = Pacer(10.0, burst=3)
    assert pacer.reserve(0.0) == 0.0
    pacer.hold_until(2.0)
    slots = [pacer.reserve(2.0), pacer.reserve(2.0), pacer.reserve(2.0)]
    assert slots == pytest.approx([2.0, 2.1, 2.2])
    pacer.hold_until(1.0)  # an earlier hold never brings slots forward
    assert pacer.reserve(2.0) is None  # 2.3 lies beyond the horizon from 2.0


def test_forget_times_keeps_the_rate() -> None:
    """A new clock: no tat, no last slot, the same rate and a fresh start (no burst)."""
    pacer = Pacer(4.0, burst=2)
    pacer.reserve(1000.0)
    pacer.forget_times()
    assert (pacer.rate, pacer.tat, pacer.last_slot) == (4.0, None, -math.inf)
    assert [pacer.reserve(0.0), pacer.reserve(0.0)] == pytest.approx([0.0, 0.25])


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"rate": 0.0}, "rate"),
        ({"rate": math.inf}, "rate"),
        ({"burst": 0}, "burst"),
        ({"burst": True}, "burst"),
        ({"horizon": 0}, "horizon"),
        ({"horizon": math.nan}, "horizon"),
    ],
)
def test_pacer_validation(kwargs: dict[str, object], name: str) -> None:
    """Impossible settings raise a ValidationError naming the parameter."""
    with pytest.raises(ValidationError) as info:
        Pacer(**kwargs)  # type: ignore[arg-type]
    assert info.value.field == name


def test_pacer_properties_and_repr_show_live_state() -> None:
    """repr() shows the rate, burst, horizon, tat and the last slot as they are now."""
    pacer = Pacer(10.0, burst=2)
    assert (pacer.burst, pacer.horizon) == (2, DEFAULT_HORIZON)
    assert repr(pacer) == "<Pacer rate=10/s burst=2 horizon=0.25s tat=none last_slot=-inf>"
    pacer.reserve(3.0)
    assert repr(pacer) == "<Pacer rate=10/s burst=2 horizon=0.25s tat=3.2 last_slot=3>"
    assert repr(Pacer()) == "<Pacer rate=unpaced burst=1 horizon=0.25s tat=none last_slot=-inf>"


# -- PauseGate -------------------------------------------------------------------------


def test_gate_shuts_until_the_latest_time_and_opens_then() -> None:
    """Open from the start; shut until the latest ``until``; a shorter one never shortens it."""
    gate = PauseGate()
    assert gate.is_open(-1e9)
    assert gate.paused_for(0.0) == 0.0
    gate.shut_until(12.5)
    gate.shut_until(11.0)
    assert gate.pause_until == 12.5
    assert not gate.is_open(12.0)
    assert gate.paused_for(12.0) == 0.5
    assert gate.is_open(12.5)
    assert gate.paused_for(13.0) == 0.0


def test_gate_counts_a_hair_before_the_deadline_as_open() -> None:
    """A timer that fires an ulp or a clock tick early finds the gate open."""
    gate = PauseGate()
    gate.shut_until(0.3)
    assert gate.is_open(0.1 + 0.2 - 1e-12)
    assert not gate.is_open(0.29)


def test_gate_forget_times_opens_it_and_repr_shows_it() -> None:
    """A new clock opens the gate; repr() shows pause_until."""
    gate = PauseGate()
    gate.shut_until(100.0)
    assert repr(gate) == "<PauseGate pause_until=100>"
    gate.forget_times()
    assert gate.is_open(0.0)
    assert repr(gate) == "<PauseGate pause_until=-inf>"
