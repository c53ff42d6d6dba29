#!/usr/bin/env python3
"""Deterministic simulation of rtchat.py's gossip core (issue 16): many members in one process, no sockets, no clock.

    python bench/gossip_sim.py              1,000 members, 10% churn, 1% loss; then a third killed at once
    python bench/gossip_sim.py --quick      200 members (what `bench/run.py --quick --only 7` runs)
    python bench/gossip_sim.py --seed 7     another seed (the same seed gives the same figures, always)

Every member runs rtchat.Gossip. This file plays what is around it: the network (latency, loss, connections that
take time to set up, crashes noticed only by missing pings) and the Room (a member joins through a member seen on
the broker). Time is simulated and every random draw comes from a stream seeded by the seed.

The baseline is flooding over the same membership, run with the same seed: the membership's traffic draws from
random streams of its own, and no broadcast decision feeds back into membership, so both runs build the same
overlay, link for link (`overlay` in the results is its fingerprint). Only the broadcast differs.
"""
from __future__ import annotations

import argparse
import hashlib
import heapq
import itertools
import json
import random
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

try:
    import rtchat
except ImportError:  # run from bench/: the rtchat.py beside it
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import rtchat

LINK_LATENCY_S = (0.01, 0.06)    # one way on a data channel
SIGNAL_LATENCY_S = (0.05, 0.25)  # one way through the broker
SETUP_S = (0.3, 1.5)             # a WebRTC connection set up through the broker, once both sides want it
NOTICE_CRASH_S = (rtchat.PING_EVERY_S, rtchat.PEER_SILENT_S)  # a crashed neighbour is noticed by its silence
WARM_S = 10.0                    # a member counts as a receiver once it has been in the room this long ...
SETTLE_S = 30.0                  # ... and if it stays this long after the message; also the drain at the end
MESSAGE_EVERY_S = 0.5
TREE_KINDS = frozenset(("gossip", "ihave", "graft", "prune"))


def percentile(values: list[float], p: int) -> float | None:
    if len(values) < 2:
        return values[0] if values else None
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1]


class Member:
    """One simulated rtchat.py process: its gossip core and what the network layer knows of it."""

    def __init__(self, name: str, core: rtchat.Gossip, joined: float) -> None:
        self.name, self.core, self.joined = name, core, joined
        self.is_alive = True
        self.gone: float | None = None
        self.wants: dict[str, None] = {}   # members it asked to connect to (Connect, not yet Disconnect)
        self.up: dict[str, int] = {}       # open connections -> the link's number (NeighborUp given)
        self.last_seq: dict[str, int] = {}  # per author: the last message number delivered, for order checks


class Sim:
    """The network and the rooms' broker around many gossip cores, in simulated time."""

    def __init__(self, seed: int, *, loss: float = 0.01, flood: bool = False,
                 max_neighbors: int = rtchat.MAX_NEIGHBORS) -> None:
        self.seed, self.loss, self.flood, self.max_neighbors = seed, loss, flood, max_neighbors
        self.now = 0.0
        self._queue: list = []
        self._order = itertools.count()
        # Membership, broadcast, the room's choices and churn each draw from their own stream (see the docstring).
        self.members_rng, self.gossip_rng, self.room_rng, self.churn_rng = (
            random.Random(f"{seed}:{stream}") for stream in ("members", "gossip", "room", "churn"))
        self.members: dict[str, Member] = {}
        self.links: dict[tuple[str, str], int] = {}
        self._link_numbers = itertools.count(1)
        self._setting_up: dict[tuple[str, str], int] = {}
        self._last_arrival: dict[tuple[str, str, bool], float] = {}   # (from, to, is it broadcast) -> last arrival
        self._overlay = hashlib.sha256()
        self.sent: dict[str, tuple[float, str]] = {}
        self.deliveries: dict[str, dict[str, tuple[float, int]]] = {}
        self.receipts: dict[str, int] = {}
        self.counts: dict[str, int] = dict.fromkeys(
            ("lost", "signaling", "misrouted", "dropped_on_closed", "double_deliveries", "order_inversions",
             "contacts_asked"), 0)
        self.frames: dict[str, int] = dict.fromkeys(rtchat.GOSSIP_KINDS, 0)
        self._author_seq: dict[str, int] = {}

    # -- the event loop ----------------------------------------------------------------------------
    def at(self, when: float, action: Callable, *args) -> None:
        heapq.heappush(self._queue, (when, next(self._order), action, args))

    def run(self, until: float) -> None:
        while self._queue and self._queue[0][0] <= until:
            self.now, _, action, args = heapq.heappop(self._queue)
            action(*args)
        self.now = until

    def feed(self, member: Member, event) -> None:
        for action in member.core.handle(event, self.now):
            self._ACTIONS[type(action)](self, member, action)

    # -- the room: members come and go ---------------------------------------------------------------
    def alive(self) -> list[Member]:
        return [m for m in self.members.values() if m.is_alive]

    def add_member(self) -> Member:
        """A newcomer, entering through one member seen on the broker (if any)."""
        name = f"m{len(self.members):05d}"
        core = rtchat.Gossip(name, random.Random(f"{self.seed}:{name}"), max_neighbors=self.max_neighbors,
                             flood=self.flood)
        contacts = self.alive()
        member = self.members[name] = Member(name, core, self.now)
        if contacts:
            self.feed(member, rtchat.Join(self.room_rng.choice(contacts).name))
        return member

    def crash(self, member: Member) -> None:
        """Gone without a word: neighbours notice when its pings stop."""
        member.is_alive, member.gone = False, self.now
        for peer, number in member.up.items():
            if self.links.get((min(member.name, peer), max(member.name, peer))) != number:
                continue  # closed by the other side already; we just had not heard
            self._close(member.name, peer)
            self.at(self.now + self.members_rng.uniform(*NOTICE_CRASH_S), self._notice_down, peer, member.name,
                    number)
        member.up.clear()
        member.wants.clear()

    def leave(self, member: Member) -> None:
        self.feed(member, rtchat.Leave())
        member.is_alive, member.gone = False, self.now

    def broadcast(self, author: Member) -> str:
        msg_id = f"msg{len(self.sent):06d}"
        seq = self._author_seq[author.name] = self._author_seq.get(author.name, -1) + 1
        self.sent[msg_id] = (self.now, author.name)
        self.feed(author, rtchat.Broadcast(msg_id, {"a": author.name, "n": seq}))
        return msg_id

    def _find_contact(self, member: Member, action: rtchat.FindContact) -> None:
        self.counts["contacts_asked"] += 1
        contacts = [m for m in self.alive() if m is not member]
        if contacts:
            self.feed(member, rtchat.Join(self.room_rng.choice(contacts).name))

    # -- the network ---------------------------------------------------------------------------------
    def _send(self, member: Member, action: rtchat.SendMessage) -> None:
        peer, msg = action.peer, action.msg
        kind = msg["t"]
        self.frames[kind] += 1
        rng = self.gossip_rng if kind in TREE_KINDS else self.members_rng
        pair = (min(member.name, peer), max(member.name, peer))
        if pair in self.links:  # on the data channel: in order
            lane = (member.name, peer, rng is self.gossip_rng)
            when = max(self.now + rng.uniform(*LINK_LATENCY_S), self._last_arrival.get(lane, 0.0))
            self._last_arrival[lane] = when
        elif kind in TREE_KINDS:  # the core sends these only on connections it was told are up
            self.counts["misrouted" if peer not in member.up else "dropped_on_closed"] += 1
            return
        else:
            self.counts["signaling"] += 1
            when = self.now + rng.uniform(*SIGNAL_LATENCY_S)
        if rng.random() < self.loss:
            self.counts["lost"] += 1
            return
        self.at(when, self._receive, peer, member.name, msg)

    def _receive(self, name: str, sender: str, msg: dict) -> None:
        member = self.members.get(name)
        if member is not None and member.is_alive:
            if msg["t"] == "gossip":
                self.receipts[msg["id"]] = self.receipts.get(msg["id"], 0) + 1
            self.feed(member, rtchat.RecvMessage(sender, msg))

    def _connect(self, member: Member, action: rtchat.Connect) -> None:
        member.wants[action.peer] = None
        other = self.members.get(action.peer)
        pair = (min(member.name, action.peer), max(member.name, action.peer))
        if other is None or not other.is_alive or member.name not in other.wants or pair in self.links \
                or pair in self._setting_up:
            return
        attempt = self._setting_up[pair] = next(self._link_numbers)
        self.at(self.now + self.members_rng.uniform(*SETUP_S), self._link_up, pair, attempt)

    def _link_up(self, pair: tuple[str, str], attempt: int) -> None:
        if self._setting_up.get(pair) != attempt:
            return
        del self._setting_up[pair]
        a, b = self.members[pair[0]], self.members[pair[1]]
        if not (a.is_alive and b.is_alive and b.name in a.wants and a.name in b.wants):
            return
        self.links[pair] = attempt
        self._overlay.update(f"+{pair} {self.now:.6f}\n".encode())
        a.up[b.name] = b.up[a.name] = attempt
        self.feed(a, rtchat.NeighborUp(b.name))
        if b.is_alive:
            self.feed(b, rtchat.NeighborUp(a.name))

    def _disconnect(self, member: Member, action: rtchat.Disconnect) -> None:
        peer = action.peer
        member.wants.pop(peer, None)
        pair = (min(member.name, peer), max(member.name, peer))
        self._setting_up.pop(pair, None)
        number = self.links.get(pair)
        if number is not None:
            self._close(member.name, peer)
            member.up.pop(peer, None)
            # the close reaches the other side after the membership frames sent before it
            when = max(self.now, self._last_arrival.get((member.name, peer, False), 0.0)) + 0.001
            self.at(when, self._notice_down, peer, member.name, number)

    def _close(self, name: str, peer: str) -> None:
        pair = (min(name, peer), max(name, peer))
        del self.links[pair]
        self._overlay.update(f"-{pair} {self.now:.6f}\n".encode())

    def _notice_down(self, name: str, peer: str, number: int) -> None:
        member = self.members[name]
        if member.is_alive and member.up.get(peer) == number:
            del member.up[peer]
            self.feed(member, rtchat.NeighborDown(peer))

    def _timer(self, member: Member, timer: rtchat.Timer) -> None:
        if member.is_alive:
            self.feed(member, rtchat.TimerExpired(timer))

    def _schedule(self, member: Member, action: rtchat.ScheduleTimer) -> None:
        self.at(self.now + action.delay, self._timer, member, action.timer)

    def _deliver(self, member: Member, action: rtchat.Deliver) -> None:
        record = self.deliveries.setdefault(action.id, {})
        if member.name in record:
            self.counts["double_deliveries"] += 1
            return
        record[member.name] = (self.now, action.hops)
        author, seq = action.payload["a"], action.payload["n"]
        if seq < member.last_seq.get(author, -1):
            self.counts["order_inversions"] += 1
        else:
            member.last_seq[author] = seq

    _ACTIONS = {rtchat.SendMessage: _send, rtchat.Connect: _connect, rtchat.Disconnect: _disconnect,
                rtchat.ScheduleTimer: _schedule, rtchat.Deliver: _deliver, rtchat.FindContact: _find_contact}

    # -- what the figures are made of ----------------------------------------------------------------
    def overlay(self) -> str:
        return self._overlay.hexdigest()[:16]

    def is_connected(self) -> bool:
        """Can every live member reach every other over open connections?"""
        alive = [m.name for m in self.alive()]
        if not alive:
            return True
        reached, todo = {alive[0]}, [alive[0]]
        while todo:
            for peer in self.members[todo.pop()].up:
                if peer not in reached:
                    reached.add(peer)
                    todo.append(peer)
        return len(reached) == len(alive)

    def receivers(self, msg_id: str) -> list[str]:
        """Who must have it: in the room WARM_S before it was sent, and still there SETTLE_S after."""
        sent_at, author = self.sent[msg_id]
        return [m.name for m in self.members.values() if m.name != author and m.joined <= sent_at - WARM_S
                and (m.gone is None or m.gone >= sent_at + SETTLE_S)]

    def delivery(self, msg_ids: list[str]) -> dict:
        expected = got = 0
        hops, latency_ms = [], []
        for msg_id in msg_ids:
            sent_at = self.sent[msg_id][0]
            record = self.deliveries.get(msg_id, {})
            for name in self.receivers(msg_id):
                expected += 1
                if name in record:
                    got += 1
                    at, hop = record[name]
                    hops.append(hop)
                    latency_ms.append((at - sent_at) * 1000)
        copies = sum(self.receipts.get(i, 0) for i in msg_ids)
        firsts = sum(len(self.deliveries.get(i, {})) for i in msg_ids)
        return {"messages": len(msg_ids), "expected": expected, "delivered": got, "missed": expected - got,
                "delivery_pct": 100.0 * got / expected if expected else None,
                "hops_p50": percentile(hops, 50), "hops_p99": percentile(hops, 99), "hops_max": max(hops, default=None),
                "latency_ms_p50": percentile(latency_ms, 50), "latency_ms_p99": percentile(latency_ms, 99),
                "copies_per_delivery": copies / firsts if firsts else None,
                "duplicates_per_message": (copies - firsts) / len(msg_ids) if msg_ids else None}


class Sampler:
    """Connections per member, sampled at an interval: the open links (as the network has them; a member hears
    of a close a little later), and the active views."""

    def __init__(self, sim: Sim, every_s: float, until: float) -> None:
        self.sim, self.every_s, self.until = sim, every_s, until
        self.most_links = self.most_active = 0
        self.link_counts: list[int] = []
        sim.at(sim.now, self.sample)

    def sample(self) -> None:
        links: dict[str, int] = {}
        for pair in self.sim.links:
            for name in pair:
                links[name] = links.get(name, 0) + 1
        for member in self.sim.alive():
            count = links.get(member.name, 0)
            self.most_links = max(self.most_links, count)
            self.most_active = max(self.most_active, len(member.core.membership.active))
            self.link_counts.append(count)
        if self.sim.now + self.every_s <= self.until:
            self.sim.at(self.sim.now + self.every_s, self.sample)

    def figures(self) -> dict:
        counts = self.link_counts
        return {"connections_max": self.most_links, "connections_mean": sum(counts) / len(counts) if counts else None,
                "active_view_max": self.most_active}


def form_room(sim: Sim, peers: int) -> float:
    """Members join one after another over a stretch of time; returns when the room has settled."""
    joining_s = max(5.0, peers * 0.03)
    for index in range(peers):
        sim.at(joining_s * index / peers, sim.add_member)
    return joining_s + 20.0


def run_room(seed: int, *, peers: int = 1000, messages: int = 100, churn: float = 0.10, loss: float = 0.01,
             flood: bool = False, max_neighbors: int = rtchat.MAX_NEIGHBORS) -> dict:
    """A room under churn: `churn` of the members replaced while `messages` go out (half crash, half leave)."""
    sim = Sim(seed, loss=loss, flood=flood, max_neighbors=max_neighbors)
    start = form_room(sim, peers)
    phase_s = messages * MESSAGE_EVERY_S
    end = start + phase_s + SETTLE_S
    sampler = Sampler(sim, 1.0, end)
    replaced = round(churn * peers)
    for index, when in enumerate(sorted(start + sim.churn_rng.uniform(0, phase_s) for _ in range(replaced))):
        sim.at(when, _replace, sim, index % 2 == 0)
    msg_ids: list[str] = []
    for index in range(messages):
        sim.at(start + index * MESSAGE_EVERY_S, _broadcast_from_settled, sim, msg_ids)
    sim.run(start)
    frames_before, signaling_before = dict(sim.frames), sim.counts["signaling"]
    sim.run(end)
    result = {"peers": peers, "churn_replaced": replaced, "loss": loss, "flood": flood, "seed": seed,
              "max_neighbors": max_neighbors, "overlay": sim.overlay()}
    result.update(sim.delivery(msg_ids))
    result.update(sampler.figures())
    result.update(_traffic(sim, frames_before, signaling_before, len(msg_ids), end - start))
    return result


def _replace(sim: Sim, crash: bool) -> None:
    victim = sim.churn_rng.choice(sim.alive())
    if crash:
        sim.crash(victim)
    else:
        sim.leave(victim)
    sim.add_member()


def _broadcast_from_settled(sim: Sim, msg_ids: list[str]) -> None:
    authors = [m for m in sim.alive() if m.joined <= sim.now - WARM_S]
    msg_ids.append(sim.broadcast(sim.room_rng.choice(authors)))


def _traffic(sim: Sim, frames_before: dict, signaling_before: int, messages: int, seconds: float) -> dict:
    """Frames per message per member during the measured stretch (membership frames per member per minute)."""
    delta = {k: sim.frames[k] - frames_before[k] for k in sim.frames}
    members = len(sim.alive())
    per_message = {k: delta[k] / messages / members for k in ("gossip", "ihave", "graft", "prune")}
    membership = sum(v for k, v in delta.items() if k not in TREE_KINDS)
    return {"frames_per_member_per_message": per_message,
            "membership_frames_per_member_per_min": membership / members / (seconds / 60),
            "signaling_frames_per_member_per_min": (sim.counts["signaling"] - signaling_before) / members
            / (seconds / 60),
            **sim.counts}


def run_mass_failure(seed: int, *, peers: int = 1000, fraction: float = 1 / 3, loss: float = 0.01,
                     flood: bool = False, messages: int = 80) -> dict:
    """A settled room loses `fraction` of its members at once (crashed): how long until the survivors are one
    connected overlay again, and what reaches them meanwhile and afterwards."""
    sim = Sim(seed, loss=loss, flood=flood)
    start = form_room(sim, peers)
    sim.run(start)
    victims = sim.churn_rng.sample(sim.alive(), round(fraction * peers))
    for victim in victims:
        sim.crash(victim)
    end = start + messages * MESSAGE_EVERY_S + SETTLE_S
    sampler = Sampler(sim, 1.0, end)
    msg_ids: list[str] = []
    for index in range(messages):
        sim.at(start + index * MESSAGE_EVERY_S, _broadcast_from_settled, sim, msg_ids)
    repaired_at = None
    while sim.now < end:
        sim.run(sim.now + 0.25)
        if repaired_at is None and sim.is_connected() and all(m.up for m in sim.alive()):
            repaired_at = sim.now
    after = [i for i in msg_ids if repaired_at is not None and sim.sent[i][0] >= repaired_at]
    during = [i for i in msg_ids if i not in after]
    return {"peers": peers, "killed": len(victims), "flood": flood, "seed": seed, "overlay": sim.overlay(),
            "repair_s": None if repaired_at is None else repaired_at - start,
            "during_repair": sim.delivery(during), "after_repair": sim.delivery(after), **sampler.figures(),
            "misrouted": sim.counts["misrouted"], "double_deliveries": sim.counts["double_deliveries"]}


def figure(quick: bool, seed: int = 1) -> tuple[dict, list[dict]]:
    """Results and table rows for bench/run.py's figure 7: PlumTree against flooding, in one run each."""
    peers, messages = (200, 40) if quick else (1000, 100)
    tree = run_room(seed, peers=peers, messages=messages)
    flood = run_room(seed, peers=peers, messages=messages, flood=True)
    killed_tree = run_mass_failure(seed, peers=peers, messages=messages)
    killed_flood = run_mass_failure(seed, peers=peers, messages=messages, flood=True)
    results = {"method": f"bench/gossip_sim.py: {peers} simulated members, {tree['churn_replaced']} replaced "
                         f"during {messages} broadcasts (half crash, half leave), 1% of frames lost; baseline: "
                         "flooding over the same overlay (same seed; `overlay` fingerprints match)",
               "plumtree": tree, "flood": flood, "kill_third_plumtree": killed_tree, "kill_third_flood": killed_flood}
    fig, d = "7 gossip sim", rtchat.MAX_NEIGHBORS

    def row(metric: str, ours, base, unit: str, goal: str = "", ratio: bool = True, fmt: str = "{:.1f}") -> dict:
        return {"fig": fig, "metric": metric, "ours": ours, "base": base, "unit": unit, "goal": goal,
                "ratio": ratio, "fmt": fmt}  # Bench.row's arguments

    per_tree, per_flood = tree["frames_per_member_per_message"], flood["frames_per_member_per_message"]
    rows = [
        row(f"delivery, {peers} members, 10% churn, 1% loss (%)", tree["delivery_pct"], flood["delivery_pct"], "%",
            "≥ 99.9", ratio=False, fmt="{:.3f}"),
        row(f"connections per member, max (D = {d})", tree["connections_max"], flood["connections_max"], "",
            f"≤ {d}", ratio=False, fmt="{:.0f}"),
        row("connections per member, mean", tree["connections_mean"], flood["connections_mean"], "", ratio=False,
            fmt="{:.2f}"),
        row("hops to a member, p99", tree["hops_p99"], flood["hops_p99"], "hops", fmt="{:.0f}"),
        row("duplicate payloads per message", tree["duplicates_per_message"], flood["duplicates_per_message"],
            "frames", "low", fmt="{:.0f}"),
        row("payload copies received per delivery", tree["copies_per_delivery"], flood["copies_per_delivery"], "",
            "≈ 1", fmt="{:.2f}"),
        row("control frames per member per message", per_tree["ihave"] + per_tree["graft"] + per_tree["prune"],
            per_flood["ihave"] + per_flood["graft"] + per_flood["prune"], "frames", fmt="{:.2f}"),
        row("delivery latency p50 (simulated)", tree["latency_ms_p50"], flood["latency_ms_p50"], "ms", fmt="{:.0f}"),
        row("delivery latency p99 (simulated)", tree["latency_ms_p99"], flood["latency_ms_p99"], "ms", fmt="{:.0f}"),
        row("signaling frames per member per minute", tree["signaling_frames_per_member_per_min"],
            flood["signaling_frames_per_member_per_min"], "frames", ratio=False, fmt="{:.2f}"),
        row("a third killed at once: repair time (simulated)", killed_tree["repair_s"], killed_flood["repair_s"], "s",
            ratio=False, fmt="{:.1f}"),
        row("a third killed: delivery after repair (%)", killed_tree["after_repair"]["delivery_pct"],
            killed_flood["after_repair"]["delivery_pct"], "%", "100", ratio=False, fmt="{:.3f}"),
    ]
    return results, rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="200 members instead of 1,000")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    results, rows = figure(args.quick, args.seed)
    for r in rows:
        print(f"{r['metric']:<55} plumtree {r['ours']!s:<22} flood {r['base']!s:<22} goal {r['goal']}")
    print(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
