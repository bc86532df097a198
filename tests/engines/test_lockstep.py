"""The exchange that lets ranks sharing one tensor-parallel engine generate together (``engines.lockstep``), with
threads as the group's ranks and an in-memory all-gather between them."""

from __future__ import annotations

import threading

import pytest

from opd.engines.lockstep import Lockstep, group_ranks, split_outputs


def thread_group(size: int):
    """An all-gather over ``size`` threads: each call returns every member's object in member order."""
    barrier, slots = threading.Barrier(size), [None] * size

    def exchange_for(member: int):
        def exchange(obj):
            slots[member] = obj
            barrier.wait()
            parts = list(slots)
            barrier.wait()  # nobody overwrites a slot before every member has read them all
            return parts

        return exchange

    return exchange_for


def run_group(calls: dict[int, list[list[str]]]) -> tuple[dict, dict]:
    """Each member makes its ``calls`` (lists of requests), then finishes the round. Returns each member's outputs per
    call and the unions each member's engine was asked to generate, in order."""
    size = len(calls)
    exchange_for = thread_group(size)
    outputs, unions = {m: [] for m in calls}, {m: [] for m in calls}

    def member(m: int) -> None:
        def generate(union):
            unions[m].append(list(union))
            return [f"out({r})" for r in union]

        lock = Lockstep(exchange_for(m), m)
        for requests in calls[m]:
            outputs[m].append(lock.request(requests, generate))
        lock.finish_round(generate)

    threads = [threading.Thread(target=member, args=(m,)) for m in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert not any(t.is_alive() for t in threads), "a member is still waiting: the group would hang"
    return outputs, unions


def test_members_asking_different_numbers_of_times_each_get_their_own_outputs():
    calls = {0: [["a", "b"], ["c"], ["d"]], 1: [["x"]], 2: [[], ["y", "z"]]}
    outputs, unions = run_group(calls)
    for m, requests in calls.items():
        assert outputs[m] == [[f"out({r})" for r in call] for call in requests]
    # every member's engine generated the same unions in the same order, as a shared engine requires
    assert unions[0] == unions[1] == unions[2] == [["a", "b", "x"], ["c", "y", "z"], ["d"]]


def test_a_round_in_which_nobody_asks_generates_nothing():
    outputs, unions = run_group({0: [], 1: []})
    assert outputs == {0: [], 1: []} and unions == {0: [], 1: []}


def test_outputs_are_split_back_by_each_members_count():
    assert split_outputs(["a", "b", "c", "d"], [2, None, 0, 2], 0) == ["a", "b"]
    assert split_outputs(["a", "b", "c", "d"], [2, None, 0, 2], 1) == []
    assert split_outputs(["a", "b", "c", "d"], [2, None, 0, 2], 3) == ["c", "d"]


def test_groups_are_consecutive_ranks_that_divide_the_world():
    assert group_ranks(8, 2) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert group_ranks(4, 4) == [[0, 1, 2, 3]]
    with pytest.raises(ValueError, match="do not divide"):
        group_ranks(6, 4)
