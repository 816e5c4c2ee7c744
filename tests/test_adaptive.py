"""Tests for the adaptive controller on plain numbers: no event loop, no clock, no pacer
unless a test wants one; `Target` stands in for any pacer (an in-process or a shared one)."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest

from flux_async._adaptive import (
    DEFAULT_DECREASE_FACTOR,
    DEFAULT_PROBE_GROWTH,
    PAUSE_DECREASE_FACTOR,
    PAUSE_HOLD,
    AdaptiveController,
    RateTarget,
)
from flux_async._exceptions import ValidationError
from flux_async._pacer import Pacer

OPEN = -math.inf  # `gate_opened` for a gate that was never shut


class Target:
    """A `RateTarget` that records every change: what a Redis pacer would be told."""

    def __init__(self, rate: float | None = None) -> None:
        self.rate: float | None = rate
        self.calls: list[tuple[float, bool]] = []

    def set_rate(self, rate: float, *, cut: bool = False) -> None:
        self.rate = rate
        self.calls.append((rate, cut))


def at(t: float) -> Callable[[], float]:
    """A clock that reads ``t``."""
    return lambda: t


def grants(controller: AdaptiveController, start: float, stop: float, rate: float) -> None:
    """Grants at ``rate`` per second from ``start`` up to ``stop`` (inclusive)."""
    k = 0
    while start + k / rate <= stop + 1e-9:
        controller.on_grant(start + k / rate)
        k += 1


def test_a_cut_drives_any_rate_target() -> None:
    """Unpaced at 20/s, an overload 429 sets 0.7 * 20 = 14/s as a cut; the target is not a
    Pacer, only something with ``rate`` and ``set_rate``."""
    target = Target()
    _: RateTarget = target  # type-checks as the protocol
    controller = AdaptiveController(target, ceiling=None, decrease_factor=0.7, tolerance=0)
    grants(controller, 0.0, 2.0, 20.0)
    assert controller.on_rate_limited(2.025, gate_opened=OPEN)
    assert target.calls == [(pytest.approx(14.0), True)]
    assert controller.cuts == 1


def test_one_cut_per_window() -> None:
    """Many 429s within a window make one cut; one a full window later makes another."""
    target = Target(10.0)
    controller = AdaptiveController(target, ceiling=10.0)
    grants(controller, 0.0, 2.0, 10.0)
    for _ in range(5):
        assert controller.on_rate_limited(2.05, gate_opened=OPEN)
    assert (controller.cuts, target.rate) == (1, pytest.approx(10 * DEFAULT_DECREASE_FACTOR))
    controller.on_rate_limited(3.0, gate_opened=OPEN)
    assert controller.cuts == 1
    controller.on_rate_limited(3.05, gate_opened=OPEN)
    assert controller.cuts == 2


def test_a_429_within_tolerance_is_not_overload() -> None:
    """1 429 among 40 grants is retried (False: no shared pause, no cut); 3 are overload."""
    target = Target(40.0)
    controller = AdaptiveController(target, ceiling=40.0)
    grants(controller, 0.0, 1.0, 40.0)
    assert not controller.on_rate_limited(1.0, gate_opened=OPEN)
    assert not controller.on_rate_limited(1.0, gate_opened=OPEN)
    assert controller.on_rate_limited(1.0, gate_opened=OPEN)
    assert target.calls == [(pytest.approx(40 * DEFAULT_DECREASE_FACTOR), True)]


def test_a_lone_429_that_pauses_everyone_cuts_deeper_and_holds_growth() -> None:
    """At a held 40/s, one 429 with Retry-After: 2 (it pauses everyone) is overload though
    alone: cut by PAUSE_DECREASE_FACTOR, and no growth for PAUSE_HOLD x 2 s of calm. The
    same 429 without the long Retry-After is tolerated: no cut."""
    target = Target(40.0)
    controller = AdaptiveController(target, ceiling=None)
    grants(controller, 0.0, 3.0, 40.0)
    assert not controller.on_rate_limited(3.0, gate_opened=OPEN)  # tolerated
    assert target.calls == []
    assert controller.on_rate_limited(3.01, gate_opened=OPEN, pause=2.0)
    assert target.calls == [(pytest.approx(40 * PAUSE_DECREASE_FACTOR), True)]
    for t in (5.0, 10.0, 3.01 + PAUSE_HOLD * 2.0):  # the hold, the window after it
        controller.on_success(at(t))
    assert target.rate == pytest.approx(30.0)
    controller.on_success(at(3.01 + PAUSE_HOLD * 2.0 + 1.0))
    assert target.rate > 30.0


def test_the_first_window_after_a_long_pause_cuts_nothing() -> None:
    """A storm: every permit the pause lets out draws a 429 with Retry-After: 2. Those in
    the window after the gate opened say the server still refuses, not that the pace is
    too high: one cut in all, not one a pause down to the floor."""
    target = Target(20.0)
    controller = AdaptiveController(target, ceiling=None)
    grants(controller, 0.0, 2.0, 20.0)
    assert controller.on_rate_limited(2.0, gate_opened=OPEN, pause=2.0)
    assert controller.cuts == 1
    for k in range(1, 10):  # the gate opens every 2 s; one permit, one 429, 50 ms later
        opened = 2.0 + 2.0 * k
        controller.on_grant(opened)
        assert controller.on_rate_limited(opened + 0.05, gate_opened=opened, pause=2.0)
    assert controller.cuts == 1


def test_the_send_rate_is_measured_only_while_the_gate_was_open() -> None:
    """Grants in the 0.5 s since the gate opened, not over the whole window, make the rate;
    under a quarter window of open gate there is no measurement: cut from the rate."""
    target = Target(10.0)
    controller = AdaptiveController(target, ceiling=10.0, decrease_factor=0.5, tolerance=0)
    grants(controller, 0.0, 2.0, 10.0)
    grants(controller, 3.1, 3.5, 10.0)  # 5 grants after the gate opened at 3.0
    controller.on_rate_limited(3.5, gate_opened=3.0)
    assert target.rate == pytest.approx(0.5 * 5 / 0.5)
    other = Target(10.0)
    controller = AdaptiveController(other, ceiling=10.0, decrease_factor=0.5, tolerance=0)
    grants(controller, 0.0, 2.0, 10.0)
    controller.on_rate_limited(3.2, gate_opened=3.0)  # 0.2 s of open gate: too short
    assert other.rate == pytest.approx(5.0)


def test_the_permit_that_began_the_span_counts() -> None:
    """A fresh limiter's one permit, its 429 read 0.3 s later: 1 permit in 0.3 s, so the
    cut is to 0.9 * 3.3/s. Left out of the count, it measured 0/s: cut to min_rate (a
    10 s wait for the retry)."""
    target = Target()
    controller = AdaptiveController(target, ceiling=None, tolerance=0)
    controller.on_grant(5.0)
    assert controller.on_rate_limited(5.3, gate_opened=OPEN)
    assert target.rate == pytest.approx(DEFAULT_DECREASE_FACTOR / 0.3)
    reopened = Target(10.0)
    controller = AdaptiveController(reopened, ceiling=10.0, decrease_factor=0.5, tolerance=0)
    grants(controller, 0.0, 2.0, 10.0)
    grants(controller, 3.0, 3.4, 10.0)  # the first of 5 at the very moment the gate opened
    controller.on_rate_limited(3.5, gate_opened=3.0)
    assert reopened.rate == pytest.approx(0.5 * 5 / 0.5)


def test_a_429_slower_than_a_window_is_measured_where_its_permits_went() -> None:
    """Answers that take longer than a window: the last window holds no permit, so the
    send rate is measured over the window before the newest grant. Measured at the 429,
    both read 0/s and were cut to min_rate."""
    target = Target()
    controller = AdaptiveController(target, ceiling=None, tolerance=0)
    for _ in range(3):
        controller.on_grant(5.0)  # a fresh client's three calls at once...
    assert controller.on_rate_limited(6.5, gate_opened=OPEN)  # ...answered 429 1.5 s later
    assert target.rate == pytest.approx(DEFAULT_DECREASE_FACTOR * 3 / 1.0)
    paced = Target(10.0)
    controller = AdaptiveController(paced, ceiling=10.0, tolerance=0)
    grants(controller, 0.0, 2.0, 10.0)
    assert controller.on_rate_limited(3.5, gate_opened=OPEN)  # 1.5 s after the last grant
    assert paced.rate == pytest.approx(DEFAULT_DECREASE_FACTOR * 10.0)


def test_floors_under_a_cut() -> None:
    """No cut goes below half the recent success rate, nor below min_rate; the ceiling wins
    over a min_rate above it."""
    target = Target(10.0)
    controller = AdaptiveController(target, ceiling=10.0, decrease_factor=0.1)
    for k in range(31):  # 10 grants and successes per second for 3 s
        controller.on_grant(k / 10)
        controller.on_success(at(k / 10))
    controller.on_rate_limited(3.05, gate_opened=OPEN)
    assert target.rate == pytest.approx(5.0, rel=0.1)
    floored = Target(10.0)
    AdaptiveController(floored, ceiling=10.0, min_rate=2.0).on_rate_limited(0.0, gate_opened=OPEN)
    assert floored.rate == 2.0
    per_minute = Target(0.05)
    controller = AdaptiveController(per_minute, ceiling=0.05)  # below min_rate 0.1
    controller.on_rate_limited(0.0, gate_opened=OPEN)
    assert per_minute.rate == pytest.approx(0.05)


def test_recovery_is_additive_up_to_the_ceiling_a_window_after_the_last_overload() -> None:
    """Each success a full window after the last overload 429 or step adds 5 % of the
    ceiling; the clock is read only while recovering."""
    target = Target(10.0)
    controller = AdaptiveController(target, ceiling=10.0, decrease_factor=0.7)
    read: list[float] = []

    def clock(t: float) -> Callable[[], float]:
        def read_clock() -> float:
            read.append(t)
            return t

        return read_clock

    controller.on_success(clock(-1.0))  # not recovering: no step, no clock read
    assert read == []
    controller.on_rate_limited(0.0, gate_opened=OPEN)  # nothing sent: cut to the floor 0.1
    target.rate = 7.0  # as if the cut had measured 10/s
    controller.on_success(clock(0.9))
    assert target.rate == 7.0
    rates = []
    for k in range(1, 8):
        controller.on_success(clock(float(k)))
        rates.append(target.rate)
    assert rates == pytest.approx([7.5, 8.0, 8.5, 9.0, 9.5, 10.0, 10.0])
    assert read == [0.9, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]  # none once back at the ceiling


def test_without_a_ceiling_the_first_cut_probes_then_steps() -> None:
    """From unpaced: x1.25 per calm window until the next cut, then 10 % of the cut rate."""
    target = Target()
    controller = AdaptiveController(target, ceiling=None, decrease_factor=0.7, tolerance=0)
    grants(controller, 0.0, 2.0, 20.0)
    controller.on_rate_limited(2.025, gate_opened=OPEN)  # 14/s, probing
    for k in range(1, 4):
        controller.on_success(at(2.025 + k))
    assert target.rate == pytest.approx(14.0 * DEFAULT_PROBE_GROWTH**3)
    assert "mode=probing" in repr(controller)
    grants(controller, 5.05, 6.0, 20.0)  # 20/s, under the probed 27.3/s
    controller.on_rate_limited(6.0, gate_opened=OPEN)  # a paced cut: probing ends
    cut = target.rate
    assert cut == pytest.approx(0.7 * 20.0)
    controller.on_success(at(7.0))
    assert target.rate == pytest.approx(cut + max(0.5, 0.1 * cut))
    assert "mode=recovering" in repr(controller)


class Server:
    """A single caller sending as fast as a `Pacer` lets it, on plain numbers."""

    def __init__(self, controller: AdaptiveController, pacer: Pacer) -> None:
        self.controller, self.pacer, self.now = controller, pacer, 0.0

    def run(self, seconds: float, accept: Callable[[float], bool]) -> None:
        end = self.now + seconds
        while self.now < end:
            slot = self.pacer.reserve(self.now)
            if slot is None:
                self.now = self.pacer.reachable_at()
                continue
            self.now = slot
            self.controller.on_grant(slot)
            if accept(slot):
                self.controller.on_success(at(slot))
            else:
                self.controller.on_rate_limited(slot, gate_opened=OPEN)


def test_429s_that_do_not_fall_with_the_rate_stop_driving_cuts() -> None:
    """A server refusing 2 of every 3 attempts at any rate: after a quarter off the rate
    without a larger accepted share, cuts stop and the rate is given back."""
    pacer = Pacer(40.0)
    controller = AdaptiveController(pacer, ceiling=40.0)
    counter = iter(range(10**9))
    Server(controller, pacer).run(30.0, lambda _: next(counter) % 3 == 2)
    assert controller.cuts <= 4
    assert controller.futile
    assert "mode=futile" in repr(controller)
    assert pacer.rate is not None
    assert pacer.rate >= 0.75 * 40 * DEFAULT_DECREASE_FACTOR


def test_a_server_at_capacity_is_still_found() -> None:
    """Against a 10/s server the cuts work (a larger share accepted): down to about 10/s."""
    pacer = Pacer(40.0)
    controller = AdaptiveController(pacer, ceiling=40.0)
    accepted: list[float] = []

    def capacity(t: float) -> bool:
        while accepted and accepted[0] <= t - 1.0:
            accepted.pop(0)
        if len(accepted) < 10:
            accepted.append(t)
            return True
        return False

    Server(controller, pacer).run(30.0, capacity)
    assert not controller.futile
    assert pacer.rate is not None
    assert 7.0 <= pacer.rate <= 13.0


def test_forget_times_drops_every_time_of_the_old_clock() -> None:
    """After a new clock, 429s from the old one (at t=1000) neither count nor linger."""
    target = Target(40.0)
    controller = AdaptiveController(target, ceiling=40.0, window=1.0)
    grants(controller, 999.0, 1000.0, 40.0)
    assert not controller.on_rate_limited(1000.0, gate_opened=OPEN)
    assert not controller.on_rate_limited(1000.0, gate_opened=OPEN)
    controller.forget_times()
    grants(controller, 4.0, 5.0, 40.0)
    # Had the old 429s lingered, the first of these would be 3 of 40: overload.
    assert not controller.on_rate_limited(5.0, gate_opened=OPEN)  # 1 of 40: tolerated
    assert not controller.on_rate_limited(5.0, gate_opened=OPEN)  # 2 of 40: 5 %, tolerated
    assert controller.on_rate_limited(5.0, gate_opened=OPEN)  # 3 of 40: overload
    assert controller.cuts == 1


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"ceiling": 0.0}, "ceiling"),
        ({"decrease_factor": 1.0}, "decrease_factor"),
        ({"window": -1.0}, "window"),
        ({"increase": math.inf}, "increase"),
        ({"min_rate": 0}, "min_rate"),
        ({"tolerance": -0.1}, "tolerance"),
    ],
)
def test_controller_validation(kwargs: dict[str, object], name: str) -> None:
    """Impossible settings raise a ValidationError naming the parameter."""
    kwargs.setdefault("ceiling", None)
    with pytest.raises(ValidationError) as info:
        AdaptiveController(Target(), **kwargs)  # type: ignore[arg-type]
    assert info.value.field == name


def test_controller_properties_and_repr_show_live_state() -> None:
    """ceiling, window, cuts and repr() (rate, ceiling, cuts, mode, success rate)."""
    target = Target(10.0)
    controller = AdaptiveController(target, ceiling=10.0, window=2.0)
    assert (controller.ceiling, controller.window, controller.cuts) == (10.0, 2.0, 0)
    assert repr(controller) == (
        "<AdaptiveController rate=10/s ceiling=10/s cuts=0 mode=steady success_rate=0/s>"
    )
    controller.on_rate_limited(0.0, gate_opened=OPEN)
    assert repr(controller) == (
        "<AdaptiveController rate=0.1/s ceiling=10/s cuts=1 mode=recovering success_rate=0/s>"
    )
    unpaced = AdaptiveController(Target(), ceiling=None)
    assert repr(unpaced).startswith("<AdaptiveController rate=unpaced ceiling=none cuts=0")
