"""The gossip core (issue 16) with plain values: HyParView membership, PlumTree broadcast, hostile frames, and a
simulated room (bench/gossip_sim.py) under loss and churn. No sockets, no clock: what each event produces is
the layer's whole behaviour, so the tests read it back."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

import rtchat
from rtchat import (
    CONNECT_TIMEOUT_S,
    DISCONNECT_TIPS,
    GRAFT_RETRY_S,
    GRAFT_WAIT_S,
    IHAVE_MAX_IDS,
    JOIN_WALK_HOPS,
    MAX_MISSING,
    MAX_NEIGHBORS,
    MAX_PASSIVE,
    MAX_SEEN,
    NEIGHBOR_TRIES,
    PASSIVE_WALK_HOPS,
    Broadcast,
    Connect,
    Deliver,
    Disconnect,
    FindContact,
    Gossip,
    Join,
    Leave,
    Merge,
    NeighborDown,
    NeighborUp,
    RecvMessage,
    ScheduleTimer,
    SendMessage,
    Timer,
    TimerExpired,
)

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))
import gossip_sim  # noqa: E402


def node(name: str = "me", seed: int = 1, **options) -> Gossip:
    """A core that has handled its first event (the one that starts its shuffle and repair timers)."""
    core = Gossip(name, random.Random(seed), **options)
    assert {o.timer.kind for o in core.handle(TimerExpired(Timer("none")), 0.0)} == {"shuffle", "repair"}
    return core


def sends(out: list, kind: str | None = None) -> list[tuple[str, dict]]:
    return [(o.peer, o.msg) for o in out if type(o) is SendMessage and (kind is None or o.msg["t"] == kind)]


def of(out: list, cls: type) -> list:
    return [o for o in out if type(o) is cls]


def timers(out: list, kind: str) -> list[Timer]:
    return [o.timer for o in out if type(o) is ScheduleTimer and o.timer.kind == kind]


def with_neighbors(core: Gossip, *peers: str) -> Gossip:
    """Each peer asks to be a neighbour (low priority, so the view has room), then its connection opens."""
    for peer in peers:
        out = core.handle(RecvMessage(peer, {"t": "nbr", "hi": False}), 0.0)
        assert sends(out) == [(peer, {"t": "nbr-re", "ok": True})] and of(out, Connect) == [Connect(peer)]
        core.handle(NeighborUp(peer), 0.0)
    return core


def with_passive(core: Gossip, via: str, *peers: str) -> None:
    """Members reach the passive view the way they do in the room: a shuffle ending here."""
    out = core.handle(RecvMessage(via, {"t": "shuffle", "o": peers[0], "ns": list(peers), "ttl": 0, "k": 7}), 0.0)
    assert sends(out, "shuffle-re")[0][0] == peers[0]


def state(core: Gossip) -> tuple:
    m, t = core.membership, core.tree
    return (dict(m.active), dict(m.passive), dict(m.pending), dict(t.eager), dict(t.lazy), dict(t._missing),
            dict(t._seen))


# -- membership: join --------------------------------------------------------------------------------------

def test_join_makes_newcomer_and_contact_neighbours_on_both_sides():
    newcomer, contact = node("new"), node("old")
    out = newcomer.handle(Join("old"), 0.0)
    assert sends(out) == [("old", {"t": "join"})]
    assert [t.key for t in timers(out, "nbr")] == ["old"]

    out = contact.handle(RecvMessage("new", {"t": "join"}), 0.1)
    assert sends(out) == [("new", {"t": "nbr-re", "ok": True})]
    assert of(out, Connect) == [Connect("new")] and [t.key for t in timers(out, "connect")] == ["new"]

    out = newcomer.handle(RecvMessage("old", {"t": "nbr-re", "ok": True}), 0.2)
    assert of(out, Connect) == [Connect("old")]
    assert newcomer.membership.active == {"old": False} and not newcomer.membership.pending

    newcomer.handle(NeighborUp("old"), 1.0)
    contact.handle(NeighborUp("new"), 1.0)
    assert newcomer.membership.active == {"old": True} and contact.membership.active == {"new": True}
    assert "old" in newcomer.tree.eager and "new" in contact.tree.eager


def test_a_member_of_another_part_is_asked_at_high_priority_and_accepted_by_a_full_view():
    """A split overlay (each part with full views) becomes one: the member that hears another part's member on the
    broker asks it to be a neighbour at high priority; the other makes room by dropping one of its own."""
    here = with_neighbors(node("here", max_neighbors=2), "a", "b")
    out = here.handle(Merge("there"), 0.0)
    assert sends(out) == [("there", {"t": "nbr", "hi": True})] and "there" in here.membership.pending
    assert here.handle(Merge("there"), 0.1) == []  # asked already
    there = with_neighbors(node("there", max_neighbors=2), "c", "d")
    out = there.handle(RecvMessage("here", {"t": "nbr", "hi": True}), 0.2)
    assert ("here", {"t": "nbr-re", "ok": True}) in sends(out) and of(out, Connect) == [Connect("here")]
    dropped = sends(out, "dis")
    assert len(dropped) == 1 and dropped[0][0] in "cd" and dropped[0][1]["alive"] is True
    assert len(there.membership.active) == 2
    out = here.handle(RecvMessage("there", {"t": "nbr-re", "ok": True}), 0.3)
    assert of(out, Connect) == [Connect("there")] and len(sends(out, "dis")) == 1


def test_last_words_go_whole_to_every_neighbour():
    core = with_neighbors(node("me"), "a", "b", "c")
    core.tree.on_prune("b")  # b is a lazy link now: an ordinary message is only announced to it
    assert sorted(p for p, _ in sends(core.handle(Broadcast("m1", 1), 0.0), "gossip")) == ["a", "c"]
    out = core.handle(Broadcast("bye", 2, whole=True), 0.1)
    assert sorted(p for p, _ in sends(out, "gossip")) == ["a", "b", "c"] and not sends(out, "ihave")


def test_a_join_is_walked_from_each_neighbour_of_the_contact():
    contact = with_neighbors(node("old"), "a", "b", "c")
    out = contact.handle(RecvMessage("new", {"t": "join"}), 0.0)
    assert sorted(sends(out, "fwd")) == [(p, {"t": "fwd", "n": "new", "ttl": JOIN_WALK_HOPS}) for p in "abc"]
    again = contact.handle(RecvMessage("new", {"t": "join"}), 0.5)  # its answer was lost: answered, not re-walked
    assert sends(again) == [("new", {"t": "nbr-re", "ok": True})]


def test_a_lost_join_is_sent_again_then_the_contact_is_given_up():
    newcomer = node("new")
    out = newcomer.handle(Join("old"), 0.0)
    for attempt in range(1, NEIGHBOR_TRIES):
        (timer,) = timers(out, "nbr")
        out = newcomer.handle(TimerExpired(timer), 3.0 * attempt)
        assert sends(out) == [("old", {"t": "join"})]
    (timer,) = timers(out, "nbr")
    out = newcomer.handle(TimerExpired(timer), 10.0)
    assert sends(out) == [] and not newcomer.membership.pending and not newcomer.membership.passive
    out = newcomer.handle(TimerExpired(Timer("repair")), 11.0)
    assert of(out, FindContact) == [FindContact()]  # no one left to ask: the Room is asked for a member


def test_a_contact_given_once_we_are_in_is_only_one_more_member_to_repair_from():
    core = with_neighbors(node("me"), "a")
    out = core.handle(Join("later"), 0.0)
    assert sends(out) == [("later", {"t": "nbr", "hi": False})]  # room for more: asked low, no join walk
    full = with_neighbors(node("full"), *[f"p{i}" for i in range(MAX_NEIGHBORS)])
    assert full.handle(Join("later"), 0.0) == [] and "later" in full.membership.passive


def test_forward_join_walks_on_and_ends_in_a_high_priority_request():
    walker = with_neighbors(node("w"), "s", "x", "y")
    out = walker.handle(RecvMessage("s", {"t": "fwd", "n": "new", "ttl": 5}), 0.0)
    ((to, msg),) = sends(out)
    assert to in ("x", "y") and msg == {"t": "fwd", "n": "new", "ttl": 4} and "new" not in walker.membership.passive

    out = walker.handle(RecvMessage("s", {"t": "fwd", "n": "new", "ttl": PASSIVE_WALK_HOPS}), 0.0)
    assert sends(out)[0][1]["ttl"] == PASSIVE_WALK_HOPS - 1 and "new" in walker.membership.passive

    out = walker.handle(RecvMessage("s", {"t": "fwd", "n": "other", "ttl": 0}), 0.0)
    assert sends(out) == [("other", {"t": "nbr", "hi": True})]

    lone = with_neighbors(node("lone"), "s")  # no one to walk on to: the walk ends here
    assert sends(lone.handle(RecvMessage("s", {"t": "fwd", "n": "new", "ttl": 5}), 0.0)) == \
        [("new", {"t": "nbr", "hi": True})]


# -- membership: bounds ------------------------------------------------------------------------------------

def test_the_active_view_never_holds_more_than_d_and_the_dropped_are_told():
    contact = node("old")
    dropped = []
    for index in range(3 * MAX_NEIGHBORS):
        out = contact.handle(RecvMessage(f"n{index}", {"t": "join"}), float(index))
        contact.handle(NeighborUp(f"n{index}"), float(index))
        assert len(contact.membership.active) <= MAX_NEIGHBORS
        for peer, msg in sends(out, "dis"):
            assert msg["alive"] is True and len(msg["ns"]) <= DISCONNECT_TIPS and peer not in msg["ns"]
            assert Disconnect(peer) in out and peer in contact.membership.passive
            dropped.append(peer)
    assert len(dropped) == 2 * MAX_NEIGHBORS


def test_a_full_view_refuses_low_priority_and_makes_room_for_high():
    full = with_neighbors(node("full"), *[f"p{i}" for i in range(MAX_NEIGHBORS)])
    out = full.handle(RecvMessage("late", {"t": "nbr", "hi": False}), 0.0)
    assert sends(out) == [("late", {"t": "nbr-re", "ok": False})] and not of(out, Connect)
    out = full.handle(RecvMessage("alone", {"t": "nbr", "hi": True}), 0.0)
    assert len(sends(out, "dis")) == 1 and of(out, Connect) == [Connect("alone")]
    assert len(full.membership.active) == MAX_NEIGHBORS


def test_the_passive_view_is_bounded_and_shuffles_are_answered():
    core = with_neighbors(node("me"), "a")
    for batch in range(20):
        names = [f"o{batch}"] + [f"p{batch}-{i}" for i in range(7)]
        out = core.handle(RecvMessage("a", {"t": "shuffle", "o": names[0], "ns": names, "ttl": 0, "k": batch}), 0.0)
        ((to, reply),) = sends(out)
        assert to == names[0] and reply["t"] == "shuffle-re" and reply["k"] == batch and len(reply["ns"]) <= 8
        assert len(core.membership.passive) <= MAX_PASSIVE
    assert len(core.membership.passive) == MAX_PASSIVE


def test_our_shuffle_reply_is_taken_once_and_only_with_its_nonce():
    core = with_neighbors(node("me"), "a")
    out = core.handle(TimerExpired(Timer("shuffle")), 0.0)
    ((_, shuffle),) = sends(out, "shuffle")
    assert shuffle["o"] == "me" and "me" in shuffle["ns"] and timers(out, "shuffle")
    core.handle(RecvMessage("x", {"t": "shuffle-re", "ns": ["bad"], "k": shuffle["k"] ^ 1}), 1.0)
    assert "bad" not in core.membership.passive
    core.handle(RecvMessage("x", {"t": "shuffle-re", "ns": ["good"], "k": shuffle["k"]}), 1.0)
    core.handle(RecvMessage("x", {"t": "shuffle-re", "ns": ["replayed"], "k": shuffle["k"]}), 1.0)
    assert "good" in core.membership.passive and "replayed" not in core.membership.passive


# -- membership: repair ------------------------------------------------------------------------------------

def test_a_failed_neighbour_is_replaced_from_the_passive_view():
    core = with_neighbors(node("me"), "a", "b")
    with_passive(core, "a", "p", "q")
    out = core.handle(NeighborDown("a"), 1.0)
    assert "a" not in core.membership.active and "a" not in core.tree.eager
    ((asked, request),) = sends(out, "nbr")
    assert asked in ("p", "q") and request == {"t": "nbr", "hi": False}  # b is left: low priority

    for attempt in range(NEIGHBOR_TRIES):  # no answer, even when asked again: gone, and the other one is asked
        (timer,) = timers(out, "nbr")
        out = core.handle(TimerExpired(timer), 5.0 + 3.0 * attempt)
    assert asked not in core.membership.passive
    ((other, _),) = sends(out, "nbr")
    assert other == ({"p", "q"} - {asked}).pop()

    out = core.handle(RecvMessage(other, {"t": "nbr-re", "ok": True}), 12.0)
    assert of(out, Connect) == [Connect(other)] and core.membership.active == {"b": True, other: False}


def test_a_refusal_goes_on_to_the_next_member_and_an_acceptance_ends_the_repair():
    core = with_neighbors(node("me"), "a", "b")
    with_passive(core, "a", "p", "q", "r")
    out = core.handle(NeighborDown("a"), 1.0)
    ((first, _),) = sends(out, "nbr")
    out = core.handle(RecvMessage(first, {"t": "nbr-re", "ok": False}), 1.1)
    ((second, _),) = sends(out, "nbr")
    assert second != first and first in core.membership.passive  # kept, but not asked again for a while
    out = core.handle(RecvMessage(second, {"t": "nbr-re", "ok": True}), 1.2)
    assert of(out, Connect) == [Connect(second)] and not sends(out, "nbr")


def test_a_refusal_ends_the_repair_of_a_member_with_half_its_neighbours():
    """Each request is a session set up in a room: a member with D/2 neighbours or more takes a refusal as the end
    of its repair instead of asking member after member (whose views are mostly full)."""
    core = with_neighbors(node("me"), *[f"n{i}" for i in range(MAX_NEIGHBORS // 2 + 1)])
    with_passive(core, "n0", "p", "q", "r")
    out = core.handle(NeighborDown("n0"), 1.0)
    ((first, _),) = sends(out, "nbr")
    assert not sends(core.handle(RecvMessage(first, {"t": "nbr-re", "ok": False}), 1.1), "nbr")


def test_contacts_are_asked_for_only_when_short_of_neighbours_with_no_one_to_ask():
    lonely = with_neighbors(node("me"), "a")
    assert of(lonely.handle(TimerExpired(Timer("repair")), 5.0), FindContact) == [FindContact()]
    settled = with_neighbors(node("me"), *[f"p{i}" for i in range(MAX_NEIGHBORS // 2)])
    out = settled.handle(TimerExpired(Timer("repair")), 5.0)
    assert not of(out, FindContact) and not sends(out) and timers(out, "repair")


def test_with_no_neighbour_left_the_request_is_high_priority():
    core = with_neighbors(node("me"), "a")
    with_passive(core, "a", "p")
    out = core.handle(NeighborDown("a"), 1.0)
    assert sends(out, "nbr") == [("p", {"t": "nbr", "hi": True})]


def test_a_neighbour_whose_connection_never_opens_is_given_up():
    core = node("me")
    out = core.handle(RecvMessage("slow", {"t": "nbr", "hi": False}), 0.0)
    (timer,) = timers(out, "connect")
    out = core.handle(TimerExpired(timer), CONNECT_TIMEOUT_S)
    assert of(out, Disconnect) == [Disconnect("slow")] and not core.membership.active
    assert core.handle(TimerExpired(timer), CONNECT_TIMEOUT_S) == []  # an old timer does nothing


def test_a_disconnect_keeps_a_live_member_as_passive_and_forgets_a_leaving_one():
    core = with_neighbors(node("me"), "a", "b")
    out = core.handle(RecvMessage("a", {"t": "dis", "alive": True, "ns": ["tip"]}), 0.0)
    assert Disconnect("a") in out and "a" in core.membership.passive and "tip" in core.membership.passive
    assert ("a", {"t": "nbr", "hi": False}) not in sends(out)  # it just dropped us: not asked straight back
    core.handle(RecvMessage("b", {"t": "dis", "alive": False, "ns": []}), 0.0)
    assert "b" not in core.membership.active and "b" not in core.membership.passive


def test_a_connection_we_did_not_ask_for_is_closed():
    core = node("me")
    assert core.handle(NeighborUp("stranger"), 0.0) == [Disconnect("stranger")]
    assert not core.membership.active


def test_leaving_tells_every_neighbour_and_then_does_nothing():
    core = with_neighbors(node("me"), "a", "b")
    out = core.handle(Leave(), 0.0)
    assert sorted(sends(out)) == [(p, {"t": "dis", "alive": False, "ns": []}) for p in "ab"]
    assert sorted(o.peer for o in of(out, Disconnect)) == ["a", "b"]
    assert core.handle(Broadcast("m1", "late"), 1.0) == []


# -- broadcast: eager, lazy, graft, prune ------------------------------------------------------------------

def test_a_broadcast_goes_whole_to_every_new_neighbour():
    core = with_neighbors(node("me"), "a", "b")
    out = core.handle(Broadcast("m1", "hello"), 0.0)
    assert sorted(sends(out)) == [(p, {"t": "gossip", "id": "m1", "r": 1, "d": "hello"}) for p in "ab"]
    assert not of(out, Deliver)  # our own message: the caller has it


def test_a_message_is_delivered_once_and_its_duplicate_prunes_the_link():
    core = with_neighbors(node("me"), "a", "b")
    out = core.handle(RecvMessage("a", {"t": "gossip", "id": "m1", "r": 2, "d": "x"}), 0.0)
    assert of(out, Deliver) == [Deliver("m1", "x", "a", 2)]
    assert sends(out) == [("b", {"t": "gossip", "id": "m1", "r": 3, "d": "x"})]

    out = core.handle(RecvMessage("b", {"t": "gossip", "id": "m1", "r": 2, "d": "x"}), 0.1)
    assert not of(out, Deliver) and sends(out) == [("b", {"t": "prune"})]
    assert "b" in core.tree.lazy and "b" not in core.tree.eager

    out = core.handle(RecvMessage("a", {"t": "gossip", "id": "m2", "r": 1, "d": "y"}), 1.0)
    assert sends(out) == [] and timers(out, "ihave")  # b hears of m2 by id only, a moment later
    out = core.handle(TimerExpired(Timer("ihave")), 1.05)
    assert sends(out) == [("b", {"t": "ihave", "h": [["m2", 2]]})]


def test_a_prune_turns_our_link_lazy():
    core = with_neighbors(node("me"), "a", "b")
    core.handle(RecvMessage("a", {"t": "prune"}), 0.0)
    out = core.handle(Broadcast("m1", "x"), 0.0)
    assert sends(out) == [("b", {"t": "gossip", "id": "m1", "r": 1, "d": "x"})]
    assert sends(core.handle(TimerExpired(Timer("ihave")), 0.1)) == [("a", {"t": "ihave", "h": [["m1", 1]]})]


def test_a_missing_message_is_grafted_from_its_announcers_in_turn():
    core = with_neighbors(node("me"), "a", "b")
    for peer in "ab":
        core.handle(RecvMessage(peer, {"t": "prune"}), 0.0)
    out = core.handle(RecvMessage("a", {"t": "ihave", "h": [["m9", 3]]}), 0.0)
    assert [(o.delay, o.timer) for o in out if type(o) is ScheduleTimer] == [(GRAFT_WAIT_S, Timer("graft", "m9"))]
    assert core.handle(RecvMessage("b", {"t": "ihave", "h": [["m9", 2]]}), 0.1) == []  # one timer per id

    out = core.handle(TimerExpired(Timer("graft", "m9")), GRAFT_WAIT_S)
    assert sends(out) == [("a", {"t": "graft", "id": "m9"})] and "a" in core.tree.eager
    assert [(o.delay, o.timer) for o in out if type(o) is ScheduleTimer] == [(GRAFT_RETRY_S, Timer("graft", "m9"))]
    out = core.handle(TimerExpired(Timer("graft", "m9")), GRAFT_WAIT_S + GRAFT_RETRY_S)
    assert sends(out) == [("b", {"t": "graft", "id": "m9"})]
    assert core.handle(TimerExpired(Timer("graft", "m9")), 2.0) == []  # no announcer left

    out = core.handle(RecvMessage("b", {"t": "gossip", "id": "m9", "r": 2, "d": "late"}), 2.1)
    assert of(out, Deliver) == [Deliver("m9", "late", "b", 2)]


def test_a_message_that_comes_in_time_is_not_grafted():
    core = with_neighbors(node("me"), "a", "b")
    core.handle(RecvMessage("b", {"t": "prune"}), 0.0)
    core.handle(RecvMessage("b", {"t": "ihave", "h": [["m1", 1]]}), 0.0)
    core.handle(RecvMessage("a", {"t": "gossip", "id": "m1", "r": 2, "d": "x"}), 0.1)
    assert core.handle(TimerExpired(Timer("graft", "m1")), GRAFT_WAIT_S) == []


def test_a_graft_is_answered_with_the_message_and_puts_the_link_in_the_tree():
    core = with_neighbors(node("me"), "a")
    core.handle(RecvMessage("a", {"t": "prune"}), 0.0)
    core.handle(Broadcast("m1", "x"), 0.0)
    out = core.handle(RecvMessage("a", {"t": "graft", "id": "m1"}), 0.5)
    assert sends(out) == [("a", {"t": "gossip", "id": "m1", "r": 1, "d": "x"})] and "a" in core.tree.eager
    assert sends(core.handle(RecvMessage("a", {"t": "graft", "id": "unknown"}), 0.6)) == []


def test_a_much_shorter_announced_path_replaces_the_tree_link():
    core = with_neighbors(node("me"), "near", "far")
    core.handle(RecvMessage("near", {"t": "prune"}), 0.0)
    core.handle(RecvMessage("near", {"t": "ihave", "h": [["m1", 1]]}), 0.0)
    out = core.handle(RecvMessage("far", {"t": "gossip", "id": "m1", "r": 1 + rtchat.OPTIMIZE_HOPS, "d": "x"}), 0.1)
    assert ("near", {"t": "graft"}) in sends(out) and ("far", {"t": "prune"}) in sends(out)
    assert "near" in core.tree.eager and "far" in core.tree.lazy


def test_a_new_neighbour_hears_what_we_had_lately():
    core = with_neighbors(node("me"), "a")
    core.handle(Broadcast("m1", "x"), 0.0)
    core.handle(RecvMessage("a", {"t": "gossip", "id": "m2", "r": 4, "d": "y"}), 0.0)
    core.handle(RecvMessage("late", {"t": "nbr", "hi": False}), 1.0)
    out = core.handle(NeighborUp("late"), 1.5)
    assert sends(out) == [("late", {"t": "ihave", "h": [["m1", 1], ["m2", 5]]})]


def test_flooding_sends_everything_everywhere_and_never_prunes():
    core = with_neighbors(node("me", flood=True), "a", "b", "c")
    core.handle(RecvMessage("a", {"t": "gossip", "id": "m1", "r": 1, "d": "x"}), 0.0)
    out = core.handle(RecvMessage("b", {"t": "gossip", "id": "m1", "r": 1, "d": "x"}), 0.0)
    assert out == []
    core.handle(RecvMessage("c", {"t": "prune"}), 0.0)
    assert sorted(p for p, _ in sends(core.handle(Broadcast("m2", "y"), 0.0))) == ["a", "b", "c"]


def test_a_payload_that_fails_the_check_is_dropped_and_leaves_its_id_free():
    core = with_neighbors(node("me", check=lambda msg_id, payload: payload == "genuine"), "a", "b")
    assert core.handle(RecvMessage("a", {"t": "gossip", "id": "m1", "r": 1, "d": "forged"}), 0.0) == []
    out = core.handle(RecvMessage("b", {"t": "gossip", "id": "m1", "r": 1, "d": "genuine"}), 0.1)
    assert of(out, Deliver) == [Deliver("m1", "genuine", "b", 1)]


def test_our_own_broadcast_needs_a_valid_id():
    with pytest.raises(ValueError):
        node().handle(Broadcast("", "x"), 0.0)


# -- hostile and malformed frames --------------------------------------------------------------------------

TOO_MANY_TIPS = [f"t{i}" for i in range(DISCONNECT_TIPS + 1)]
MALFORMED = [
    ("a", "join"), ("a", ["t", "join"]), ("a", None), ("a", {}), ("a", {"t": "nope"}), ("a", {"t": 5}),
    ("a", {"t": ["gossip"]}),
    (5, {"t": "join"}), ("", {"t": "join"}), ("x" * 200, {"t": "join"}), ("evil\x1b[2J", {"t": "join"}),
    ("me", {"t": "join"}), (None, {"t": "nbr", "hi": True}),
    ("a", {"t": "fwd", "n": 5, "ttl": 1}), ("a", {"t": "fwd", "n": "new", "ttl": -1}),
    ("a", {"t": "fwd", "n": "new", "ttl": JOIN_WALK_HOPS + 1}), ("a", {"t": "fwd", "n": "new", "ttl": True}),
    ("a", {"t": "fwd", "n": "new", "ttl": 1.0}), ("a", {"t": "fwd", "n": "new\u202e", "ttl": 1}),
    ("a", {"t": "fwd", "ttl": 1}),
    ("b", {"t": "nbr"}), ("b", {"t": "nbr", "hi": "yes"}), ("b", {"t": "nbr", "hi": 1}),
    ("a", {"t": "nbr-re", "ok": "true"}), ("q", {"t": "nbr-re", "ok": True}),
    ("a", {"t": "dis", "alive": True, "ns": TOO_MANY_TIPS}), ("a", {"t": "dis", "alive": True, "ns": "x"}),
    ("a", {"t": "dis", "alive": True, "ns": [1]}), ("a", {"t": "dis", "alive": "no", "ns": []}),
    ("a", {"t": "dis", "ns": []}), ("stranger", {"t": "dis", "alive": True, "ns": ["tip"]}),
    ("a", {"t": "shuffle", "o": "x", "ns": [f"n{i}" for i in range(9)], "ttl": 0, "k": 1}),
    ("a", {"t": "shuffle", "o": "x", "ns": ["x"], "ttl": 7, "k": 1}),
    ("a", {"t": "shuffle", "o": "x", "ns": ["x"], "ttl": 0, "k": -1}),
    ("a", {"t": "shuffle", "o": "x", "ns": ["x"], "ttl": 0, "k": 2 ** 40}),
    ("a", {"t": "shuffle", "o": 7, "ns": ["x"], "ttl": 0, "k": 1}), ("a", {"t": "shuffle", "o": "me", "ns": [],
                                                                          "ttl": 0, "k": 1}),
    ("a", {"t": "shuffle-re", "ns": ["x"], "k": 12345}), ("a", {"t": "shuffle-re", "ns": ["x"]}),
    ("a", {"t": "gossip", "id": "m", "r": 0, "d": "x"}), ("a", {"t": "gossip", "id": "m", "r": 256, "d": "x"}),
    ("a", {"t": "gossip", "id": "", "r": 1, "d": "x"}), ("a", {"t": "gossip", "id": "m" * 65, "r": 1, "d": "x"}),
    ("a", {"t": "gossip", "id": 5, "r": 1, "d": "x"}), ("a", {"t": "gossip", "id": "m", "r": 1}),
    ("a", {"t": "gossip", "id": "m", "r": "1", "d": "x"}),
    ("a", {"t": "ihave", "h": "m"}), ("a", {"t": "ihave", "h": [["m"]]}), ("a", {"t": "ihave", "h": [["m", 0]]}),
    ("a", {"t": "ihave", "h": [["m", 1], [5, 1]]}), ("a", {"t": "ihave", "h": [{"id": "m"}]}),
    ("a", {"t": "ihave", "h": [[f"m{i}", 1] for i in range(IHAVE_MAX_IDS + 1)]}),
    ("a", {"t": "graft", "id": 5}), ("a", {"t": "graft", "id": ""}),
    # link kinds from a member that is not an up neighbour: only joins and requests come through signaling
    ("stranger", {"t": "gossip", "id": "m", "r": 1, "d": "x"}), ("stranger", {"t": "ihave", "h": [["m", 1]]}),
    ("stranger", {"t": "graft", "id": "m0"}), ("stranger", {"t": "prune"}),
    ("stranger", {"t": "fwd", "n": "new", "ttl": 0}),
    ("stranger", {"t": "shuffle", "o": "x", "ns": ["x"], "ttl": 0, "k": 1}),
    ("b", {"t": "gossip", "id": "m", "r": 1, "d": "x"}),  # b's connection is not up yet
]


@pytest.mark.parametrize("peer, msg", MALFORMED, ids=[f"{i}:{str(m)[:40]}" for i, (_, m) in enumerate(MALFORMED)])
def test_a_malformed_or_misplaced_frame_does_nothing(peer, msg):
    core = with_neighbors(node("me"), "a")
    core.handle(RecvMessage("b", {"t": "nbr", "hi": False}), 0.0)  # b: agreed, connection not up yet
    core.handle(Broadcast("m0", "x"), 0.0)
    before = state(core)
    assert core.handle(RecvMessage(peer, msg), 1.0) == []
    assert state(core) == before


def test_a_flood_of_announcements_is_bounded():
    core = with_neighbors(node("me"), "a")
    scheduled = 0
    for batch in range(2 * MAX_MISSING // IHAVE_MAX_IDS):
        entries = [[f"fake{batch}-{i}", 1] for i in range(IHAVE_MAX_IDS)]
        scheduled += len(timers(core.handle(RecvMessage("a", {"t": "ihave", "h": entries}), 0.0), "graft"))
    assert len(core.tree._missing) == MAX_MISSING and scheduled == MAX_MISSING


def test_announcements_queued_for_a_neighbour_go_out_in_bounded_frames():
    core = with_neighbors(node("me"), "a", "b")
    core.handle(RecvMessage("b", {"t": "prune"}), 0.0)
    frames = []
    for index in range(3 * IHAVE_MAX_IDS + 5):
        frames += sends(core.handle(Broadcast(f"m{index}", "x"), 0.0), "ihave")
    frames += sends(core.handle(TimerExpired(Timer("ihave")), 0.1), "ihave")
    assert [len(msg["h"]) for _, msg in frames] == [IHAVE_MAX_IDS] * 3 + [5]


def test_the_table_of_ids_seen_is_bounded():
    core = node("me")
    for index in range(MAX_SEEN + 10):
        core.handle(Broadcast(f"m{index}", None), index / 1000)
    assert len(core.tree._seen) == MAX_SEEN and not core.tree.has_seen("m0") and core.tree.has_seen(f"m{MAX_SEEN}")


# -- a simulated room ------------------------------------------------------------------------------------

def test_a_simulated_room_of_100_gets_every_message_under_loss_and_churn():
    result = gossip_sim.run_room(1, peers=100, messages=30, churn=0.10, loss=0.01)
    assert result["churn_replaced"] == 10 and result["lost"] > 0
    assert result["expected"] > 2000 and result["missed"] == 0
    assert result["connections_max"] <= MAX_NEIGHBORS and result["active_view_max"] <= MAX_NEIGHBORS
    assert result["misrouted"] == 0 and result["double_deliveries"] == 0
    assert result["copies_per_delivery"] < 2.0  # a tree, not a flood


def test_a_simulated_room_repairs_after_a_third_is_killed_at_once():
    result = gossip_sim.run_mass_failure(1, peers=100, messages=30)
    assert result["killed"] == 33 and result["repair_s"] is not None
    assert result["after_repair"]["messages"] > 0 and result["after_repair"]["missed"] == 0
    assert result["connections_max"] <= MAX_NEIGHBORS


def test_the_flood_baseline_runs_over_the_same_overlay():
    tree = gossip_sim.run_room(2, peers=60, messages=10)
    flood = gossip_sim.run_room(2, peers=60, messages=10, flood=True)
    assert tree["overlay"] == flood["overlay"]
    assert flood["copies_per_delivery"] > 1.5 * tree["copies_per_delivery"]


def _sim_in_subprocess(seed: int, hash_seed: str) -> dict:
    code = f"import json, gossip_sim; print(json.dumps(gossip_sim.run_room({seed}, peers=50, messages=10)))"
    env = dict(os.environ, PYTHONHASHSEED=hash_seed, PYTHONPATH=os.pathsep.join([str(BENCH), str(BENCH.parent)]))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_the_same_seed_gives_the_same_run_whatever_the_hash_seed():
    first, second = _sim_in_subprocess(3, "1"), _sim_in_subprocess(3, "2")
    assert first == second
    assert gossip_sim.run_room(4, peers=50, messages=10)["overlay"] != first["overlay"]
