"""rtchat.py on real networks: the NAT lab of tests/netlab.py (namespaces, NAT routers, mosquitto, coturn).

First the lab proves itself (each router maps and filters as its kind says), then real rtchat.py processes run in
the client namespaces: the connectivity matrix with STUN only and with TURN, the one-line diagnosis where no path
exists, --netcheck behind each kind of router, and a new member meeting everyone through a member while the broker
is cut off (assisted signaling). Only addresses inside the lab's own namespaces are used.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import itertools
import json
import os
import pty
import shutil
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from dataclasses import dataclass, field

import netlab
import pytest
from conftest import ROOT
from test_cli import _read_until

import rtchat

CLIENTS = [(f"{kind}{n}", kind) for kind in netlab.KINDS for n in (1, 2)]
FILTERING = {"restricted", "symmetric"}   # drop what comes from a remote address and port they have not sent to


def direct_path(a: str, b: str) -> bool:
    """What ICE can do without a relay: UDP on both sides, and not two filtering NATs of which one is symmetric."""
    if "udpblocked" in (a, b):
        return False
    return not ({a, b} <= FILTERING and "symmetric" in (a, b))


PAIRS = list(itertools.combinations_with_replacement(netlab.KINDS, 2))
TURN_HINT = "--ice turn:USER:PASS@HOST:3478"
NO_PATH_SAMPLE = {  # (sender, listener): (what the sender says, what the listener says); symmetric both: below
    ("restricted", "symmetric"): (
        f"-!- bob: no network path (you are behind a NAT; bob is behind a NAT too); add a TURN server: {TURN_HINT}",
        "no network path (you are behind a symmetric NAT; alice is behind a NAT too); add a TURN server: "
        f"{TURN_HINT}"),
    ("open", "udpblocked"): (
        "-!- bob: no network path (your address is public; bob gave no public address: UDP may be blocked there); "
        "bob needs a TURN server (over TCP if UDP is blocked there)",
        "no network path (no STUN server answered you: UDP may be blocked on your network); add a TURN server "
        f"reachable over TCP: {TURN_HINT}?transport=tcp"),
}


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    reason = netlab.unavailable()
    if reason:
        pytest.skip(reason)
    with netlab.Lab(tmp_path_factory.mktemp("lab"), CLIENTS) as built:
        yield built


def lab_env(lab: netlab.Lab, client: netlab.Client, turn: bool) -> dict:
    """Two STUN servers (aioice asks the first only; netcheck both) and, with turn, the lab's TURN server:
    over TCP for the client whose UDP is blocked."""
    ice = lab.stun_urls() + ([lab.turn_url(tcp=client.kind == "udpblocked")] if turn else [])
    env = {k: v for k, v in os.environ.items() if not k.startswith("RTCHAT_")}
    env.update(RTCHAT_BROKER=lab.broker_url, RTCHAT_ICE=",".join(ice), RTCHAT_ICE_HOST=client.address,
               NO_COLOR="1", PYTHONUNBUFFERED="1")
    return env


# -- the lab itself ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", netlab.KINDS)
def test_lab_routers_map_and_filter_as_their_kind(lab, kind):
    """A STUN binding to two servers from one socket, then a datagram from an address and port never sent to."""
    client = lab.clients[f"{kind}1"]
    servers = f"{netlab.SERVER}:{netlab.STUN_PORT},{netlab.SERVER2}:{netlab.STUN_PORT}"
    probe = lab.popen(client.name, [sys.executable, str(netlab.HERE / "netlab.py"), "stun", servers, "1.0"],
                      stdout=subprocess.PIPE, text=True)
    try:
        first = json.loads(probe.stdout.readline())
        mapped = [tuple(m) if m else None for m in first["mapped"]]
        if mapped[0] is not None:
            lab.run(lab.pub, [sys.executable, str(netlab.HERE / "netlab.py"), "knock", *map(str, mapped[0]), "4000"])
        knocked = json.loads(probe.stdout.readline())["knocked"]
    finally:
        probe.kill()
        probe.communicate()
    if kind == "udpblocked":
        assert mapped == [None, None] and knocked is None
        return
    assert all(m is not None and m[0] == client.public for m in mapped), mapped
    if kind == "symmetric":
        assert mapped[0] != mapped[1]  # endpoint-dependent mapping
    else:
        assert mapped[0] == mapped[1]  # endpoint-independent mapping
    if kind == "open":
        assert mapped[0] == (client.address, first["local_port"])
    assert (knocked is not None) == (kind in ("open", "fullcone")), knocked  # endpoint-independent filtering


# -- rtchat.py in the lab -----------------------------------------------------------------------------------------

@dataclass
class Cell:
    """One pipe sender (alice, behind a) and one listener (bob, behind b) in a room of their own."""
    a: str
    b: str
    turn: bool
    expect_path: bool
    lines: list[tuple[float, str]] = field(default_factory=list)   # the sender's stderr, with arrival times
    listener_out: str = ""
    listener_err: str = ""
    code: int | None = None
    started: float = 0.0

    @property
    def room(self) -> str:
        return f"{self.a}-{self.b}-{'turn' if self.turn else 'stun'}"

    def seen(self, text: str) -> float | None:
        return next((t - self.started for t, line in self.lines if text in line), None)

    @property
    def events(self) -> list[dict]:
        return [json.loads(line) for line in self.listener_out.splitlines() if line.startswith("{")]

    @property
    def path(self) -> str | None:
        return next((e.get("path") for e in self.events if e["type"] == "join"), None)


def rtchat_argv(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "rtchat.py"), *args]


def run_cell(lab: netlab.Lab, cell: Cell, workdir, timeout: float = 45) -> Cell:
    """Start both; a cell with a path ends when the sender has its message acknowledged (the listener's ack is
    the way back), one without when the sender says why there is no path."""
    a, b = lab.clients[f"{cell.a}1"], lab.clients[f"{cell.b}2"]
    state = workdir / cell.room
    state.mkdir()
    cell.started = time.monotonic()
    listener = lab.popen(b.name, rtchat_argv("bob", "--room", cell.room, "--state", str(state / "bob.json"),
                                             "--listen", "--json"),
                         env=lab_env(lab, b, cell.turn), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sender = lab.popen(a.name, rtchat_argv("alice", "--room", cell.room, "--state", str(state / "alice.json"),
                                           "--timeout", str(timeout)),
                       env=lab_env(lab, a, cell.turn), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True)
    try:
        sender.stdin.write(f"hello from {cell.a} to {cell.b}\n")
        sender.stdin.close()
        for line in sender.stderr:
            cell.lines.append((time.monotonic(), line.rstrip("\n")))
            if not cell.expect_path and "no network path" in line:
                break
        sender.kill()
        cell.code = sender.wait(timeout=30)
        if not cell.expect_path:  # the listener says it too, about as soon
            timer = threading.Timer(30, listener.kill)
            timer.start()
            for line in listener.stdout:
                cell.listener_out += line
                if '"no-route"' in line:
                    break
            timer.cancel()
    finally:
        sender.kill()
        listener.terminate()
        try:
            out, cell.listener_err = listener.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            listener.kill()
            out, cell.listener_err = listener.communicate()
        cell.listener_out += out
    return cell


def run_cells(lab, cells: list[Cell], workdir) -> list[Cell]:
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(lambda cell: run_cell(lab, cell, workdir), cells))


def print_table(capsys, title: str, cells: list[Cell]) -> None:
    """Seconds from the sender's start to its room joined ('in room'), and to chat-ready (its line saying bob
    joined, verified) or, where no path exists, to the diagnosis; ready - in room is the connection alone. Cells
    run four at a time on a shared machine: read the figures as rough."""
    def seconds(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"
    rows = [f"{title}: seconds to chat-ready (no path: to the diagnosis)",
            f"  {'sender':<11} {'listener':<11} {'path':<7} {'in room':>7} {'ready':>7}"]
    for cell in cells:
        ready = cell.seen("joined (verified") if cell.expect_path else cell.seen("no network path")
        rows.append(f"  {cell.a:<11} {cell.b:<11} {(cell.path or 'none'):<7} "
                    f"{seconds(cell.seen('waiting for')):>7} {seconds(ready):>7}")
    with capsys.disabled():
        print("\n" + "\n".join(rows))


def check_delivered(cell: Cell) -> None:
    stderr = "\n".join(line for _, line in cell.lines)
    assert cell.code == 0, f"{cell.room}: {stderr}\nlistener: {cell.listener_err[-2000:]}"
    assert "delivered 1 message(s) to 1 peer(s)" in stderr
    texts = [e["text"] for e in cell.events if e["type"] == "message"]
    assert texts == [f"hello from {cell.a} to {cell.b}"], cell.listener_out


@pytest.mark.timeout(300)
def test_matrix_with_stun_only(lab, tmp_path, capsys):
    """Every pair with a direct path connects directly; where none exists, both sides say so."""
    cells = [Cell(a, b, False, True) for a, b in PAIRS if direct_path(a, b)]
    cells += [Cell(a, b, False, False) for a, b in NO_PATH_SAMPLE]
    run_cells(lab, cells, tmp_path)
    print_table(capsys, "STUN only", cells)
    for cell in cells:
        if cell.expect_path:
            check_delivered(cell)
            assert cell.path == "direct", cell.events
        else:
            ours, theirs = NO_PATH_SAMPLE[(cell.a, cell.b)]
            assert [line for _, line in cell.lines if "no network path" in line] == [ours], cell.lines
            assert not any(e["type"] == "join" for e in cell.events)
            assert [e["text"] for e in cell.events if e["type"] == "no-route"] == [theirs], cell.listener_out


@pytest.mark.timeout(300)
def test_matrix_with_turn(lab, tmp_path, capsys):
    """With a TURN server every pair connects: through the relay where no direct path exists (TURN over TCP for
    the client whose UDP is blocked)."""
    cells = run_cells(lab, [Cell(a, b, True, True) for a, b in PAIRS], tmp_path)
    print_table(capsys, "with TURN", cells)
    for cell in cells:
        check_delivered(cell)
        if not direct_path(cell.a, cell.b):
            assert cell.path == "relay", (cell.room, cell.events)


def test_no_path_is_said_in_one_line_with_cause_and_fix(lab, tmp_path):
    """Two symmetric NATs and no TURN: signaling works, ICE cannot. Each side says why in one line, well before
    the sender gives up, and the listener's NDJSON has the typed event."""
    cell = run_cell(lab, Cell("symmetric", "symmetric", False, False), tmp_path, timeout=60)
    said = [line for _, line in cell.lines if "no network path" in line]
    assert said == ["-!- bob: no network path (you are behind a symmetric NAT; bob is behind a NAT too); "
                    f"add a TURN server: {TURN_HINT}"], cell.lines
    assert cell.code != 0 and not any("sending to" in line for _, line in cell.lines)
    event = next(e for e in cell.events if e["type"] == "no-route")
    assert event["from"] == "alice" and event["mapping"] == "endpoint-dependent"
    assert event["turn"] is False and event["nat"] is True and event["their_nat"] is True
    assert event["ours"] == ["host", "srflx"] and event["theirs"] == ["host", "srflx"]
    assert event["text"].startswith("no network path (you are behind a symmetric NAT; alice is behind a NAT too)")


def test_interactive_client_says_why_and_peers_shows_it(lab, tmp_path):
    """At a terminal behind a symmetric NAT, with bob behind another and no TURN: the line, then /peers."""
    a, b = lab.clients["symmetric1"], lab.clients["symmetric2"]
    lab.popen(b.name, rtchat_argv("bob", "--room", "tty-no-path", "--state", str(tmp_path / "bob.json"), "--listen"),
              env=lab_env(lab, b, False), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pid, fd = pty.fork()
    if pid == 0:
        os.execve(shutil.which("ip"), ["ip", "netns", "exec", a.ns, *rtchat_argv(
            "alice", "--room", "tty-no-path", "--state", str(tmp_path / "alice.json"))],
            {**lab_env(lab, a, False), "TERM": "xterm"})
    try:
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
        _read_until(fd, b"[tty-no-path]")
        _read_until(fd, b"bob: no network path (you are behind a symmetric NAT", timeout=60)
        os.write(fd, b"/peers\r")  # bob is listed during a try and between two tries alike
        _read_until(fd, b"no network path (last try")
        os.write(fd, b"\x04")
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)


NETCHECK_EXPECT = {  # kind: (udp, mapping)
    "open": (True, "none"),
    "fullcone": (True, "endpoint-independent"),
    "restricted": (True, "endpoint-independent"),
    "symmetric": (True, "endpoint-dependent"),
    "udpblocked": (False, None),
}


@pytest.mark.parametrize("kind", netlab.KINDS)
def test_netcheck_behind_each_kind_of_router(lab, kind):
    client = lab.clients[f"{kind}1"]
    env = lab_env(lab, client, turn=True)
    env["RTCHAT_ICE"] += "," + netlab.Lab.turn_url(password="wrong")
    result = lab.run(client.name, rtchat_argv("--netcheck", "--json"), env=env)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    udp, mapping = NETCHECK_EXPECT[kind]
    assert (report["udp"], report["mapping"]) == (udp, mapping), report
    if udp:
        assert {p.rsplit(":", 1)[0] for p in report["public"]} == {client.public}
        assert len(report["public"]) == (2 if kind == "symmetric" else 1)
    else:
        assert report["public"] == []
    stun1, stun2, good_turn, bad_turn = report["servers"]
    assert stun1["ok"] is stun2["ok"] is udp
    assert good_turn["ok"] and good_turn["relay"].startswith(netlab.SERVER + ":")
    assert good_turn["server"].endswith("?transport=tcp") == (kind == "udpblocked")
    assert not bad_turn["ok"] and bad_turn["error"] == ("credentials refused" if udp else "no answer")
    words = lab.run(client.name, rtchat_argv("--netcheck"), env=env).stdout
    assert words.startswith("UDP: yes\n" if udp else "UDP: no STUN server answered") and "servers:" in words
    assert ("mapping varies by destination: yes" in words) == (kind == "symmetric")


def test_ice_urls_parse_with_transport_and_refuse_junk():
    server = rtchat.IceServer.parse("turn:u:p:w@203.0.113.1:3478?transport=tcp")
    assert (server.user, server.password, server.transport, server.url) == \
        ("u", "p:w", "tcp", "turn:203.0.113.1:3478?transport=tcp")
    assert rtchat.IceServer.parse("stun:203.0.113.1").url == "stun:203.0.113.1:3478"
    assert rtchat.IceServer.parse("turns:u:p@turn.example:443").transport == "tcp"
    for junk in ("stun:u:p@host", "turn:host?transport=sctp", "turns:u:p@h?transport=udp", "http://x",
                 "turn:u:p@h:99999", "stun:"):
        with pytest.raises(rtchat.UsageError, match="ICE server"):
            rtchat.IceServer.parse(junk)
    config = rtchat.ice_configuration([server])
    assert config.iceServers[0].username == "u" and config.iceServers[0].credential == "p:w"


# -- assisted signaling: the broker gone while a new member joins ----------------------------------------------------

MEMBER = """
import asyncio, json, sys
import rtchat

async def main(name, room, state):
    async with rtchat.Client(name, state=state) as client:
        joined = await client.join(room)
        joined.on("verified", lambda p: print(json.dumps({"verified": p.name, "bound": p.channel_bound}), flush=True))
        joined.on("message", lambda m: print(json.dumps({"from": m.sender, "text": m.text}), flush=True))
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := await reader.readline():
            joined.send(line.decode().rstrip("\\n"))

asyncio.run(main(*sys.argv[1:]))
"""


class Member:
    """A library client in a lab namespace: says on stdout whom it verified and what it heard; sends each line
    written to it."""

    def __init__(self, lab: netlab.Lab, client: str, name: str, room: str, state: str) -> None:
        env = {**lab_env(lab, lab.clients[client], False), "PYTHONPATH": str(ROOT)}
        self.name = name
        self.events: list[dict] = []
        self.proc = lab.popen(client, [sys.executable, "-c", MEMBER, name, room, state], env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError):
                self.events.append(json.loads(line))

    def verified(self) -> set[str]:
        return {e["verified"] for e in self.events if "verified" in e and e["bound"]}

    def heard(self) -> set[str]:
        return {e["text"] for e in self.events if "text" in e}

    def say(self, text: str) -> None:
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_broker_gone_while_a_new_member_joins(lab, tmp_path):
    """alice (full cone), bob (port-restricted) and carol (no NAT) in a room; a firewall then cuts alice and bob off
    from the broker, and dave (behind a port-restricted NAT) joins: he meets carol there. Then the broker is cut
    off for everyone. dave ends up directly connected to alice and bob and verified, their offers and answers
    passed on by carol, and they chat both ways."""
    placement = {"alice": "fullcone1", "bob": "restricted1", "carol": "open1", "dave": "restricted2"}
    broker_rules = [("OUTPUT", "--dport"), ("INPUT", "--sport")]   # MQTT out and in, in a client's namespace
    cut: list[tuple[str, str, str]] = []

    def cut_off(ns: str, chain: str, port_match: str) -> None:
        lab.iptables(ns, "-I", chain, "-p", "tcp", port_match, str(netlab.BROKER_PORT), "-j", "DROP")
        cut.append((ns, chain, port_match))

    members: dict[str, Member] = {}
    try:
        for name in ("alice", "bob", "carol"):
            members[name] = Member(lab, placement[name], name, "assisted", str(tmp_path / f"{name}.json"))
        wait_until(lambda: all(len(m.verified()) == 2 for m in members.values()), 60, "the room of three")
        for name in ("alice", "bob"):
            for chain, port_match in broker_rules:
                cut_off(lab.clients[placement[name]].ns, chain, port_match)
        dave = members["dave"] = Member(lab, placement["dave"], "dave", "assisted", str(tmp_path / "dave.json"))
        wait_until(lambda: dave.verified(), 60, "dave's first link")
        assert next(e["verified"] for e in dave.events if "verified" in e) == "carol"
        for ns in (lab.clients[placement["carol"]].ns, lab.clients[placement["dave"]].ns):
            for chain, port_match in broker_rules:
                cut_off(ns, chain, port_match)
        wait_until(lambda: dave.verified() == {"alice", "bob", "carol"}, 60, "dave meeting alice and bob")
        wait_until(lambda: all("dave" in members[n].verified() for n in ("alice", "bob")), 30, "them verifying dave")
        for member in members.values():
            member.say(f"hello from {member.name}")
        wait_until(lambda: all({f"hello from {o}" for o in members if o != m.name} <= m.heard()
                               for m in members.values()), 30, "everyone hearing everyone")
    finally:
        for ns, chain, port_match in cut:
            lab.iptables(ns, "-D", chain, "-p", "tcp", port_match, str(netlab.BROKER_PORT), "-j", "DROP")
        for member in members.values():
            member.proc.kill()
            member.proc.wait(timeout=30)


# -- relaying through members (issue 15, item 3) ---------------------------------------------------------------

RELAY_ROOM = [("sym", "symmetric1"), ("resa", "restricted1"), ("resb", "restricted2"), ("opn", "open1"),
              ("cone", "fullcone1")]   # sym has no path to resa nor to resb (no TURN): two pairs, relayed
RELAY_ROUNDS = 10


class RelayMember:
    """A room member in a lab namespace (netlab.py member): lines in, JSON lines out, read by a thread."""

    def __init__(self, lab: netlab.Lab, name: str, client: str, room: str, workdir) -> None:
        self.name = name
        self.proc = lab.popen(client, [sys.executable, str(netlab.HERE / "netlab.py"), "member", name, room,
                                       str(workdir / f"{name}.json")],
                              env=lab_env(lab, lab.clients[client], False), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.reach: dict = {}
        self.got: list[dict] = []
        self.acked: list[str] = []
        self.changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError), self.changed:
                event = json.loads(line)
                if "reach" in event:
                    self.reach = event["reach"]
                elif "got" in event:
                    self.got.append(event)
                elif "acked" in event:
                    self.acked.append(event["acked"])
                self.changed.notify_all()

    def say(self, text: str) -> None:
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def wait(self, predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        with self.changed:
            while not predicate(self):
                if time.monotonic() > deadline:
                    raise AssertionError(f"{self.name}: timed out waiting for {what}; reach {self.reach}, "
                                         f"got {[g['got'] for g in self.got][-8:]}, acked {self.acked[-8:]}")
                self.changed.wait(max(0.0, deadline - time.monotonic()))


def _round(members: list[RelayMember], tag: str, timeout: float = 30) -> tuple[float, float]:
    """Every member says one line; until each has every other's, then until its own is acked by all still here.
    Seconds taken to each."""
    started = time.monotonic()
    for member in members:
        member.say(f"{tag} from {member.name}")
    for member in members:
        wanted = {f"{tag} from {other.name}" for other in members if other is not member}
        member.wait(lambda m, wanted=wanted: wanted <= {g["got"] for g in m.got}, timeout, f"every line of {tag}")
    got = time.monotonic() - started
    for member in members:
        member.wait(lambda m: f"{tag} from {m.name}" in m.acked, timeout, f"acks of its line of {tag}")
    return got, time.monotonic() - started


@pytest.mark.timeout(240)
def test_a_room_of_five_reaches_everyone_through_members(lab, tmp_path, capsys):
    """Five members, no TURN: sym has no path to resa nor to resb. Each of ten rounds, everyone says a line and
    everyone gets all four others' (sym's and resa's and resb's to each other through a member), each acked end to
    end. Then the member relaying between sym and resa is killed: the room goes through another, and the next
    rounds reach the four left."""
    members = [RelayMember(lab, name, client, "five", tmp_path) for name, client in RELAY_ROOM]
    try:
        for member in members:
            others = {m.name for m in members if m is not member}
            member.wait(lambda m, others=others: set(m.reach) == others, 60, "everyone reached")
        sym = members[0]
        sym.wait(lambda m: m.reach.get("resa") and m.reach.get("resb"), 30, "resa and resb relayed")
        times = [_round(members, f"round {n}") for n in range(RELAY_ROUNDS)]
        via = {g["from"]: g["via"] for g in sym.got}
        assert via["resa"] and via["resb"] and not via["opn"] and not via["cone"], via
        relay = next(m for m in members if m.name == sym.reach["resa"])
        relay.proc.kill()
        left = [m for m in members if m is not relay]
        got, acked = _round(left, "after the kill", timeout=60)
        sym.wait(lambda m: m.reach.get("resa") not in (None, relay.name), 30, "resa through another member")
        more = [_round(left, f"then {n}")[1] for n in range(3)]
        with capsys.disabled():
            print(f"\n[relay lab] {RELAY_ROUNDS} rounds of 5 lines, each reached all 4 others and acked: "
                  f"{', '.join(f'{t:.2f}' for _, t in times)} s; {relay.name} killed, then a round at once: every line "
                  f"at all 4 left in {got:.2f} s, acked by all still there in "
                  f"{acked:.2f} s (the dead one is dropped after {rtchat.PEER_SILENT_S:g} s without pongs); then "
                  f"{', '.join(f'{t:.2f}' for t in more)} s")
    finally:
        for member in members:
            member.proc.kill()


@pytest.mark.timeout(120)
def test_a_pipe_counts_a_member_reached_through_another(lab, tmp_path):
    """A pipe behind a symmetric NAT, no TURN, --wait-peers 2: opn it reaches, resa only through opn. It sends
    to both, and exits 0 only on resa's own ack; resa's --json has the relayed event and relayed_by."""
    sym, resa, opn = (lab.clients[c] for c in ("symmetric1", "restricted1", "open1"))
    argv = {name: rtchat_argv(name, "--room", "pipe-relay", "--state", str(tmp_path / f"{name}.json"))
            for name in ("sym", "resa", "opn")}
    listeners = [lab.popen(client.name, argv[name] + ["--listen", "--json"], env=lab_env(lab, client, False),
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
                 for name, client in (("opn", opn), ("resa", resa))]
    try:
        sender = lab.run(sym.name, argv["sym"] + ["--wait-peers", "2", "--timeout", "60"],
                         env=lab_env(lab, sym, False), input="through a member\n", timeout=90)
        assert sender.returncode == 0, sender.stderr
        assert "sending to opn, resa (via opn)" in sender.stderr or "sending to resa (via opn), opn" in \
            sender.stderr, sender.stderr
        assert "delivered 1 message(s) to 2 peer(s): opn, resa" in sender.stderr, sender.stderr
    finally:
        for listener in listeners:
            listener.terminate()
    events = [json.loads(line) for line in listeners[1].communicate(timeout=30)[0].splitlines()
              if line.startswith("{")]
    assert {"sym": "opn"} == {e["from"]: e["via"] for e in events if e["type"] == "relayed" and e["via"]}
    assert [(e["from"], e["relayed_by"]) for e in events if e["type"] == "message"] == [("sym", "opn")]
    listeners[0].communicate(timeout=30)
