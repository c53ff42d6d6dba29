"""A NAT lab from Linux network namespaces: real kernels, real NAT, real mosquitto and coturn.

    public  203.0.113.0/24 (a documentation range, inside the lab only): mosquitto on .1:1883, coturn (STUN and
            TURN, UDP and TCP) on .1:3478 and .2:3478; a default route to a gateway nobody is swallows packets for
            addresses that do not exist here (coturn 4.6 closes a whole allocation when one relayed send fails with
            "Network is unreachable", e.g. towards a peer's private host candidate)
    client  one namespace per client, behind a router namespace of its own doing NAT of the client's kind:
              open        no NAT: the client sits on the public segment
              fullcone    endpoint-independent mapping and filtering (conntrack maps independently of the
                          destination but filters by remote address and port; DNAT of all inbound UDP opens it)
              restricted  endpoint-independent mapping, address-and-port-dependent filtering (plain MASQUERADE)
              symmetric   a new mapping for every destination (MASQUERADE --random-fully)
              udpblocked  like restricted, and a firewall drops all UDP: only TCP (MQTT, TURN over TCP) gets out

Every namespace is named rtlab-<pid>-..., so labs of concurrent runs never meet; close() kills what runs inside
and deletes them, and a new lab first removes those of a run that died without closing its own.

Run as a script inside a namespace it serves the lab's own probes (see `main`): `stun` sends STUN binding requests
to several servers from one socket and prints the mapped addresses as JSON, then reports whether a datagram from
elsewhere got through; `knock` sends such a datagram; `member` is an rtchat.py room member driven by its stdin
(a line is said in the room) that prints what it gets and whom it reaches as JSON lines.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

PUBLIC = "203.0.113"
SERVER, SERVER2, SINK = f"{PUBLIC}.1", f"{PUBLIC}.2", f"{PUBLIC}.254"
STUN_PORT, BROKER_PORT = 3478, 1883
TURN_USER, TURN_PASSWORD, TURN_REALM = "rtchat", "lab-secret", "rtchat.lab"
KINDS = ("open", "fullcone", "restricted", "symmetric", "udpblocked")
PREFIX = "rtlab-"
HERE = Path(__file__).resolve().parent


def unavailable() -> str | None:
    """Why the lab cannot be built here, or None."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        return "the NAT lab needs root on Linux (network namespaces, iptables)"
    for tool, package in (("ip", "iproute2"), ("iptables", "iptables"), ("turnserver", "coturn"),
                          ("mosquitto", "mosquitto")):
        if not (shutil.which(tool) or Path(f"/usr/sbin/{tool}").exists()):
            return f"the NAT lab needs {tool} (apt-get install {package}; .ci/run installs it)"
    probe = f"{PREFIX}{os.getpid()}-probe"
    made = _sh("ip", "netns", "add", probe, check=False)
    _sh("ip", "netns", "del", probe, check=False)
    if made.returncode != 0:
        return f"the NAT lab cannot make network namespaces here: {made.stderr.strip()}"
    return None


def _sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {result.stderr.strip() or result.returncode}")
    return result


def _pid_alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def _remove_namespace(ns: str) -> None:
    pids = _sh("ip", "netns", "pids", ns, check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    _sh("ip", "netns", "del", ns, check=False)


def remove_stale_labs() -> None:
    """Namespaces of labs whose test run died before it could close them."""
    for entry in _sh("ip", "netns", "list", check=False).stdout.split("\n"):
        name = entry.split(" ")[0]
        if name.startswith(PREFIX):
            pid = name[len(PREFIX):].split("-")[0]
            if pid.isdigit() and not _pid_alive(int(pid)):
                _remove_namespace(name)


@dataclass
class Client:
    name: str
    kind: str
    ns: str
    address: str          # its own address (private behind a router, public when open)
    public: str           # its router's public address (its own when open)


class Lab:
    """The public segment with its servers, and clients of the given kinds. Use as a context manager."""

    def __init__(self, workdir: Path, clients: list[tuple[str, str]]) -> None:
        self.workdir = workdir
        self.tag = f"{PREFIX}{os.getpid()}-{os.urandom(2).hex()}"
        self.pub = f"{self.tag}-pub"
        self.namespaces: list[str] = []
        self.clients: dict[str, Client] = {}
        self.procs: list[subprocess.Popen] = []
        self._wanted = clients

    # -- building ---------------------------------------------------------------------------
    def __enter__(self) -> Lab:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _netns(self, role: str) -> str:
        ns = f"{self.tag}-{role}"
        _sh("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        self.ip(ns, "link", "set", "lo", "up")
        return ns

    def ip(self, ns: str, *args: str) -> None:
        _sh("ip", "-n", ns, *args)

    def iptables(self, ns: str, *args: str) -> None:
        _sh("ip", "netns", "exec", ns, "iptables", "-w", *args)

    def start(self) -> None:
        remove_stale_labs()
        pub = self._netns("pub")
        self.ip(pub, "link", "add", "name", "br0", "type", "bridge")
        self.ip(pub, "link", "set", "br0", "up")
        for address in (SERVER, SERVER2):
            self.ip(pub, "addr", "add", f"{address}/24", "dev", "br0")
        # A default route to a gateway nobody is: what has nowhere to go is swallowed, silently.
        self.ip(pub, "neigh", "add", SINK, "lladdr", "02:00:00:00:00:fe", "dev", "br0", "nud", "permanent")
        self.ip(pub, "route", "add", "default", "via", SINK)
        for number, (name, kind) in enumerate(self._wanted, start=10):
            self._add_client(number, name, kind)
        self._start_broker()
        self._start_turn()

    def _uplink(self, ns: str, number: int, device: str) -> str:
        """A veth from ns onto the public bridge; returns the public address given to it."""
        port = f"p{number}"
        self.ip(ns, "link", "add", "name", device, "type", "veth", "peer", "name", port, "netns", self.pub)
        self.ip(self.pub, "link", "set", port, "master", "br0")
        self.ip(self.pub, "link", "set", port, "up")
        address = f"{PUBLIC}.{number}"
        self.ip(ns, "addr", "add", f"{address}/24", "dev", device)
        self.ip(ns, "link", "set", device, "up")
        self.ip(ns, "route", "add", "default", "via", SERVER)  # the public segment drops what is not for it
        return address

    def _add_client(self, number: int, name: str, kind: str) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown client kind {kind!r}")
        client_ns = self._netns(name)
        if kind == "open":
            address = self._uplink(client_ns, number, "eth0")
            self.clients[name] = Client(name, kind, client_ns, address, address)
            return
        router = self._netns(f"{name}-router")
        public = self._uplink(router, number, "wan")
        lan, address = f"10.0.{number}.1", f"10.0.{number}.2"
        self.ip(router, "link", "add", "name", "lan", "type", "veth", "peer", "name", "eth0", "netns", client_ns)
        self.ip(router, "addr", "add", f"{lan}/24", "dev", "lan")
        self.ip(router, "link", "set", "lan", "up")
        self.ip(client_ns, "addr", "add", f"{address}/24", "dev", "eth0")
        self.ip(client_ns, "link", "set", "eth0", "up")
        self.ip(client_ns, "route", "add", "default", "via", lan)
        _sh("ip", "netns", "exec", router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        # A home router answers nothing on its public side: unsolicited UDP is dropped, not refused by ICMP.
        self.iptables(router, "-A", "INPUT", "-i", "wan", "-p", "udp", "-j", "DROP")
        self.iptables(router, "-t", "nat", "-A", "POSTROUTING", "-o", "wan", "-j", "MASQUERADE",
                      *(["--random-fully"] if kind == "symmetric" else []))
        if kind == "fullcone":
            self.iptables(router, "-t", "nat", "-A", "PREROUTING", "-i", "wan", "-p", "udp", "-j", "DNAT",
                          "--to-destination", address)
        if kind == "udpblocked":
            self.iptables(router, "-A", "FORWARD", "-p", "udp", "-j", "DROP")
        self.clients[name] = Client(name, kind, client_ns, address, public)

    def _start_broker(self) -> None:
        conf = self.workdir / "lab-mosquitto.conf"
        conf.write_text(f"listener {BROKER_PORT} {SERVER}\nallow_anonymous true\npersistence false\n"
                        "log_dest stdout\n")
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.popen(self.pub, [binary, "-c", str(conf)], log="lab-mosquitto.log")
        self._wait_listening(SERVER, BROKER_PORT, "mosquitto", "lab-mosquitto.log")

    def _start_turn(self) -> None:
        conf = self.workdir / "lab-turnserver.conf"  # given, so that /etc/turnserver.conf is never read
        conf.write_text("")
        self.popen(self.pub, [
            shutil.which("turnserver") or "/usr/bin/turnserver", "-c", str(conf), "-n", "--no-cli", "--no-tls",
            "--no-dtls", "--listening-ip", SERVER, "--listening-ip", SERVER2, "--listening-port", str(STUN_PORT),
            "--relay-ip", SERVER, "--min-port", "49152", "--max-port", "59999", "--lt-cred-mech",
            "--user", f"{TURN_USER}:{TURN_PASSWORD}", "--realm", TURN_REALM, "--fingerprint",
            "--userdb", str(self.workdir / "lab-turndb"), "--pidfile", str(self.workdir / "lab-turnserver.pid"),
            "--log-file", "stdout", "--simple-log", "--no-software-attribute"], log="lab-turnserver.log")
        for address in (SERVER, SERVER2):
            self._wait_listening(address, STUN_PORT, "turnserver", "lab-turnserver.log")

    def _wait_listening(self, host: str, port: int, what: str, log: str) -> None:
        probe = f"import socket; socket.create_connection(({host!r}, {port}), timeout=0.5).close()"
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.run(self.pub, [sys.executable, "-c", probe]).returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError(f"{what} did not start in the lab: {(self.workdir / log).read_text()[-2000:]}")

    # -- using ------------------------------------------------------------------------------
    def popen(self, ns: str, argv: list[str], log: str | None = None, **options) -> subprocess.Popen:
        """A process inside namespace ns (a client's name or a namespace); it is killed at close()."""
        ns = self.clients[ns].ns if ns in self.clients else ns
        if log is not None:
            options.setdefault("stdout", (self.workdir / log).open("ab"))
            options.setdefault("stderr", subprocess.STDOUT)
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], **options)
        self.procs.append(proc)
        return proc

    def run(self, ns: str, argv: list[str], timeout: float = 60, **options) -> subprocess.CompletedProcess:
        ns = self.clients[ns].ns if ns in self.clients else ns
        return subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True,
                              timeout=timeout, **options)

    @property
    def broker_url(self) -> str:
        return f"mqtt://{SERVER}:{BROKER_PORT}"

    @staticmethod
    def stun_urls() -> list[str]:
        return [f"stun:{SERVER}:{STUN_PORT}", f"stun:{SERVER2}:{STUN_PORT}"]

    @staticmethod
    def turn_url(tcp: bool = False, password: str = TURN_PASSWORD) -> str:
        return f"turn:{TURN_USER}:{password}@{SERVER}:{STUN_PORT}" + ("?transport=tcp" if tcp else "")

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            if proc.stdout and not proc.stdout.closed and hasattr(proc.stdout, "close"):
                proc.stdout.close()
        for ns in reversed(self.namespaces):
            _remove_namespace(ns)
        self.namespaces.clear()


# =============================================================================
# Probes run inside a namespace: python netlab.py stun|knock ...
# =============================================================================

def _binding(sock: socket.socket, server: tuple[str, int], wait: float) -> tuple[str, int] | None:
    from aioice import stun
    request = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        sock.sendto(bytes(request), server)
        sock.settimeout(min(0.5, max(0.01, deadline - time.monotonic())))
        try:
            data, addr = sock.recvfrom(2048)
        except TimeoutError:
            continue
        reply = stun.parse_message(data)
        if addr == server and reply.transaction_id == request.transaction_id:
            return tuple(reply.attributes["XOR-MAPPED-ADDRESS"])
    return None


def probe_stun(servers: list[str], knock_wait: float) -> None:
    """Bindings to each server from one socket, printed as JSON; then whether a knock from elsewhere came in."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", 0))
    mapped = []
    for server in servers:
        host, port = server.rsplit(":", 1)
        mapped.append(_binding(sock, (host, int(port)), 3.0))
    print(json.dumps({"local_port": sock.getsockname()[1], "mapped": mapped}), flush=True)
    knocked = None
    if knock_wait > 0 and mapped[0] is not None:
        sock.settimeout(knock_wait)
        try:
            while True:
                data, addr = sock.recvfrom(2048)
                if data == b"knock":
                    knocked = list(addr)
                    break
        except TimeoutError:
            pass
    print(json.dumps({"knocked": knocked}), flush=True)


def knock(host: str, port: int, source_port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((SERVER, source_port))
        for _ in range(3):
            sock.sendto(b"knock", (host, port))
            time.sleep(0.05)


def member(name: str, room_name: str, state: str) -> None:
    """An rtchat.py member (the library, configured from RTCHAT_* like the command line): each stdin line is
    said in the room; printed, one JSON object a line: {"reach": {name: via or null}} whenever whom it reaches
    changes, {"got": text, "from", "via"} for each message, {"acked": text} once every recipient still here
    acked a line."""
    import asyncio
    sys.path.insert(0, str(HERE.parent))
    import rtchat

    def say(**fields) -> None:
        print(json.dumps(fields), flush=True)

    async def run() -> None:
        async with rtchat.Client(name, state=state) as client:
            room = await client.join(room_name)
            reached: dict = {}

            def reach(*_) -> None:
                now = {p.name: p.via[0].name if isinstance(p, rtchat.Remote) and p.via else None
                       for p in room.reachable_peers()}
                if now != reached:
                    reached.clear()
                    reached.update(now)
                    say(reach=now)
            async def watch() -> None:
                while True:
                    await room.sessions.changes.next(1.0)
                    reach()
            watching = asyncio.get_running_loop().create_task(watch())  # noqa: F841 (kept while it runs)
            room.on("message", lambda msg: say(got=msg.text, **{"from": msg.sender, "via": msg.relayed_by}))
            lines: asyncio.Queue = asyncio.Queue()
            loop = asyncio.get_running_loop()
            loop.add_reader(sys.stdin.fileno(), lambda: lines.put_nowait(sys.stdin.readline()))
            while (line := (await lines.get()).strip()):
                msg = room.send(line)
                loop.create_task(acked(room, msg, say))

    async def acked(room, msg, say) -> None:
        """(one that left, or died, before it acked is not waited for once it is gone)"""
        while room.ledger.awaiting(msg.id) & {p.name for p in room.reachable_peers()}:
            await room.ledger.changed.next(1.0)
        say(acked=msg.text)
    asyncio.run(run())


def main(argv: list[str]) -> None:
    if argv[0] == "member":
        member(*argv[1:4])
    elif argv[0] == "stun":
        probe_stun(argv[1].split(","), float(argv[2]))
    elif argv[0] == "knock":
        knock(argv[1], int(argv[2]), int(argv[3]))
    else:
        raise SystemExit(f"unknown probe {argv[0]!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
