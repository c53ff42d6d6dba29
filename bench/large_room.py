#!/usr/bin/env python3
"""Benchmark figure 10, large rooms (issue 16): --processes rtchat.py processes in one room, and the same room once
a third of its listeners is killed, beside a full mesh of --baseline-processes measured in the same run, alternating.

    python bench/large_room.py                         60 processes beside a full mesh of 20, 3 runs
    python bench/large_room.py --processes 30 --runs 5
    python bench/large_room.py --max-peers 0           the large room a full mesh too (0: connect to everyone)
    python bench/large_room.py --quick                 8 (--max-peers 3) beside 4, 1 run (CI: proves it still works)
    python bench/large_room.py --out FILE.json         the results as JSON too

Every member is a real `rtchat.py` process with its own HOME and state file, on loopback, with the bench's own
mosquitto: listeners (`--listen --json`, their stdout read here) and --senders pipes whose stdin stays open (a pipe
sends each line as it comes, once the room has settled or its --timeout, here --pipe-timeout, has passed). Times are
this process's time.monotonic(). Formed: from starting the processes until, for every sender, one of its probes (one
a second, each new) is printed by every listener. Sessions: UDP sockets per process when formed and after each
delivery phase (its fds matched against /proc/net/udp: one per peer connection being set up or up, with
loopback-only ICE; in a room on gossip a listener prints no join or leave for its sessions). Delivery: each sender
writes --messages lines --gap-ms apart; a latency is a listener printing a line less the moment it was written to
the sender's stdin; delivered counts (line, listener) pairs. RSS: VmRSS of every rtchat.py process after delivery.
CPU per message: utime+stime of all rtchat.py processes from the first line written until the last printed, over
lines x listeners (beside it, their CPU in --idle seconds of quiet just before, which the send phase pays too).
Kill: SIGKILL a third of the listeners at once and keep writing a line every --gap-ms; repair is from the kill until
a line is printed by every survivor; then the delivery phase again among the survivors, and how long until every
survivor has printed a leave for every victim (full mesh only). No timing is asserted.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))
import support  # noqa: E402  (the tests' broker, network namespace, and rtchat.py's environment: loopback ICE)
from run import cpu_s, pct, render, rss_mb, summary  # noqa: E402  (figures are printed as bench/run.py's)

mono = time.monotonic
PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL(None, use_errno=True).prctl


def udp_sockets(pids: list[int]) -> list[int]:
    """UDP sockets each process holds: its fds that are sockets listed in /proc/net/udp and udp6 (the same table
    for every process in this network namespace)."""
    udp = set()
    for table in ("udp", "udp6"):
        with contextlib.suppress(OSError):
            udp |= {f"socket:[{line.split()[9]}]" for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]}
    counts = []
    for pid in pids:
        links = set()
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    links.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        counts.append(len(links & udp))
    return counts


class Member:
    """One rtchat.py process in the room: a listener whose --json stdout is read as it comes (each message's
    arrival time by text, and when it printed a leave by name), or a pipe sender whose stdin is written to."""

    def __init__(self, name: str, sender: bool, proc: asyncio.subprocess.Process, log: Path,
                 changed: asyncio.Event) -> None:
        self.name, self.sender, self.proc, self.log, self.changed = name, sender, proc, log, changed
        self.arrivals: dict[str, float] = {}
        self.left: dict[str, float] = {}
        self.reader = None if sender else asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        with (self.log.parent / "stdout.jsonl").open("wb") as kept:  # beside stderr.log, for --keep
            while line := await self.proc.stdout.readline():
                t = mono()
                kept.write(line)
                self.took(t, line)
        self.changed.set()

    def took(self, t: float, line: bytes) -> None:
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            kind = event.get("type")
            if kind == "message":
                self.arrivals.setdefault(event["text"], t)
            elif kind == "leave":
                self.left.setdefault(event["from"], t)
        self.changed.set()

    async def write(self, text: str) -> float:
        t = mono()
        try:
            self.proc.stdin.write(text.encode() + b"\n")
            await self.proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            raise RuntimeError(f"{self.name} exited {await self.proc.wait()}: {self.tail()}") from None
        return t

    def tail(self) -> str:
        with contextlib.suppress(OSError):
            return " | ".join(self.log.read_text(errors="replace").strip().splitlines()[-3:])
        return ""


class Room:
    """The processes of one room, in one process group of their own, killed together whatever happens; each dies
    with this process too (PR_SET_PDEATHSIG), should it be killed before it can clean up."""

    groups: set[int] = set()

    def __init__(self, workdir: Path, broker: support.Broker, name: str, rtchat: Path, extra: list[str]) -> None:
        self.workdir, self.broker, self.name, self.rtchat, self.extra = workdir, broker, name, rtchat, extra
        self.members: list[Member] = []
        self.changed = asyncio.Event()
        self.pgid = 0

    def _in_group(self) -> None:
        os.setpgid(0, self.pgid)
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)

    async def spawn(self, name: str, sender: bool, timeout: float) -> Member:
        home = self.workdir / name
        home.mkdir(parents=True)
        mode = ["--wait-peers", "1", "--timeout", f"{timeout:g}"] if sender else ["--listen", "--json"]
        log = home / "stderr.log"
        with log.open("wb") as err:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, str(self.rtchat), name, "--room", self.name, *mode, *self.extra,
                env=support.cli_env(self.broker.url, HOME=str(home), RTCHAT_STATE=str(home / "state.json")),
                stdin=asyncio.subprocess.PIPE if sender else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL if sender else asyncio.subprocess.PIPE, stderr=err,
                preexec_fn=self._in_group, limit=2 ** 20)
        if not self.pgid:
            self.pgid = proc.pid
            Room.groups.add(self.pgid)
        member = Member(name, sender, proc, log, self.changed)
        self.members.append(member)
        return member

    @property
    def listeners(self) -> list[Member]:
        return [m for m in self.members if not m.sender and m.proc.returncode is None]

    @property
    def senders(self) -> list[Member]:
        return [m for m in self.members if m.sender]

    def pids(self) -> list[int]:
        return [m.proc.pid for m in self.members if m.proc.returncode is None]

    def exited(self) -> list[str]:
        """The members that ended by themselves: name, exit code and the end of their stderr."""
        return [f"{m.name} exited {m.proc.returncode}: {m.tail()}" for m in self.members
                if m.proc.returncode is not None and m.proc.returncode != -signal.SIGKILL]

    async def until(self, predicate, timeout: float) -> bool:
        """Until predicate() holds, checked whenever a listener prints a line; False after timeout seconds."""
        deadline = mono() + timeout
        while True:
            self.changed.clear()
            if predicate():
                return True
            remaining = deadline - mono()
            if remaining <= 0:
                return False
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.changed.wait(), remaining)

    async def close(self) -> None:
        kill_group(self.pgid)
        await asyncio.gather(*(m.proc.wait() for m in self.members))
        await asyncio.gather(*(m.reader for m in self.members if m.reader), return_exceptions=True)


def kill_group(pgid: int) -> None:
    if pgid:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        Room.groups.discard(pgid)


def cpu_since(pids: list[int], before: list[float | None]) -> float:
    """CPU seconds the processes spent since before was read (those that have not exited)."""
    after = [cpu_s(pid) for pid in pids]
    return sum(b - a for a, b in zip(before, after, strict=True) if a is not None and b is not None)


def reached_all(listeners: list[Member], text: str) -> bool:
    return all(text in m.arrivals for m in listeners)


def coverage(room: Room, probes: dict[str, list[str]]) -> str:
    """How many listeners printed the probe that most of them did."""
    best = max((sum(t in m.arrivals for m in room.listeners) for texts in probes.values() for t in texts), default=0)
    return f"{best}/{len(room.listeners)} listeners"


async def form(room: Room, started: float, timeout: float) -> dict:
    """Every sender writes a new probe each second until, for each sender, one has reached every listener."""
    probes: dict[str, list[str]] = {s.name: [] for s in room.senders}
    formed: dict[str, float] = {}
    n = 0
    while len(formed) < len(probes) and mono() - started < timeout:
        for sender in room.senders:
            if sender.name not in formed:
                probes[sender.name].append(text := f"probe {sender.name} {n}")
                await sender.write(text)
        n += 1

        def done() -> bool:
            for name, texts in probes.items():
                if name not in formed:
                    hit = next((t for t in texts if reached_all(room.listeners, t)), None)
                    if hit:
                        formed[name] = max(m.arrivals[hit] for m in room.listeners)
            return len(formed) == len(probes) or bool(room.exited())
        await room.until(done, min(1.0, timeout - (mono() - started)))
        if n % 15 == 0:
            print(f"  {room.name}: {mono() - started:.0f} s, {len(formed)}/{len(probes)} senders reached every "
                  f"listener, best probe at {coverage(room, probes)}", file=sys.stderr, flush=True)
        if room.exited():
            raise RuntimeError("a member exited while the room formed: " + "; ".join(room.exited()))
    pids = room.pids()
    return {"formed_s": max(formed.values()) - started if len(formed) == len(probes) else None,
            "probes_written": n, "best_probe_reached": coverage(room, probes),
            "udp_sockets": udp_sockets(pids)}


async def idle_cpu(room: Room, seconds: float) -> float:
    """CPU of all the room's processes while nothing is said, in % of one core: what the room costs by itself
    (pings, announcements, sessions still being set up), which the send phase pays too."""
    pids = room.pids()
    before = [cpu_s(pid) for pid in pids]
    await asyncio.sleep(seconds)
    return cpu_since(pids, before) / seconds * 100


async def deliver(room: Room, tag: str, count: int, gap: float, drain: float) -> dict:
    """Each sender writes count lines gap apart (the senders in turn); every listener should print every one."""
    listeners = room.listeners
    pids = room.pids()
    cpu0 = [cpu_s(pid) for pid in pids]
    written: dict[str, float] = {}
    for i in range(count):
        for sender in room.senders:
            text = f"{tag} {sender.name} {i:03d}"
            written[text] = await sender.write(text)
        await asyncio.sleep(gap)
    await room.until(lambda: all(reached_all(listeners, t) for t in written), drain)
    cpu = cpu_since(pids, cpu0)
    latencies = [(m.arrivals[t] - w) * 1000 for t, w in written.items() for m in listeners if t in m.arrivals]
    missing = {m.name: sorted(t for t in written if t not in m.arrivals) for m in listeners}
    pairs = len(written) * len(listeners)
    return {"delivered_pct": 100 * len(latencies) / pairs, "pairs": pairs,
            "latency_p50_ms": pct(latencies, 50), "latency_p99_ms": pct(latencies, 99),
            "cpu_ms_per_message": cpu * 1000 / pairs, "rss_mb": [rss_mb(pid) for pid in pids],
            "udp_sockets": udp_sockets(pids),
            "missing": {name: texts for name, texts in missing.items() if texts}}


async def repair(room: Room, victims: list[Member], t_kill: float, gap: float, timeout: float) -> dict:
    """SIGKILL the victims at once (at t_kill), then one line every gap until one reaches every survivor."""
    for victim in victims:
        victim.proc.kill()
    await asyncio.gather(*(v.proc.wait() for v in victims))
    survivors = room.listeners
    written: list[str] = []
    repaired = None
    while repaired is None and mono() - t_kill < timeout:
        for sender in room.senders:
            written.append(text := f"after-kill {sender.name} {len(written):04d}")
            await sender.write(text)
        await room.until(lambda: any(reached_all(survivors, t) for t in written), gap)
        hit = next((t for t in written if reached_all(survivors, t)), None)
        if hit:
            repaired = max(m.arrivals[hit] for m in survivors) - t_kill
    return {"killed": len(victims), "survivors": len(survivors), "repair_s": repaired,
            "lines_until_repaired": len(written)}


def noticed(room: Room, gone: set[str], t_kill: float) -> dict:
    """How many survivors printed a leave for every victim, and when the last of them did."""
    times = [max(m.left[n] for n in gone) - t_kill for m in room.listeners if gone <= m.left.keys()]
    return {"noticed_all_gone": f"{len(times)}/{len(room.listeners)}", "noticed_s": max(times) if times else None}


async def one_room(args: argparse.Namespace, workdir: Path, broker: support.Broker, rtchat: Path, total: int,
                   label: str, extra: list[str], result: dict) -> None:
    """A room of total processes (--senders of them pipes): formed, delivery, and (--kill-third) repair, into
    result as each is measured (what was measured stays there if a later step fails)."""
    senders = min(args.senders, total - 1)
    room = Room(workdir / label, broker, f"large-{label}", rtchat, extra)
    result.update({"processes": total, "listeners": total - senders, "senders": senders, "options": extra})
    try:
        started = mono()
        for i in range(total - senders):
            await room.spawn(f"l{i:02d}", False, args.pipe_timeout)
        for i in range(senders):
            await room.spawn(f"s{i}", True, args.pipe_timeout)
        result["spawned_s"] = mono() - started
        result.update(await form(room, started, args.form_timeout))
        print(f"  {label}: formed {fmt(result['formed_s'], 's')}, best probe at {result['best_probe_reached']}",
              file=sys.stderr, flush=True)
        await asyncio.sleep(args.settle)  # a room just formed is still reshaping (sessions set up to ask close)
        result["idle_cpu_pct"] = await idle_cpu(room, args.idle)
        result["delivery"] = await deliver(room, "line", args.messages, args.gap_ms / 1000, args.drain)
        if args.kill_third:
            listeners = room.listeners
            victims = listeners[::3][:max(1, len(listeners) // 3)]
            t_kill = mono()
            result["kill"] = await repair(room, victims, t_kill, args.gap_ms / 1000, args.form_timeout)
            result["after_kill"] = await deliver(room, "after", args.messages, args.gap_ms / 1000, args.drain)
            gone = {v.name for v in victims}
            await room.until(lambda: all(gone <= m.left.keys() for m in room.listeners), args.drain)
            result["kill"].update(noticed(room, gone, t_kill))
    finally:
        result["exited"] = room.exited()
        await room.close()


def fmt(value: float | None, unit: str) -> str:
    return "not within the timeout" if value is None else f"{value:.2f} {unit}"


ROWS = [  # (figure, metric, format, the value taken from one room's result)
    ("10 large room", "room formed: start to every sender's probe at every listener (s)", "{:.2f}",
     lambda r: r["formed_s"]),
    ("10 large room", "UDP sockets per process when formed, median", "{:.0f}",
     lambda r: statistics.median(r["udp_sockets"])),
    ("10 large room", "UDP sockets per process when formed, max", "{:.0f}", lambda r: max(r["udp_sockets"])),
    ("10 large room", "UDP sockets per process after the lines, median", "{:.0f}",
     lambda r: statistics.median(r["delivery"]["udp_sockets"])),
    ("10 large room", "UDP sockets per process after the lines, max", "{:.0f}",
     lambda r: max(r["delivery"]["udp_sockets"])),
    ("10 large room", "delivered (line, listener) pairs (%)", "{:.2f}", lambda r: r["delivery"]["delivered_pct"]),
    ("10 large room", "latency p50 (ms)", "{:.1f}", lambda r: r["delivery"]["latency_p50_ms"]),
    ("10 large room", "latency p99 (ms)", "{:.1f}", lambda r: r["delivery"]["latency_p99_ms"]),
    ("10 large room", "RSS per process, median (MB)", "{:.1f}", lambda r: statistics.median(r["delivery"]["rss_mb"])),
    ("10 large room", "RSS per process, max (MB)", "{:.1f}", lambda r: max(r["delivery"]["rss_mb"])),
    ("10 large room", "CPU per line per listener, all processes (ms)", "{:.2f}",
     lambda r: r["delivery"]["cpu_ms_per_message"]),
    ("10 large room", "idle CPU before the lines, all processes (% of a core)", "{:.0f}", lambda r: r["idle_cpu_pct"]),
    ("10 kill third", "repair: kill to a line at every survivor (s)", "{:.2f}", lambda r: r["kill"]["repair_s"]),
    ("10 kill third", "every victim's leave printed by every survivor (s; full mesh only)", "{:.2f}",
     lambda r: r["kill"]["noticed_s"]),
    ("10 kill third", "delivered after repair (%)", "{:.2f}", lambda r: r["after_kill"]["delivered_pct"]),
    ("10 kill third", "latency p50 after repair (ms)", "{:.1f}", lambda r: r["after_kill"]["latency_p50_ms"]),
    ("10 kill third", "latency p99 after repair (ms)", "{:.1f}", lambda r: r["after_kill"]["latency_p99_ms"]),
    ("10 kill third", "UDP sockets per process after repair, max", "{:.0f}",
     lambda r: max(r["after_kill"]["udp_sockets"])),
]


def table(results: dict) -> list[dict]:
    """Rows as bench/run.py renders them: the large room's medians over runs beside the baseline's."""
    def values(case: str, take) -> dict:
        got = []
        for r in results[case]:
            with contextlib.suppress(KeyError, TypeError, ValueError, statistics.StatisticsError):
                if (v := take(r)) is not None:
                    got.append(v)
        return summary(got)
    return [{"figure": fig, "metric": metric, "rtchat": values("large", take), "baseline": values("baseline", take),
             "ratio": True, "goal": "", "fmt": form} for fig, metric, form, take in ROWS]


async def bench(args: argparse.Namespace, results: dict) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="rtchat-large-room-"))
    rtchat = workdir / "rtchat.py"  # one consistent rtchat.py for the whole run, even if the file is edited meanwhile
    shutil.copy2(args.rtchat, rtchat)
    broker = support.Broker(workdir).start()
    large = ["--max-peers", str(args.max_peers)] if args.max_peers is not None else []
    try:
        for n in range(args.runs):
            for case, total, extra in (("baseline", args.baseline_processes, ["--max-peers", "0"]),
                                       ("large", args.processes, large)):
                print(f"run {n + 1}/{args.runs}: {case}, {total} processes {' '.join(extra)}", file=sys.stderr,
                      flush=True)
                results[case].append({})
                await one_room(args, workdir, broker, rtchat, total, f"{case}{n}", extra, results[case][-1])
                for phase in ("delivery", "after_kill"):
                    missing = results[case][-1].get(phase, {}).get("missing", {})
                    for name, texts in list(missing.items())[:5]:
                        print(f"  {case} {phase}: {name} did not print {len(texts)}: {', '.join(texts[:6])}"
                              + (" ..." if len(texts) > 6 else ""), file=sys.stderr)
                    if len(missing) > 5:
                        print(f"  {case} {phase}: and {len(missing) - 5} more listeners missed lines",
                              file=sys.stderr)
                for line in results[case][-1]["exited"]:
                    print(f"  {case}: {line}", file=sys.stderr)
    finally:
        broker.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"work dir (stderr of every process, state files): {workdir}", file=sys.stderr)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=60, help="rtchat.py processes in the large room")
    parser.add_argument("--baseline-processes", type=int, default=20, help="rtchat.py processes in the baseline "
                        "room, a full mesh (--max-peers 0)")
    parser.add_argument("--max-peers", type=int, metavar="D", help="passed to every process of the large room "
                        "(default: none, so rtchat.py's own default)")
    parser.add_argument("--senders", type=int, default=2, help="of the processes, how many are pipes that send")
    parser.add_argument("--messages", type=int, default=20, help="lines each sender writes in a delivery phase")
    parser.add_argument("--gap-ms", type=float, default=50, help="between two lines of one sender")
    parser.add_argument("--runs", type=int, default=3, help="runs of each room (medians over them)")
    parser.add_argument("--kill-third", action=argparse.BooleanOptionalAction, default=True,
                        help="kill a third of the listeners after delivery, measure repair")
    parser.add_argument("--form-timeout", type=float, default=180, help="seconds for a room to form, and to repair")
    parser.add_argument("--pipe-timeout", type=float, default=60, help="the senders' --timeout: a pipe sends once "
                        "the room has settled, or this has passed")
    parser.add_argument("--idle", type=float, default=2, help="seconds of a quiet room whose CPU is measured")
    parser.add_argument("--settle", type=float, default=30, help="seconds a formed room is left alone before the "
                        "lines (a large room closes the sessions it set up to ask for neighbours 10 s after)")
    parser.add_argument("--drain", type=float, default=15, help="seconds to wait for the last lines of a phase")
    parser.add_argument("--timeout", type=float, default=3600, help="the whole benchmark, seconds")
    parser.add_argument("--quick", action="store_true", help="8 processes beside 4, 1 sender, 5 lines, 1 run; "
                        "--max-peers 3 unless given, so that the large room runs on gossip")
    parser.add_argument("--rtchat", default=str(support.ROOT / "rtchat.py"),
                        help="the rtchat.py to measure (copied once at start; default: the one beside bench/)")
    parser.add_argument("--out", metavar="FILE", help="write the results as JSON too")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (each process's stderr)")
    args = parser.parse_args()
    if args.quick:
        args.processes, args.baseline_processes, args.senders, args.messages, args.runs = 8, 4, 1, 5, 1
        args.settle = 12
        args.max_peers = 3 if args.max_peers is None else args.max_peers
    network = support.enter_private_network()
    results: dict[str, list[dict]] = {"baseline": [], "large": []}
    failure = None

    async def bounded() -> None:
        task = asyncio.current_task()
        for sig in (signal.SIGTERM, signal.SIGHUP):
            asyncio.get_running_loop().add_signal_handler(sig, task.cancel)
        await asyncio.wait_for(bench(args, results), args.timeout)
    try:
        asyncio.run(bounded())
    except (asyncio.TimeoutError, asyncio.CancelledError, KeyboardInterrupt, RuntimeError) as exc:
        failure = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    finally:
        for pgid in list(Room.groups):
            kill_group(pgid)
    large = f"{args.processes} processes, " + (f"--max-peers {args.max_peers}" if args.max_peers is not None
                                               else "rtchat.py's default --max-peers")
    print(f"large room ({network}): rtchat = {large}; baseline = a full mesh of {args.baseline_processes}; "
          f"{args.senders} sender(s), {args.messages} lines each; medians over {len(results['large'])} run(s)")
    print(render(table(results)))
    if failure:
        print(f"FAILED: {failure}")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": results, "failure": failure},
                                             indent=1, default=str))
    return 1 if failure else 0


if __name__ == "__main__":
    sys.exit(main())
