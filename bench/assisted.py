#!/usr/bin/env python3
"""Assisted signaling benchmark: how long a newcomer takes to be connected to every member once its first link is
up, when the broker dies at that moment (the rest is signaled through that member), beside the same with the
broker up, in the same run, alternating.

    python bench/assisted.py               7 runs of each
    python bench/assisted.py --quick       2 runs of each (CI: proves it still works)
    python bench/assisted.py --out FILE    the results as JSON too

Each run: alice, bob and carol in a room of their own (a fresh broker, fresh state files); dave joins. With the
broker up, everyone hears him there. With the broker down, alice's and bob's broker (a LossyLink of the tests)
stops passing their messages before dave joins, so dave's first link is carol, and the broker is killed as soon as
it is verified: alice and bob meet dave through carol. Figures: from dave's first peer verified to all three
verified, and from his join to all three, in milliseconds (medians; p10-p90). Loopback only, as root in a private
network namespace (as the tests); library clients in this process. No timing is asserted.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent))
import support  # noqa: E402  (the tests' broker, lossy link, network namespace, loopback ICE)


async def one_run(workdir: Path, broker_down: bool) -> dict:
    broker = support.Broker(workdir).start()
    links = [await support.LossyLink(broker.tcp_port).start() for _ in range(2)]
    urls = [links[0].url, links[1].url, broker.url, broker.url]
    clients = [support.make_client(name, workdir, url) for name, url in zip(("alice", "bob", "carol", "dave"), urls,
                                                                            strict=True)]
    try:
        rooms = []
        for client in clients[:3]:
            await client.start()
            rooms.append(await client.join("bench"))
        for room in rooms:
            await room.wait_for_peers(2, 30)
        if broker_down:
            for link in links:
                link.drop = 1.0
        await clients[3].start()
        first: list[float] = []
        started = time.monotonic()
        dave = await clients[3].join("bench")
        dave.on("verified", lambda peer: first.append(time.monotonic()))
        await dave.wait_for_peers(1, 30)
        if broker_down:
            broker.stop()
        await dave.wait_for_peers(3, 30)
        done = time.monotonic()
        return {"from_first_ms": (done - first[0]) * 1000, "from_join_ms": (done - started) * 1000}
    finally:
        for client in clients:
            await client.close()
        for link in links:
            await link.close()
        broker.stop()


def summary(values: list[float]) -> dict:
    ordered = sorted(values)
    return {"median": statistics.median(ordered), "p10": ordered[int(0.1 * (len(ordered) - 1))],
            "p90": ordered[round(0.9 * (len(ordered) - 1))], "values": [round(v, 1) for v in values]}


async def bench(runs: int) -> dict:
    results: dict[str, list[dict]] = {"broker up": [], "broker down": []}
    for n in range(runs):
        for case in results:
            with tempfile.TemporaryDirectory() as tmp:
                results[case].append(await one_run(Path(tmp), case == "broker down"))
            print(f"run {n + 1}/{runs} {case}: {results[case][-1]['from_first_ms']:.0f} ms from the first link",
                  file=sys.stderr, flush=True)
    return {case: {key: summary([r[key] for r in rs]) for key in ("from_first_ms", "from_join_ms")}
            for case, rs in results.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 runs of each")
    parser.add_argument("--out", metavar="FILE", help="write the results as JSON")
    args = parser.parse_args()
    network = support.enter_private_network()
    import rtchat
    rtchat.restrict_ice_hosts(["127.0.0.1"])
    logging.getLogger("rtchat").setLevel(logging.ERROR)  # "lost the broker", as meant
    figures = asyncio.run(bench(2 if args.quick else 7))
    print(f"assisted signaling ({network}): a newcomer connected to all 3 members, ms (median, p10-p90)")
    print(f"  {'':<12} {'from its first link':>24} {'from its join':>24}")
    for case, figure in figures.items():
        cells = [f"{f['median']:.0f} ({f['p10']:.0f}-{f['p90']:.0f})" for f in (figure["from_first_ms"],
                                                                             figure["from_join_ms"])]
        print(f"  {case:<12} {cells[0]:>24} {cells[1]:>24}")
    up, down = figures["broker up"]["from_join_ms"]["median"], figures["broker down"]["from_join_ms"]["median"]
    print(f"  broker down / broker up, from the join: {down / up:.2f}x")
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
