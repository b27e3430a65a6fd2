"""Noticing that we moved (agent/mobility.py): the decision without I/O."""

from __future__ import annotations

from sipmesh.agent.mobility import Move, MoveDetector, Snapshot


def detector() -> MoveDetector:
    return MoveDetector(Snapshot("10.1.0.2", ("203.0.113.10", 5060)), debounce=0.3, max_delay=1.5)


def test_nothing_pending_means_no_look() -> None:
    d = detector()
    assert d.deadline is None and not d.due(100.0)


def test_a_burst_of_kernel_messages_gives_one_look_after_the_quiet() -> None:
    d = detector()
    for t in (10.0, 10.1, 10.2):
        d.kernel_event(t)
    assert not d.due(10.4)
    assert d.due(10.5)
    assert d.deadline == 10.5


def test_a_burst_that_never_ends_is_looked_at_within_max_delay() -> None:
    d = detector()
    t = 10.0
    while t < 12.0:
        d.kernel_event(t)
        t += 0.2
    assert d.deadline == 11.5 and d.due(11.5)


def test_a_new_local_address_is_a_move() -> None:
    d = detector()
    d.kernel_event(1.0)
    move = d.observe(Snapshot("10.2.0.2"))
    assert isinstance(move, Move) and move.local_changed
    assert move.old.local == "10.1.0.2" and move.new.local == "10.2.0.2"
    assert move.new.public is None   # the old router's mapping says nothing about the new
    assert d.deadline is None
    assert d.current == Snapshot("10.2.0.2")


def test_the_same_address_is_no_move_and_keeps_the_known_public_one() -> None:
    d = detector()
    d.kernel_event(1.0)
    assert d.observe(Snapshot("10.1.0.2")) is None
    assert d.current.public == ("203.0.113.10", 5060)


def test_no_address_between_two_leases_is_no_move_and_the_old_one_stays() -> None:
    d = detector()
    for gap in ("", "127.0.0.1"):
        assert d.observe(Snapshot(gap)) is None
    assert d.current.local == "10.1.0.2"
    assert d.observe(Snapshot("10.1.0.2")) is None   # the same lease came back


def test_a_new_public_address_alone_is_a_move() -> None:
    d = detector()
    move = d.observe(Snapshot("10.1.0.2", ("198.51.100.7", 40000)))
    assert move is not None and not move.local_changed
    assert "198.51.100.7:40000" in str(move)


def test_an_unknown_public_address_is_no_change() -> None:
    d = MoveDetector(Snapshot("10.1.0.2"))
    assert d.observe(Snapshot("10.1.0.2", ("203.0.113.10", 5060))) is None   # first learnt
    assert d.observe(Snapshot("10.1.0.2", None)) is None
    assert d.current.public == ("203.0.113.10", 5060)
