"""Phase timing: nested phases are charged to the innermost one, and the phases add up to the time they cover."""

import time

from opd.training.profiling import PhaseTimer, phase_shares


def test_nested_phase_time_is_not_counted_twice():
    timer = PhaseTimer()
    started = time.perf_counter()
    with timer.phase("student"):
        time.sleep(0.02)
        with timer.phase("teacher"):
            time.sleep(0.05)
    with timer.phase("student"):
        time.sleep(0.01)
    total = time.perf_counter() - started
    seconds = timer.pop()
    assert set(seconds) == {"student", "teacher"}
    assert 0.05 <= seconds["teacher"] < 0.05 + 0.03
    assert 0.03 <= seconds["student"] < 0.03 + 0.03
    assert abs(sum(seconds.values()) - total) < 0.01
    assert timer.pop() == {}


def test_a_failing_phase_is_still_charged_and_closed():
    timer = PhaseTimer()
    try:
        with timer.phase("sample"):
            time.sleep(0.01)
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    with timer.phase("optimizer"):
        pass
    seconds = timer.pop()
    assert seconds["sample"] >= 0.01 and "optimizer" in seconds


def test_shares_sum_to_one():
    shares = phase_shares({"a": 1.0, "b": 3.0})
    assert shares == {"a": 0.25, "b": 0.75}
    assert phase_shares({}) == {}
