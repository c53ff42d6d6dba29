"""Benchmark figure 9: a round trip through one relaying member against a direct one, and what relaying costs the
member, each beside a baseline measured in the same run.

Three rtchat.py clients (alice, bob, carol) in one process and one event loop, on loopback, with the run's own
broker: first in a room where every pair connects directly, then in one where alice and bob find no network path
(their offers and answers carry candidates nobody listens on, as tests/support.make_pathless does) and carol relays.
A round trip is alice's line until bob's ack is back at alice (a room line: bob acks once it is written; a direct
message: sealed to bob's key through carol), one every COMMIT_EVERY_S. Relay CPU is the thread CPU time carol spends
in passing one line on, against what she spends taking one line sent to her directly. All three share one core here,
so the relayed round trip also pays carol's work in line: read the ratio as an upper bound.
"""
from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
import support  # noqa: E402


async def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


class _CPU:
    """Thread CPU time spent in a method of one object, per call."""

    def __init__(self, owner, name: str, only=lambda *a: True) -> None:
        self.calls: list[float] = []
        method = getattr(owner, name)

        def timed(*args):
            if not only(*args):
                return method(*args)
            start = time.thread_time()
            try:
                return method(*args)
            finally:
                self.calls.append(time.thread_time() - start)
        setattr(owner, name, timed)


async def _round_trips(room, reps: int, dm: bool, gap: float) -> list[float]:
    """Each line once the one before is acked and gap has passed: the receiver writes its history (and so acks)
    at most every COMMIT_EVERY_S while lines keep coming, which would otherwise be all that is measured."""
    times = []
    for n in range(reps):
        await asyncio.sleep(gap)
        start = time.perf_counter()
        msg = room.dm("bob", f"dm {n}") if dm else room.send(f"line {n}")
        await _wait(lambda msg=msg: not room.ledger.awaiting(msg.id), 10, "bob's ack")
        times.append((time.perf_counter() - start) * 1000)
    return times


async def _measure(rtchat, broker_url: str, workdir: Path, reps: int, setting: str) -> dict:
    """Round trips and carol's CPU in one room of three, alice and bob connected directly or through carol."""
    rtchat.restrict_ice_hosts(["127.0.0.1"])
    workdir.mkdir(exist_ok=True)
    clients = [await support.make_client(name, workdir, broker_url).start() for name in ("alice", "bob", "carol")]
    try:
        alice, bob, carol = [await client.join(f"bench-relay-{setting}") for client in clients]
        if setting == "direct":
            await _wait(lambda: len(alice.verified_peers()) == 2 and len(bob.verified_peers()) == 2, 30,
                        "a room of three")
            cpu = _CPU(carol.ledger, "on_frame", lambda peer, label, value: isinstance(value, dict)
                       and value.get("t") == "msg")
        else:
            await _wait(lambda: [r.name for r in alice.relayed_peers()] == ["bob"] and bob.relayed_peers(), 30,
                        "alice and bob reached through carol")
            cpu = _CPU(carol.ledger.routes, "on_relay", lambda peer, value: value.get("d", {}).get("t") == "msg")
        gap = rtchat.COMMIT_EVERY_S
        await _round_trips(alice, 3, False, gap)   # warm-up
        cpu.calls.clear()
        return {"line_ms": await _round_trips(alice, reps, False, gap),
                "dm_ms": await _round_trips(alice, reps, True, gap), "carol_cpu_us": [c * 1e6 for c in cpu.calls]}
    finally:
        for client in clients:
            await client.close()


def figure(rtchat, broker_url: str, workdir: Path, quick: bool) -> tuple[dict, list[dict]]:
    """Run the measurement (in its own event loop: call it from a worker thread): (results, table rows), each
    row with the raw values of rtchat.py (ours) and of the baseline (base)."""
    reps = 15 if quick else 150
    pairs: set[frozenset] = set()
    original = rtchat.RoomSignaling.publish
    rtchat.RoomSignaling.publish = support.make_pathless(original, pairs)
    try:
        direct = asyncio.run(_measure(rtchat, broker_url, workdir / "relay-direct", reps, "direct"))
        pairs.add(frozenset(("alice", "bob")))
        relayed = asyncio.run(_measure(rtchat, broker_url, workdir / "relay-relayed", reps, "relayed"))
    finally:
        rtchat.RoomSignaling.publish = original
    rows = [
        {"fig": "9", "metric": "round trip, room line to bob's ack: via carol vs direct", "ours":
         relayed["line_ms"], "base": direct["line_ms"], "unit": "ms", "goal": "<= 2x"},
        {"fig": "9", "metric": "round trip, direct message (sealed through carol) vs direct", "ours":
         relayed["dm_ms"], "base": direct["dm_ms"], "unit": "ms", "goal": "<= 2x"},
        {"fig": "9", "metric": "carol's CPU per line: passing it on vs taking one sent to her", "ours":
         relayed["carol_cpu_us"], "base": direct["carol_cpu_us"], "unit": "us", "goal": ""},
    ]
    return {"method": " ".join(__doc__.split("\n\n")[1].split()), "reps": reps, "direct": direct,
            "relayed": relayed}, rows
