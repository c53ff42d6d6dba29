#!/usr/bin/env python3
# /// script
# requires-python = ">=3.10"
# dependencies = ["aiortc>=1.9", "paho-mqtt>=2", "prompt_toolkit>=3", "cryptography>=42", "websockets>=13"]
# ///
"""rtchat: serverless, end-to-end encrypted group chat in one file.

Peers meet on an MQTT broker, then talk directly over WebRTC data channels.
Speaks the RTChat wire protocol, so terminals and the RTChat web page share rooms.

    python rtchat.py alice                        chat in room "chat"
    python rtchat.py alice --room ops             chat in room "ops"
    echo "deploy done" | python rtchat.py ci      pipe lines into a room
    python rtchat.py bot --listen --json          NDJSON on stdout for scripts

Library: import rtchat (see __all__). Plugins: contrib/*.py next to this file.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import dataclasses
import errno
import functools
import getpass
import hashlib
import importlib.util
import itertools
import json
import logging
import math
import os
import random
import re
import secrets
import shutil
import stat
import sys
import tempfile
import threading
import time
import unicodedata
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

try:  # Unix only; on other systems the state file is not locked across processes.
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

try:  # Checked in main() and Client(): a missing package is one clear line, not a traceback.
    import paho.mqtt.client as mqtt
    from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
    from aiortc.sdp import candidate_from_sdp
    from cryptography.exceptions import InvalidSignature, InvalidTag
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
except ImportError:
    pass
except KeyboardInterrupt:  # Ctrl-C while they load (a good part of a second): the command stops as it would later
    if __name__ != "__main__":
        raise
    sys.exit(130)

__version__ = "0.3.0"
__all__ = [
    "Client", "Room", "Peer", "Message", "Question", "ReceivedFile", "Context", "Session", "Plugins", "Store",
    "Identity", "PeerJSMesh", "PeerJSPlace", "MeshMember", "command", "question", "on", "EVENTS", "__version__",
    "RtchatError", "UsageError", "BrokerUnreachable", "NoPeers", "StateError", "KeyMismatch", "AskError",
    "PeerServerUnreachable", "NameTaken", "PeerServerRefused", "PeerUnavailable",
]

log = logging.getLogger("rtchat")

DEFAULT_BROKER = "wss://broker.emqx.io:8084/mqtt"          # rtchat-wire.md §1.1
DEFAULT_ROOM = "chat"                                       # the widget's default room, §3.3
TOPIC_BASE = "mrtchat/"                                     # §3.1
DEFAULT_ICE = ["stun:stun.l.google.com:19302"] + [f"stun:stun{n}.l.google.com:19302" for n in range(1, 5)]  # §1.2
CHANNELS = ("connectedViaRTC", "dm", "chat", "question", "answer", "ping", "pong",
            "streamice", "streamoffer", "streamanswer", "endcall")  # offerer creates these, §5.2
TEXT_CHANNELS = CHANNELS[:7]           # between rtchat.py peers: no calls, so four handshakes fewer
CLIENT_TAG = f"rtchat-py/{__version__}"                     # userInfo.client, §9.3
INBOX_TAG_RE = re.compile(r"[0-9a-f]{16}")             # userInfo.inbox: the subtopic an rtchat.py peer reads

MAX_PAYLOAD_BYTES = 64 * 1024          # MQTT payload cap, §9.2
MAX_DECOMPRESSED_CHARS = 256 * 1024    # lz-string output cap, §9.2
MAX_FRAME_CHARS = 256 * 1024           # data-channel frame cap (aiortc max-message-size)
MAX_TEXT_CHARS = 16 * 1024             # longest chat line we send or show
MAX_NAME_CHARS = 64
MAX_KEY_CHARS = 4096
MAX_PENDING_CANDIDATES = 64            # per sender, §5.3
MAX_PENDING_SESSIONS = 32              # sessions being set up with unpinned names: each is a PeerConnection
MAX_SEEN_PEERS = 256                   # names announced but never connected, kept per room (oldest go first) ...
SEEN_EXPIRE_S = 90.0                   # ... and for this long after their last announcement (three re-announces)
CONNECT_TIMEOUT_S = 20.0               # a session not open by then is dropped
NO_PATH_AFTER_S = 10.0                 # ICE checks with no working pair by then never get one (aioice: ~60 s)
RETRY_AFTER_S, RETRY_MAX_S = 15.0, 300.0  # after no path: try again this much later, doubling, up to the max
ANSWER_WAIT_S = 6.0                    # wait_for_room waits this long for an answer to our offer (aiortc answers
#                                        in ~0.1 s, or after 5 s when its STUN server does not reply)
MAX_NONCES = 200_000                   # replay cache under a flood; a live session is also guarded by its own stamp
CLOCK_SKEW_S = 120                     # envelope timestamp window, §9.2
RATE_PER_SENDER = (20.0, 60)           # signaling messages: per second, burst
ANNOUNCE_EVERY_S = (3, 3, 3, 3, 3, 30)  # while no peer is connected; the last repeats, §4.4
REANNOUNCE_MIN_S = 0.1                 # announces answering newcomers are coalesced to one per this interval
ANSWER_CONNECT_BUDGET = (20.0, 40)     # connects answered on the newcomer's inbox (per second, burst); beyond: the
#                                        coalesced announcement
OFFER_DEDUP_S = 1.1                    # one offer per peer per this interval, §4.4
FALLBACK_OFFER_S = 2.0                 # we offer anyway if a browser that should offer stays silent
FALLBACK_OFFER_PY_S = 6.0              # the same for an rtchat.py peer: it agrees who offers, so only if lost
STUCK_AFTER_S = 20.0                   # a session not open by then is restarted when its peer announces
VERIFY_TIMEOUT_S = 10.0
PING_EVERY_S = 2.0
PEER_SILENT_S = 8.0                    # no pong from a peer that used to answer: gone
PROBE_TIMEOUT_S = 1.5                  # an unload/offer hint for a live session is checked by ping
ASK_TIMEOUT_S = 10.0
ANSWER_TIMEOUT_S = 8.0                 # a question handler that takes longer fails, in time for the asker to hear why
HISTORY_PER_ROOM = 500
COMMIT_GATHER_S = 0.002                # history writes (and so acks) are grouped: one fsync for what came within
COMMIT_EVERY_S = 0.1                   # this, and no more often than this while messages keep coming
COMMIT_SLICE = 32                      # messages written (or signatures sent) between looks at what arrived
SIGNATURE_WAIT_S = 10.0                # a message whose signature does not follow is kept, but not passed on
MAX_UNSIGNED = 10000                   # messages waiting for their signatures, per room
FILE_CHUNK_BYTES = 16 * 1024           # files go in chunks this size on a channel of their own ...
FILE_BUFFER_BYTES = (256 * 1024, 1024 * 1024)  # ... sending pauses above the second until below the first
MAX_FILE_BYTES = 4 * 1024 ** 3
MAX_INCOMING_FILES = 4                 # at once, per room
FILE_IDLE_S = 30.0                     # a transfer that stalls this long is given up
FILE_SYNC_BYTES = 4 * 1024 * 1024      # a file being received goes to disk in steps of this, in the background
FILE_DISK_RESERVE = 64 * 1024 ** 2     # a file is refused if it would leave less free space than this
FILE_PROGRESS_EVERY_S = 0.25          # a transfer reports its progress at most this often
ACCEPT_NEXT_KEY_S = 600.0              # after /trust NAME with no key to pin, the next key NAME proves is pinned
REFUSAL_HINT_EVERY_S = 30.0            # we tell a refused peer why at most this often per name
BACKFILL_MAX = 200                     # messages one peer passes another when they meet
FRESH_BACKFILL_MS = 3000               # in a large room history said less than this long ago waits: it may come
#                                        as news too, by gossip, a little later
BACKFILL_FRAME_CHARS = 48 * 1024
SETTLE_S = 0.25                        # a room is complete once nobody new was heard of for this long (since
#                                        joining: everyone there answers our announcement within ~0.1 s)
LEAVE_DRAIN_S = 2.0                    # on leaving, what we sent (acks above all) may take this long to arrive
INPUT_HISTORY = 500
STATE_FORMAT = 1
MAX_KNOWN_IDS = 50_000                 # message ids remembered per room beyond the history file, newest kept
MAX_PENDING_WRITES = 5000              # messages kept for the history while the disk refuses them; retried ...
DISK_RETRY_S = 1.0                     # ... this often, and acknowledged once written
SCTP_MAX_MESSAGE_BYTES = 256 * 1024    # what aiortc advertises (a=max-message-size:262144): a longer one is refused
SCTP_MAX_HELD_BYTES = 4 * 1024 ** 2    # bytes a peer may leave in our SCTP reassembly (our window is 1 MiB) ...
SCTP_CHUNK_COST = 256                  # ... counting each chunk as this much more (tiny chunks cost objects)
REPLY_BUFFER_BYTES = 1024 ** 2         # what we send because a peer asked waits while its channel holds this much
SEND_BUFFER_BYTES = 4 * 1024 ** 2      # our own messages queue (in order, in memory) while a channel holds this much
MAX_UNSIGNED_BYTES = 4 * 1024 ** 2     # per peer: text waiting for its signature; beyond, the oldest is written
RECENT_PAYLOADS = 8192                 # digests of broker payloads just handled: an identical one is a replay
# Per-peer budgets, (per second, burst): what one peer may make us do. Beyond them its requests are dropped.
FRAME_BUDGET = (2000.0, 10000)         # data-channel frames of any kind, each parsed as JSON
CHAT_BUDGET = (600.0, 3000)            # chat and dm frames (16 KiB messages at ~500/s is the bulk benchmark's pace)
SEND_PACE = (500.0, 2000)              # what we send one peer, kept under its CHAT_BUDGET (then queued, in order)
SYNC_BUDGET = (1 / 60, 2)              # history sync requests: one per session is what rtchat.py sends
IDENTIFY_BUDGET = (0.1, 4)             # identify/challenge: each costs an RSA signature (1.3 ms)
MAX_QUESTIONS_AT_ONCE = 8              # other questions being answered for one peer (each runs a handler)
FILE_OFFER_BUDGET = (0.5, 8)           # file offers
MAX_FILES_PER_PEER = 2                 # transfers at once from one peer (of MAX_INCOMING_FILES per room)
FILE_MIN_PROGRESS = 64 * 1024          # bytes a transfer must bring every FILE_IDLE_S, or it is given up
SIGNAL_FRAME_BUDGET = (10.0, 40)       # signaling frames: to pass on (each member it goes to counts) or for us
MAX_ASSISTED_BYTES = 16 * 1024         # one envelope passed on through a member (an offer is 1-2 KiB)
ASSIST_RESEND_TARGETS = 8              # peers whose last envelopes go again through a member just verified
ASSIST_MEMBERS = 3                     # members asked to pass on one envelope of ours (its target's last carrier first)
LZ_BUDGET = (1024 ** 2, 4 * 1024 ** 2)  # compressed bytes of lz-string per second (and burst) decoded per room
KEY_SCRYPT = (2 ** 16, 8, 1)           # n, r, p for --passphrase: 64 MiB and ~0.2 s per guess
RELAY_BUDGET = (200.0, 400)            # frames we pass on for one peer (one per recipient) ...
RELAY_BYTES_BUDGET = (1024 ** 2, 4 * 1024 ** 2)  # ... and their bytes (one copy per recipient)
RELAY_MAX_CHARS = 64 * 1024            # one frame passed on: a sealed 16 KiB direct message fits
BOX_BUDGET = (50.0, 200)               # sealed direct messages opened per relaying peer (an RSA decryption each)
REACH_BUDGET = (5.0, 40)               # reach frames (each may cost RSA checks of the keys it names): above
#                                        what one peer sends (at most one per REACH_GATHER_S, and one per hello)
MAX_REACH = 32                         # members one peer says it reaches (larger rooms: gossip)
GOSSIP_BUDGET = (400.0, 2000)          # gossip frames from one neighbour in a large room
REACH_GATHER_S = 0.5                   # changes in whom we reach are told together, after this (told at once,
#                                        they slowed the first lines of a room just formed)
RELAY_ACK_WAIT_S = 2.0                 # a message through a member not acknowledged by then goes through another
RELAY_GIVE_UP_S = 60.0                 # ... until this long after it was first sent
GONE_GRACE_S = 5.0                     # a peer that left us is not taken as reached through others meanwhile (the
#                                        others may not have seen it go yet)
MAX_RELAYED_PENDING = 2000             # our messages through members awaiting their recipients' acks

EVENTS = ("message", "dm", "join", "leave", "verified", "key-changed", "delivered", "file", "status", "history",
          "no-route", "file-progress", "question-failed", "key-accepted", "key-refused", "disk-error", "disk-ok",
          "history-conflict", "compaction-failed", "mitm-detected", "verify-failed", "queued", "relayed",
          "relay-refused")
"""Event names: what Room emits and plugins subscribe to with @on. "message" and "dm" are news only: a message
said before we joined, passed on by a peer, is a "history" event (msg.history is True). They are also the --json
`type` values, except that a history message keeps its own type ("message") and is marked "history": true."""

EX_USAGE, EX_UNAVAILABLE, EX_TEMPFAIL, EX_NOPERM, EX_CONFIG = 2, 69, 75, 77, 78
EX_NOUSER, EX_CANTCREAT, EX_PROTOCOL = 67, 73, 76   # PeerJS: user not online, name taken, server refused us

_CONTROL_RE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b.|[\x00-\x1f\x7f-\x9f]")
# Unicode categories Cf (format: bidi overrides, invisible marks; ZWJ U+200D kept for emoji), Co, Cs, Zl, Zp.
_INVISIBLE_RE = re.compile(
    "[\u00ad\u0600-\u0605\u061c\u06dd\u070f\u0890\u0891\u08e2\u180e\u200b\u200c\u200e\u200f\u202a-\u202e"
    "\u2028\u2029\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb\U000110bd\U000110cd\U00013430-\U0001343f"
    "\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0001\U000e0020-\U000e007f"
    "\ue000-\uf8ff\U000f0000-\U000ffffd\U00100000-\U0010fffd\ud800-\udfff]")


def clean(text: Any, limit: int = MAX_TEXT_CHARS, keep_newlines: bool = False) -> str:
    """Make a peer-controlled value safe for a terminal: no escapes, no control characters, bounded."""
    text = str(text)[: limit * 2]
    if text.isprintable() or (keep_newlines and text.replace("\n", "").isprintable()):
        return text[:limit]  # the usual case: str.isprintable refuses every character stripped below, fast
    if keep_newlines:
        return "\n".join(clean(line, limit) for line in text.split("\n"))[:limit]
    text = _CONTROL_RE.sub(lambda m: " " if m.group() in "\t\n\r" else "", text)
    return _INVISIBLE_RE.sub("", text)[:limit]


def is_encodable(text: str) -> bool:
    """Can this string be written as UTF-8? JSON from a peer may hold lone surrogates (a "\\ud800" escape)."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def now_ms() -> int:
    return int(time.time() * 1000)


class Budget:
    """A token bucket: how much of something one peer (or one room) may make us do, per second, with a burst."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate_and_burst: tuple[float, float]) -> None:
        self.rate, self.burst = rate_and_burst
        self.tokens = float(self.burst)
        self.stamp = time.monotonic()

    def _refill(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.stamp) * self.rate)  # a clock passed in may
        self.stamp = now                                                                     # start anywhere

    def take(self, amount: float = 1.0, now: float | None = None) -> bool:
        """Spend amount if there is that much (now: the monotonic time, for a caller that passes its clock in)."""
        self._refill(now)
        if self.tokens < amount:
            return False
        self.tokens -= amount
        return True

    def wait_s(self, amount: float = 1.0) -> float:
        """How long until take(amount) would succeed."""
        self._refill()
        return max(0.0, (amount - self.tokens) / self.rate)


class Once:
    """True the first time it is asked about a thing, False after: a warning said once per name. Forgets all past
    max_keys things, so a flood of made-up names costs a bounded set (and at worst a warning said again)."""

    def __init__(self, max_keys: int = 1024) -> None:
        self.max_keys = max_keys
        self._seen: set = set()

    def __call__(self, thing: Any) -> bool:
        if thing in self._seen:
            return False
        if len(self._seen) > self.max_keys:
            self._seen.clear()
        self._seen.add(thing)
        return True

    def __len__(self) -> int:
        return len(self._seen)


class RateLimit:
    """A token bucket per key: per_second on average, bursts up to burst. Forgets everyone past max_keys keys."""

    def __init__(self, per_second: float, burst: int, max_keys: int = 4096) -> None:
        self.per_second, self.burst, self.max_keys = per_second, burst, max_keys
        self._buckets: dict[Any, tuple[float, float]] = {}

    def allow(self, key: Any, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        tokens, last = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.per_second)
        if len(self._buckets) >= self.max_keys and key not in self._buckets:
            self._buckets.clear()
        self._buckets[key] = (tokens - 1 if tokens >= 1 else tokens, now)
        return tokens >= 1

    @property
    def size(self) -> int:
        return len(self._buckets)


def _spawn(coro, name: str | None = None) -> asyncio.Task:
    """Start a task whose failure is logged rather than lost."""
    task = asyncio.ensure_future(coro)
    task.add_done_callback(_log_task_failure)
    if name:
        task.set_name(name)
    return task


def _log_task_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("task %s failed", task.get_name(), exc_info=task.exception())


class Tasks:
    """Background work with an owner: tasks and timers are kept until they end (a failure is logged), and close()
    cancels and awaits what is left, so nothing outlives the object that started it."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task] = set()
        self._timers: set[asyncio.TimerHandle] = set()

    def spawn(self, coro, name: str | None = None) -> asyncio.Task:
        task = _spawn(coro, name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def later(self, delay: float, callback: Callable, *args: Any) -> asyncio.TimerHandle:
        """callback(*args) after delay seconds, unless cancelled (the handle's cancel(), or close())."""
        def fire() -> None:
            self._timers.discard(handle)
            callback(*args)
        handle = asyncio.get_running_loop().call_later(delay, fire)
        if len(self._timers) >= 64:  # timers cancelled by their handle never fire: forget them now and then
            self._timers = {timer for timer in self._timers if not timer.cancelled()}
        self._timers.add(handle)
        return handle

    @property
    def busy(self) -> bool:
        """Tasks not ended yet (cancelled ones too, until they have unwound)."""
        return bool(self._tasks)

    def cancel(self) -> None:
        """Cancel everything now, for a caller that cannot wait (close() also waits for the tasks to end)."""
        for handle in self._timers:
            handle.cancel()
        self._timers.clear()
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()

    async def close(self) -> None:
        self.cancel()
        running = [t for t in self._tasks if t is not asyncio.current_task()]
        if running:
            await asyncio.gather(*running, return_exceptions=True)


async def off_loop(func: Callable, *args: Any) -> Any:
    """func(*args) in a worker thread: blocking file I/O stays off the event loop. If the awaiting task is cancelled
    meanwhile, the call is still waited for before the cancellation goes on: a write must not lose its file."""
    future = asyncio.get_running_loop().run_in_executor(None, func, *args)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await future
        raise


class Pulse:
    """Wakes everyone waiting each time it fires: something they wait for may have come about."""

    def __init__(self) -> None:
        self._future: asyncio.Future | None = None

    def fire(self) -> None:
        if self._future is not None and not self._future.done():
            self._future.set_result(None)
        self._future = None

    async def next(self, timeout: float) -> None:
        """Until it fires next, or timeout."""
        if self._future is None:
            self._future = asyncio.get_running_loop().create_future()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._future), timeout)

    async def until(self, done: Callable[[], bool], timeout: float) -> bool:
        """Until done(), looked at each time this fires; False at timeout."""
        deadline = time.monotonic() + timeout
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            await self.next(left)
        return True


class Emitter:
    """Minimal event emitter: a listener's exception is logged and never reaches the emitter."""

    def __init__(self) -> None:
        self._listeners: dict[str, list[Callable]] = {}

    def on(self, event: str, listener: Callable) -> Callable:
        self._listeners.setdefault(event, []).append(listener)
        return listener

    def off(self, event: str, listener: Callable) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._listeners[event].remove(listener)

    def emit(self, event: str, *args: Any) -> None:
        for listener in list(self._listeners.get(event, ())):
            try:
                result = listener(*args)
                if asyncio.iscoroutine(result):
                    _spawn(result, f"on-{event}")
            except Exception:
                log.exception("listener for %r failed", event)


# =============================================================================
# Errors: problems a user can fix. str(e) is the whole message; main() prints it
# and exits with exit_code. Library sections raise these, only main() exits.
# =============================================================================

class RtchatError(Exception):
    """A problem the user can fix; str(e) is the whole message."""
    exit_code = 1


class UsageError(RtchatError):
    """Bad input from the user (a command, an option, a name)."""
    exit_code = EX_USAGE


class BrokerUnreachable(RtchatError):
    exit_code = EX_UNAVAILABLE


class NoPeers(RtchatError):
    exit_code = EX_TEMPFAIL


class StateError(RtchatError):
    exit_code = EX_CONFIG


class KeyMismatch(RtchatError):
    """A peer's key was refused (not the one pinned for its name)."""
    exit_code = EX_NOPERM


class AskError(RtchatError):
    """A question got no usable answer (timeout, no handler, peer gone)."""


class PeerServerUnreachable(BrokerUnreachable):
    """The PeerJS server cannot be reached, or closed the connection before letting us in."""


class NameTaken(RtchatError):
    """Someone else is logged in under this name on the PeerJS server (ID-TAKEN)."""
    exit_code = EX_CANTCREAT


class PeerServerRefused(RtchatError):
    """The PeerJS server said no: an invalid key, too many clients (ERROR)."""
    exit_code = EX_PROTOCOL


class PeerUnavailable(RtchatError):
    """Nobody by that name is on the PeerJS server (EXPIRE), or the connection to them failed."""
    exit_code = EX_NOUSER


_PACKAGES = {"aiortc": "aiortc", "paho": "paho-mqtt", "prompt_toolkit": "prompt_toolkit",
             "cryptography": "cryptography"}


def missing_packages() -> list[str]:
    return [pkg for module, pkg in _PACKAGES.items() if importlib.util.find_spec(module) is None]


def require_packages() -> None:
    missing = missing_packages()
    if missing:
        raise missing_packages_error(missing, list(_PACKAGES.values()))


def missing_packages_error(missing: list[str], install: list[str]) -> RtchatError:
    return RtchatError(f"missing Python packages: {', '.join(missing)}. Install them with:\n"
                       f"    {Path(sys.executable).name} -m pip install {' '.join(install)}\n"
                       f"  (or run this file with `uv run rtchat.py` / `pipx run rtchat.py`)")


# =============================================================================
# Wire: lz-string (compressToUint8Array), RTChat envelopes, canonical JSON.
# Pure functions of bytes and strings; everything from the network is capped.
# =============================================================================

def _to_units(text: str) -> str:
    """The string as JS sees it: one character per UTF-16 code unit."""
    raw = text.encode("utf-16-be", "surrogatepass")
    return "".join(chr((raw[i] << 8) | raw[i + 1]) for i in range(0, len(raw), 2))


def _from_units(units: str) -> str:
    """Join UTF-16 code units back into a Python string (surrogate pairs become one character)."""
    return units.encode("utf-16-be", "surrogatepass").decode("utf-16-be", "surrogatepass")


def lz_compress(text: str) -> bytes:
    """lz-string 1.4.4 compressToUint8Array: byte-for-byte what browsers produce.

    Bits are collected as '0'/'1' text and packed once at the end (a bit loop in Python cost 2 ms an offer);
    lz-string writes each value least significant bit first, hence the reversed digits."""
    dictionary: dict[str, int] = {}
    to_create: set[str] = set()
    out: list[str] = []
    w = ""
    enlarge_in, dict_size, num_bits = 2, 3, 2

    def emit_w() -> None:
        nonlocal enlarge_in, num_bits
        if w in to_create:
            code = ord(w[0])
            if code < 256:
                out.append("0" * num_bits + f"{code:08b}"[::-1])
            else:
                out.append(f"{1:0{num_bits}b}"[::-1] + f"{code:016b}"[::-1])
            enlarge_in -= 1
            if enlarge_in == 0:
                enlarge_in, num_bits = 1 << num_bits, num_bits + 1
            to_create.discard(w)
        else:
            out.append(f"{dictionary[w]:0{num_bits}b}"[::-1])
        enlarge_in -= 1
        if enlarge_in == 0:
            enlarge_in, num_bits = 1 << num_bits, num_bits + 1

    for c in _to_units(text):
        if c not in dictionary:
            dictionary[c] = dict_size
            dict_size += 1
            to_create.add(c)
        wc = w + c
        if wc in dictionary:
            w = wc
        else:
            emit_w()
            dictionary[wc] = dict_size
            dict_size += 1
            w = c
    if w:
        emit_w()
    out.append(f"{2:0{num_bits}b}"[::-1])
    bits = "".join(out)
    bits += "0" * (16 - len(bits) % 16)
    return int(bits, 2).to_bytes(len(bits) // 8, "big")


def lz_decompress(data: bytes, max_chars: int = MAX_DECOMPRESSED_CHARS) -> str | None:
    """lz-string 1.4.4 decompressFromUint8Array; None where JS gives null, "" or throws, or past max_chars.

    Every rtchat.py in a room decodes every signaling message, so this is hot: the stream becomes '0'/'1' text,
    reversed, so that a value (written least significant bit first) is one slice, read from the end down."""
    if not data or len(data) % 2:
        return None
    end = len(data) * 8
    bits = "0" * 64 + f"{int.from_bytes(data, 'big'):0{end}b}"[::-1]  # reversed; past the end JS reads zeros
    pos = len(bits)  # values are read downwards through the reversed text

    def read(count: int) -> int:
        nonlocal pos
        pos -= count
        return int(bits[pos:pos + count], 2)

    dictionary: list[str] = ["", "", ""]
    kind = read(2)
    if kind == 2:
        return None
    c = chr(read(8 if kind == 0 else 16))
    dictionary.append(c)
    w, result, total = c, [c], 1
    enlarge_in, num_bits = 4, 3
    while True:
        if pos <= 64:
            return None
        pos -= num_bits
        code = int(bits[pos:pos + num_bits], 2)
        if code < 2:
            dictionary.append(chr(read(8 if code == 0 else 16)))
            code = len(dictionary) - 1
            enlarge_in -= 1
        elif code == 2:
            return _from_units("".join(result))
        if enlarge_in == 0:
            enlarge_in, num_bits = 1 << num_bits, num_bits + 1
        if code < len(dictionary):
            entry = dictionary[code]
        elif code == len(dictionary):
            entry = w + w[0]
        else:
            return None
        total += len(entry)
        if total > max_chars:
            return None
        result.append(entry)
        dictionary.append(w + entry[0])
        enlarge_in -= 1
        w = entry
        if enlarge_in == 0:
            enlarge_in, num_bits = 1 << num_bits, num_bits + 1


# Encoders made once: json.dumps with options would build a new one for every call.
_JSON_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True)
_CANONICAL_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True, sort_keys=True)


def to_json(value: Any) -> str:
    """Compact ASCII JSON, as JS JSON.stringify would send it (ASCII sidesteps UTF-16 length differences)."""
    return _JSON_ENCODER.encode(value)


def canonical_json(value: Any) -> bytes:
    """The bytes a signature covers: sorted keys, compact, ASCII."""
    return _CANONICAL_ENCODER.encode(value).encode()


SIGNED_CONTEXTS = {  # a context per purpose: what is signed for one purpose never passes for another
    "signaling": b"rtchat-signaling-v1\n",     # an offer, answer, announcement or hint, by its sender
    "channel-id": b"rtchat-channel-id-v1\n",   # an identity claiming a data channel, inside that channel
    "message-id": b"rtchat-message-id-v1\n",   # what a message id is the hash of (bound, not signed)
    "message": b"",                            # a chat message: the message key prefixes all it signs itself
    "message-batch": b"rtchat-message-batch-v1\n",  # the root of a batch of chat messages, by their author
    "relay-ack": b"rtchat-relay-ack-v1\n",     # acks to a member reached through others, by whoever acks
    "relay-box": b"rtchat-relay-box-v1\n",     # what a direct message sealed to its recipient is bound to
    "presence": b"rtchat-presence-v1\n",      # a member of a large room is here, or leaving
}


def signed_bytes(purpose: str, *fields: Any) -> bytes:
    """What a signature (or a bound message id) covers: the purpose's context, then the fields as canonical JSON.
    PROTOCOL.md lists the fields of each purpose; tests build their forgeries with this too."""
    return SIGNED_CONTEXTS[purpose] + canonical_json(list(fields))


MAX_BATCH = 128                        # messages under one batch signature: a proof is then at most 7 hashes


def batch_leaf(signed: bytes) -> bytes:
    """A message's leaf in its author's batch: SHA-256 of 0x00 and the bytes its own signature would cover."""
    return hashlib.sha256(b"\x00" + signed).digest()


def _batch_node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def batch_tree(leaves: list[bytes]) -> list[list[bytes]]:
    """The Merkle tree over leaves, level by level from the leaves to the root (tree[-1][0]): RFC 9162 §2.1.1's
    tree, in which a node without a partner moves up a level as it is."""
    tree = [leaves]
    while len(level := tree[-1]) > 1:
        pairs = [_batch_node(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        tree.append(pairs + level[len(level) & ~1:])
    return tree


def batch_path(tree: list[list[bytes]], at: int) -> list[bytes]:
    """The audit path of leaf number at: the partners on its way to the root, from the leaf up."""
    path = []
    for level in tree[:-1]:
        if at ^ 1 < len(level):
            path.append(level[at ^ 1])
        at >>= 1
    return path


def batch_root(leaf: bytes, at: int, count: int, path: list[bytes]) -> bytes | None:
    """The root the audit path of leaf number at (of count) leads to (RFC 9162 §2.1.3.2); None if it does not fit."""
    if not 0 <= at < count:
        return None
    fn, sn, node = at, count - 1, leaf
    for sibling in path:
        if sn == 0:
            return None
        if fn & 1 or fn == sn:
            node = _batch_node(sibling, node)
            while not fn & 1 and fn:
                fn, sn = fn >> 1, sn >> 1
        else:
            node = _batch_node(node, sibling)
        fn, sn = fn >> 1, sn >> 1
    return node if sn == 0 else None


def encode_hashes(hashes: list[bytes]) -> str:
    """SHA-256 hashes as one base64 text, as the batch frame and proofs carry them."""
    return base64.b64encode(b"".join(hashes)).decode()


def decode_hashes(value: Any, most: int) -> list[bytes] | None:
    """The SHA-256 hashes in such a text from a peer (at most `most` of them), or None."""
    if not isinstance(value, str) or len(value) > 4 * -(-32 * most // 3):
        return None
    try:
        raw = base64.b64decode(value, validate=True)
    except ValueError:
        return None
    return [raw[i:i + 32] for i in range(0, len(raw), 32)] if len(raw) % 32 == 0 else None


def batch_proof(at: int, count: int, path: list[bytes]) -> dict:
    """What a message keeps (and is passed on with) to be checked alone against its batch's signature."""
    return {"at": at, "of": count, "path": encode_hashes(path)}


def batch_proof_fields(value: Any) -> tuple[int, int, list[bytes]] | None:
    """(at, of, path) of a proof from a peer, or None if it is not one."""
    if not isinstance(value, dict):
        return None
    at, count = value.get("at"), value.get("of")
    if not (type(at) is int and type(count) is int and 0 <= at < count <= MAX_BATCH):
        return None
    path = decode_hashes(value.get("path"), MAX_BATCH.bit_length())
    return None if path is None else (at, count, path)


_ID_POOL: list[str] = []


def new_id() -> str:
    """16 random hex digits (message salts, signaling nonces): unguessable, so a peer cannot take the id of a
    message before it is sent."""
    if not _ID_POOL:
        _ID_POOL.extend(secrets.token_hex(8 * 64)[i:i + 16] for i in range(0, 16 * 64, 16))
    return _ID_POOL.pop()


def parse_json(text: str | bytes) -> Any:
    """json.loads that turns every failure (bad syntax, deep nesting, bad UTF-8) into ValueError."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError, UnicodeDecodeError) as exc:
        raise ValueError(str(exc)[:200]) from None


def small_json(data: Any, limit: int = 4096) -> Any:
    """A short JSON text from a peer (a header, a reply), or None."""
    if not isinstance(data, str) or len(data) > limit:
        return None
    with contextlib.suppress(ValueError):
        return parse_json(data)
    return None


COMPACT_MAGIC = b"\x00rtc1"   # an envelope between rtchat.py peers, on an inbox only they read: zlib'd JSON ...
COMPACT_DICT = (               # ... with this preset dictionary: what every offer and answer repeats. Fixed for rtc1.
    b'{"sender":"","timestamp":17,"subtopic":"RTCAnswer","data":{"localDescription":{"type":"answer","sdp":'
    b'"v=0\\r\\no=- 4004300366 4004300366 IN IP4 0.0.0.0\\r\\ns=-\\r\\nt=0 0\\r\\na=group:BUNDLE 0\\r\\n'
    b'a=msid-semantic:WMS *\\r\\nm=application 5 UDP/DTLS/SCTP webrtc-datachannel\\r\\nc=IN IP4 127.0.0.1\\r\\n'
    b'a=mid:0\\r\\na=sctp-port:5000\\r\\na=max-message-size:262144\\r\\na=candidate: 1 udp 2130706431 192.168.'
    b' typ host\\r\\na=candidate: 1 udp 1694498815  typ srflx raddr  rport \\r\\na=end-of-candidates\\r\\n'
    b'a=ice-ufrag:\\r\\na=ice-pwd:\\r\\na=fingerprint:sha-256 \\r\\na=setup:active\\r\\na=setup:actpass\\r\\n"},'
    b'"target":""},"nonce":"","mk":"","sig":""}{"userInfo":{"client":"rtchat-py/0.2.0","inbox":""},"offer":'
    b'{"localDescription":{"type":"offer","sdp":"RTCOffer')


def encode_envelope(envelope: dict, compact: bool = False) -> bytes:
    """lz-compressed for the room topic: browsers drop raw payloads of even length (rtchat-wire.md §4.1).
    compact: for an rtchat.py peer's inbox (browsers never see it), half the size."""
    if compact:
        deflate = zlib.compressobj(9, zdict=COMPACT_DICT)
        return COMPACT_MAGIC + deflate.compress(to_json(envelope).encode()) + deflate.flush()
    return lz_compress(to_json(envelope))


def decode_envelope(payload: bytes, lz_allowed: Callable[[int], bool] | None = None) -> dict | None:
    """Both dialects (raw JSON, lz-string); None for anything that is not a well-formed envelope.
    lz_allowed(size): may lz-string (slow, ~0.3 ms per KiB) decode this many bytes now?"""
    if not payload or len(payload) > MAX_PAYLOAD_BYTES:
        return None
    envelope = None
    if payload.startswith(COMPACT_MAGIC):
        with contextlib.suppress(ValueError, zlib.error):
            inflate = zlib.decompressobj(zdict=COMPACT_DICT)
            text = inflate.decompress(payload[len(COMPACT_MAGIC):], MAX_DECOMPRESSED_CHARS)
            envelope = parse_json(text) if not inflate.unconsumed_tail else None
    if not isinstance(envelope, dict):
        with contextlib.suppress(ValueError):
            envelope = parse_json(payload.decode("utf-8"))
    if not isinstance(envelope, dict):
        if lz_allowed is not None and not lz_allowed(len(payload)):
            return None
        text = lz_decompress(payload)
        if not text:
            return None
        try:
            envelope = parse_json(text)
        except ValueError:
            return None
    if not isinstance(envelope, dict):
        return None
    sender, subtopic, stamp = envelope.get("sender"), envelope.get("subtopic"), envelope.get("timestamp")
    if not is_wire_name(sender):
        return None  # escapes, control, bidi or invisible characters in a name: never shown, never a Peer
    if not (isinstance(subtopic, str) and len(subtopic) <= 64):
        return None
    if not isinstance(stamp, (int, float)) or isinstance(stamp, bool) or not math.isfinite(stamp):
        return None  # NaN would slip through every time window
    envelope.setdefault("data", None)
    return envelope


# Characters that show as nothing or as blank space: default-ignorable and format characters, Hangul fillers,
# the blank braille pattern and every space but U+0020 (Unicode DerivedCoreProperties; TR39 §3.1). Refused in names.
_NAME_HIDDEN_RE = re.compile(
    "[\u00a0\u00ad\u034f\u061c\u115f\u1160\u1680\u17b4\u17b5\u180b-\u180f\u2000-\u200f\u2028-\u202f"
    "\u205f-\u206f\u2800\u3000\u3164\ufe00-\ufe0f\ufeff\uffa0\ufff0-\ufff8\U0001bca0-\U0001bca3"
    "\U0001d173-\U0001d17a\U000e0000-\U000e0fff]")
ID_RE = re.compile(r"[0-9A-Za-z_-]{1,64}")   # every message id we accept or keep: short, printable ASCII


def is_wire_name(name: Any) -> bool:
    """A peer's wire name we can show and key on: short, printable, nothing invisible, valid UTF-8."""
    return isinstance(name, str) and 0 < len(name) <= MAX_NAME_CHARS + 16 and clean(name) == name \
        and not _NAME_HIDDEN_RE.search(name)


def is_message_id(value: Any) -> bool:
    return isinstance(value, str) and ID_RE.fullmatch(value) is not None


SALT_RE = re.compile(r"[0-9a-f]{16}")


def message_id(sender: str, fp: str | None, stamp: int, text: str, action: bool, salt: str) -> str:
    """A message's id, bound to its author (wire name, key fingerprint) and its exact words: nobody can put other
    words under an id seen in the room. The author's random salt keeps repeated lines apart."""
    digest = hashlib.sha256(signed_bytes("message-id", sender, fp or "", stamp, text, action, salt))
    return digest.hexdigest()[:32]


def is_signature_text(value: Any) -> bool:
    """A signature as rtchat.py sends it, kept to pass on: short base64 (checked when it is passed on)."""
    return isinstance(value, str) and len(value) <= 200 and value.isascii()


def is_message_text(value: Any) -> bool:
    """A message's text we can keep as sent: not too long, and valid Unicode (no lone surrogates)."""
    return isinstance(value, str) and len(value) <= MAX_TEXT_CHARS and is_encodable(value)


# Letters of other scripts (and digits) that look like Latin ones: a compact part of Unicode TR39's confusables,
# for the scripts names are typed in. Compatibility forms (fullwidth, mathematical letters) fold by NFKD.
_CONFUSABLES = str.maketrans(dict(zip(
    "\u0430\u0435\u04bb\u0456\u0458\u04cf\u043e\u0440\u0441\u0443\u0445\u0455\u0501\u051b\u051d\u04af"  # Cyrillic
    "\u0410\u0412\u0415\u0405\u0406\u0408\u041a\u041c\u041d\u041e\u0420\u0421\u0422\u0425\u0423\u04ae"
    "\u051a\u051c\u04c0"
    "\u03b1\u03bf\u03c1\u03bd\u03c5\u03b9\u03ba\u03c7\u03b3\u03b7"                          # Greek
    "\u0391\u0392\u0395\u0396\u0397\u0399\u039a\u039c\u039d\u039f\u03a1\u03a4\u03a5\u03a7"
    "\u0585\u057d\u0581\u0570\u0578\u0566"                                              # Armenian
    "\u0131\u0237\u0251\u0269\u0261\u01c0"                                              # Latin
    "01|I",
    "aehijlopcyxsdqwy" "ABESlJKMHOPCTXYY" "QWl"
    "aopvuikxyn" "ABEZHlKMNOPTYX"
    "oughnq"
    "ijaigl"
    "olll", strict=True)))


def skeleton(name: str) -> str:
    """What a name looks like (after Unicode TR39's skeleton), to spot look-alikes: compatibility forms folded,
    accents dropped, look-alike letters of other scripts mapped to Latin ones, case ignored, rn as m."""
    text = unicodedata.normalize("NFKD", name)
    text = "".join(c for c in text if not unicodedata.combining(c)).translate(_CONFUSABLES).casefold()
    return text.replace("rn", "m").replace("vv", "w")


def topic_for(room: str) -> str:
    return TOPIC_BASE + room


def check_room_name(room: str) -> str:
    room = room.strip()
    if room.startswith("#"):
        room = room[1:]
    if not room or len(room) > 200:
        raise UsageError("a room name must be 1 to 200 characters")
    if any(c in room for c in "+#\x00") or any(unicodedata.category(c) == "Cc" for c in room):
        raise UsageError(f"room {room!r} is not allowed: MQTT topics cannot contain +, # or control characters")
    return room


def check_display_name(name: str) -> str:
    """RTChat's rules (no parentheses or |, trimmed), plus: printable and short (rtchat-wire.md §2.1)."""
    name = name.strip()
    if not name:
        raise UsageError("a name is needed, e.g. `python rtchat.py alice`")
    if len(name) > MAX_NAME_CHARS:
        raise UsageError(f"a name has at most {MAX_NAME_CHARS} characters")
    if any(c in name for c in "()|") or clean(name) != name:
        raise UsageError(f"name {name!r} is not allowed: no parentheses, '|' or control characters")
    if _NAME_HIDDEN_RE.search(name):
        raise UsageError(f"name {name!r} is not allowed: it has invisible or blank-looking characters")
    if name.lower().startswith("anon") or name.startswith("User #"):
        raise UsageError("names starting with 'anon' or 'User #' are treated as anonymous by browsers; pick another")
    return name


def bare_name(wire_name: str) -> str:
    """'alice(2)' -> 'alice': the part browsers pin keys to (rtchat-wire.md §2.3)."""
    return wire_name.split("|", 1)[0].split("(", 1)[0].strip()


def collation_key(name: str) -> tuple:
    """Approximates JS localeCompare (ICU root collation) for deciding who offers (§4.4).

    Primary: base letters, case-insensitive, with spaces < punctuation < symbols < digits < letters;
    then accents; then case, lowercase first.
    """
    primary, accents, case = [], [], []
    for ch in unicodedata.normalize("NFD", name):
        if unicodedata.combining(ch):
            accents.append(ord(ch))
            continue
        cat = unicodedata.category(ch)
        group = 0 if cat.startswith("Z") else 1 if cat.startswith("P") else 2 if cat.startswith("S") \
            else 3 if cat.startswith("N") else 4
        primary.append((group, ch.lower()))
        accents.append(0)
        case.append(0 if ch.islower() or not ch.isalpha() else 1)
    return (primary, accents, case)


def sdp_field(sdp: str, name: str) -> str | None:
    """The value of the first `a=name:` line of an SDP."""
    match = re.search(rf"^a={re.escape(name)}:(.+?)\s*$", sdp, re.MULTILINE)
    return match.group(1) if match else None


def slim_sdp(sdp: str) -> str:
    """Drop the sha-384/sha-512 fingerprint lines aiortc adds: sha-256 is what browsers check and what channel
    binding covers. About 250 bytes less per offer and per answer."""
    return re.sub(r"^a=fingerprint:sha-(?:384|512) [^\r\n]*\r?\n", "", sdp, flags=re.MULTILINE)


def sdp_fingerprint(sdp: str) -> str | None:
    """The sha-256 DTLS fingerprint an SDP declares, upper-case hex with colons."""
    for match in re.finditer(r"^a=fingerprint:(\S+) (\S+)\s*$", sdp, re.MULTILINE):
        if match.group(1).lower() == "sha-256":
            return match.group(2).upper()
    return None


# =============================================================================
# Identity: the RSA-PSS key RTChat uses (JWK text exactly as browsers send it),
# fingerprints, signatures, safety numbers, the key at rest. Uses Wire.
# =============================================================================

_PSS = None
CERT_CONTEXT = b"rtchat-message-key-v1\n"     # what the RSA key signs to certify the Ed25519 message key
MESSAGE_CONTEXT = b"rtchat-message-v1\n"       # what message signatures cover, before the message itself


def _pss():
    """RSA-PSS, SHA-256, salt 32: the parameters browsers use (rtchat-wire.md §6.3)."""
    global _PSS
    if _PSS is None:
        _PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
    return _PSS


def _b64url(number: int) -> str:
    raw = number.to_bytes((number.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _b64url_int(text: str) -> int:
    return int.from_bytes(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)), "big")


def jwk_text(public_key) -> str:
    """The public key as browsers serialize it: compact, members in this order (§6.2)."""
    numbers = public_key.public_numbers()
    return to_json({"alg": "PS256", "e": _b64url(numbers.e), "ext": True, "key_ops": ["verify"], "kty": "RSA",
                    "n": _b64url(numbers.n)})


_KEY_CACHE: dict[str, Any] = {}


def load_public_key(key_string: str):
    """Parse a peer's publicKeyString; ValueError for anything that is not a sane RSA public JWK."""
    if key_string in _KEY_CACHE:
        return _KEY_CACHE[key_string]
    if not isinstance(key_string, str) or len(key_string) > MAX_KEY_CHARS:
        raise ValueError("key too long or not text")
    if not (key_string.isascii() and key_string.isprintable()):
        raise ValueError("key text is not printable ASCII")  # browsers' JWK text is; it is stored and shown as is
    jwk = parse_json(key_string)
    if not isinstance(jwk, dict) or jwk.get("kty") != "RSA" or not isinstance(jwk.get("n"), str) \
            or not isinstance(jwk.get("e"), str):
        raise ValueError("not an RSA JWK")
    try:
        key = rsa.RSAPublicNumbers(_b64url_int(jwk["e"]), _b64url_int(jwk["n"])).public_key()
    except Exception as exc:
        raise ValueError(f"bad RSA key: {exc}") from None
    if not 2048 <= key.key_size <= 4096:
        raise ValueError(f"RSA key of {key.key_size} bits")
    if len(_KEY_CACHE) > 1024:
        _KEY_CACHE.clear()
    _KEY_CACHE[key_string] = key
    return key


def fingerprint(key_string: str) -> str:
    """SHA-256 of the DER public key, as 64 hex digits; the name a key is pinned under."""
    der = load_public_key(key_string).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def show_fingerprint(fp: str) -> str:
    """'3f2a 91bc …': the first 128 bits in groups of four, for reading aloud."""
    return " ".join(fp[i:i + 4] for i in range(0, 32, 4))


def safety_number(fp_a: str, fp_b: str) -> str:
    """The same 20 digits on both sides; two people compare them by voice to rule out a man in the middle."""
    digest = hashlib.sha256(b"rtchat-safety-number:" + "".join(sorted((fp_a, fp_b))).encode()).digest()
    digits = str(int.from_bytes(digest[:16], "big") % 10**20).zfill(20)
    return " ".join(digits[i:i + 5] for i in range(0, 20, 5))


def verify_signature(key_string: str, signature: bytes, data: bytes) -> bool:
    try:
        load_public_key(key_string).verify(signature, data, _pss(), hashes.SHA256())
        return True
    except (InvalidSignature, ValueError, TypeError):
        return False


class Identity:
    """Our keys. public_key_string is sent byte-identical everywhere, so browsers recognise us.

    The RSA key is the identity (browsers know only RSA-PSS). Chat messages are signed with an Ed25519
    message key that the RSA key certifies once: 50 µs a signature instead of 1.3 ms.
    """

    def __init__(self, private_key, message_key=None) -> None:
        self.private_key = private_key
        self.public_key_string = jwk_text(private_key.public_key())
        self.fingerprint = fingerprint(self.public_key_string)
        self.message_key = message_key or ed25519.Ed25519PrivateKey.generate()
        raw = self.message_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.message_public = base64.b64encode(raw).decode()
        self.message_cert = base64.b64encode(self.sign(CERT_CONTEXT + raw)).decode()

    @classmethod
    def generate(cls) -> Identity:
        return cls(rsa.generate_private_key(public_exponent=65537, key_size=2048))

    @classmethod
    def from_pem(cls, pem: str, passphrase: str | None = None, message_pem: str | None = None) -> Identity:
        key = _load_private_pem(pem, passphrase)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise StateError("the identity key in the state file is not an RSA key")
        message_key = _load_private_pem(message_pem, passphrase) if message_pem else None
        if message_key is not None and not isinstance(message_key, ed25519.Ed25519PrivateKey):
            raise StateError("the message key in the state file is not an Ed25519 key")
        return cls(key, message_key)

    def to_pem(self, passphrase: str | None = None, key=None, salt: bytes | None = None) -> str:
        """The key as PEM (PKCS#8), or with a passphrase sealed under scrypt (see seal_private_key)."""
        key = key or self.private_key
        if passphrase:
            der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
            return seal_private_key(der, passphrase, salt or os.urandom(16))
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption()).decode()

    def sign(self, data: bytes) -> bytes:
        return self.private_key.sign(data, _pss(), hashes.SHA256())

    def sign_message(self, data: bytes) -> str:
        return base64.b64encode(self.message_key.sign(MESSAGE_CONTEXT + data)).decode()

    def sign_batch(self, root: bytes, count: int) -> str:
        """One signature over a batch of our messages: the root of their tree (batch_tree) and how many they are."""
        return self.sign_message(signed_bytes("message-batch", base64.b64encode(root).decode(), count))

    def open_box(self, box: Any, context: bytes) -> bytes | None:
        """What seal_box sealed to our identity key with this context; None if it is not such a box."""
        try:
            wrapped, nonce, body = (base64.b64decode(box[k], validate=True) for k in ("k", "n", "c"))
            key = self.private_key.decrypt(wrapped, _oaep())
            return AESGCM(key).decrypt(nonce, body, context) if len(key) == 32 and len(nonce) == 12 else None
        except (KeyError, TypeError, ValueError, InvalidTag):
            return None


SEALED_KEY_PREFIX = "rtchat-key:scrypt:"


@functools.lru_cache(maxsize=2)
def _passphrase_key(passphrase: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    """The AES key a passphrase gives (cached: the identity and message keys share one salt, so one scrypt)."""
    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(passphrase.encode())


def seal_private_key(der: bytes, passphrase: str, salt: bytes) -> str:
    """A private key at rest: AES-256-GCM under a key from scrypt (KEY_SCRYPT: memory-hard, ~0.2 s a guess, where
    the PBKDF2 of PEM encryption costs 0.3 ms), written as rtchat-key:scrypt:N:R:P:SALT:NONCE+CIPHERTEXT."""
    n, r, p = KEY_SCRYPT
    nonce = os.urandom(12)
    blob = nonce + AESGCM(_passphrase_key(passphrase, salt, n, r, p)).encrypt(nonce, der, SEALED_KEY_PREFIX.encode())
    return f"{SEALED_KEY_PREFIX}{n}:{r}:{p}:{base64.b64encode(salt).decode()}:{base64.b64encode(blob).decode()}"


def _open_sealed_key(text: str, passphrase: str | None):
    if not passphrase:
        raise StateError("the identity key is encrypted: give its passphrase with --passphrase or RTCHAT_PASSPHRASE")
    try:
        n, r, p, salt, blob = text[len(SEALED_KEY_PREFIX):].split(":")
        n, r, p = int(n), int(r), int(p)
        salt, blob = base64.b64decode(salt, validate=True), base64.b64decode(blob, validate=True)
        if not (2 ** 10 <= n <= 2 ** 20 and 1 <= r <= 16 and 1 <= p <= 4 and len(salt) >= 16):
            raise ValueError("scrypt parameters out of range")  # a doctored file must not make us allocate gigabytes
        der = AESGCM(_passphrase_key(passphrase, salt, n, r, p)).decrypt(
            blob[:12], blob[12:], SEALED_KEY_PREFIX.encode())
        return serialization.load_der_private_key(der, None, unsafe_skip_rsa_key_validation=True)
    except (ValueError, InvalidTag):
        raise StateError("the identity key could not be read: wrong passphrase, or the key is damaged. "
                         "It was left as it is.") from None


def _load_private_pem(pem: str, passphrase: str | None):
    if pem.startswith(SEALED_KEY_PREFIX):
        return _open_sealed_key(pem, passphrase)
    try:
        return serialization.load_pem_private_key(pem.encode(), passphrase.encode() if passphrase else None,
                                                  unsafe_skip_rsa_key_validation=True)  # our own key: 36 ms saved
    except TypeError:
        if passphrase:  # a key stored in the clear, now to be protected: Store.identity seals it
            return _load_private_pem(pem, None)
        raise StateError("the identity key is encrypted: give its passphrase with --passphrase "
                         "or RTCHAT_PASSPHRASE") from None
    except ValueError:
        raise StateError("the identity key could not be read: wrong passphrase, or the key is damaged. "
                         "It was left as it is.") from None


def verify_message_key(key_string: str, message_public: Any, cert: Any) -> bool:
    """Is this Ed25519 message key certified by the RSA identity key_string?"""
    try:
        raw = base64.b64decode(message_public, validate=True)
        return len(raw) == 32 and verify_signature(key_string, base64.b64decode(cert, validate=True),
                                                   CERT_CONTEXT + raw)
    except (ValueError, TypeError):
        return False


@functools.lru_cache(maxsize=256)
def _message_public_key(message_public: str) -> Any:
    return ed25519.Ed25519PublicKey.from_public_bytes(base64.b64decode(message_public, validate=True))


def verify_message(message_public: str, signature: Any, data: bytes) -> bool:
    try:
        _message_public_key(message_public).verify(base64.b64decode(signature, validate=True), MESSAGE_CONTEXT + data)
        return True
    except (InvalidSignature, ValueError, TypeError):
        return False


def _oaep():
    return padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


def seal_box(key_string: str, plaintext: bytes, context: bytes) -> dict:
    """plaintext readable only with the private half of the RSA identity key_string: a fresh AES-256-GCM key,
    wrapped with RSA-OAEP (SHA-256), over the plaintext with context as associated data (PROTOCOL.md, Relaying
    through members). ValueError if key_string is not a key."""
    key, nonce = AESGCM.generate_key(256), os.urandom(12)
    wrapped = load_public_key(key_string).encrypt(key, _oaep())
    return {"k": base64.b64encode(wrapped).decode(), "n": base64.b64encode(nonce).decode(),
            "c": base64.b64encode(AESGCM(key).encrypt(nonce, plaintext, context)).decode()}


def verify_batch(message_public: str, signature: Any, root: bytes, count: int) -> bool:
    return verify_message(message_public, signature, signed_bytes("message-batch", base64.b64encode(root).decode(),
                                                                  count))


# =============================================================================
# Store: the dotfile JSON (name, key, pins, rooms, history, settings). Writes are
# atomic (temp file, fsync, rename) and locked across processes; every update
# re-reads the file first, so two processes of one user merge rather than clobber.
# =============================================================================

def open_own(path: str | os.PathLike, flags: int, mode: int = 0o600) -> int:
    """os.open for a file of ours: never through a symbolic link (O_NOFOLLOW), and only a regular file this user
    owns, so a link or a file someone else planted is refused rather than read or written through."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, "it is a symbolic link; refused", str(path)) from None
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
        os.close(fd)
        raise OSError(errno.EPERM, "not a regular file owned by this user; refused", str(path))
    return fd


@contextlib.contextmanager
def locked_beside(path: Path):
    """An exclusive lock between processes, on PATH.lock: a file of its own, because the file it guards is
    replaced by atomic renames (and a lock on the old one would go with it)."""
    if not path.parent.is_dir():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = open_own(f"{path}.lock", os.O_RDWR | os.O_CREAT)
    except OSError as exc:
        raise StateError(f"cannot lock {path}: {exc.strerror}") from None
    try:
        if fcntl:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _empty_state() -> dict:
    return {"format": STATE_FORMAT, "name": None, "identity": None, "pins": {}, "rooms": {},
            "last_room": None, "input_history": [], "plugins": {}, "instances": {}, "authors": {}, "outbox": [],
            "ignored": []}


def _state_problem(data: dict) -> str | None:
    """The first part of a state file that is not what rtchat.py writes, as 'where: what it should be'."""
    def text(value: Any) -> bool:
        return isinstance(value, str)

    def mapping(value: Any, of: Callable[[Any], bool] = lambda v: True) -> bool:
        return isinstance(value, dict) and all(of(v) for v in value.values())

    def listing(value: Any, of: Callable[[Any], bool]) -> bool:
        return isinstance(value, list) and all(of(v) for v in value)

    def pin(value: Any) -> bool:
        return mapping(value) and text(value.get("key")) and value["key"].isascii() \
            and listing(value.get("names"), text) and isinstance(value.get("signs", False), bool)

    def author(value: Any) -> bool:
        return mapping(value) and all(text(value.get(k)) and value[k].isascii() for k in ("key", "mkey", "mcert"))

    def identity(value: Any) -> bool:
        return value is None or (mapping(value) and text(value.get("private_key"))
                                 and (value.get("message_key") is None or text(value["message_key"])))

    shapes = {"name": (lambda v: v is None or text(v), "a text"),
              "identity": (identity, "an object with a private_key text"),
              "pins": (lambda v: mapping(v, pin), "an object of pins, each with a key and a list of names"),
              "rooms": (lambda v: mapping(v, mapping), "an object of objects"),
              "last_room": (lambda v: v is None or text(v), "a text"),
              "input_history": (lambda v: listing(v, text), "a list of texts"),
              "plugins": (lambda v: mapping(v, mapping), "an object of objects"),
              "instances": (lambda v: mapping(v, lambda i: mapping(i, lambda pid: type(pid) is int)),
                            "an object of objects of process ids"),
              "authors": (lambda v: mapping(v, author), "an object of authors, each with key, mkey and mcert"),
              "outbox": (lambda v: listing(v, mapping), "a list of objects")}
    for key, (fits, expected) in shapes.items():
        if key in data and not fits(data[key]):
            return f'"{key}" should be {expected}'
    return None


class Store:
    """The state file. A corrupt or newer file is never overwritten: it raises StateError instead."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path).expanduser()
        self.data = _empty_state()
        self.generation = 0                    # counts changes to data, for indexes built from it
        self._pending: list[Callable[[dict], Any]] = []
        self._flush_timer: asyncio.TimerHandle | None = None

    def load(self) -> dict:
        with locked_beside(self.path):
            self.data = self._read()
        self.generation += 1
        return self.data

    def update(self, mutate: Callable[[dict], Any]) -> Any:
        """Apply mutate to the freshest state on disk and write it back, under the lock."""
        with locked_beside(self.path):
            data = self._read()
            for pending in self._pending:
                pending(data)
            self._pending.clear()
            result = mutate(data)
            self._write(data)
            self.data = data
        self.generation += 1
        return result

    def defer(self, mutate: Callable[[dict], Any], delay: float = 0.3) -> None:
        """Apply mutate now in memory, and on disk with others shortly (one write for a burst)."""
        mutate(self.data)
        self.generation += 1
        self._pending.append(mutate)
        if self._flush_timer is None:
            with contextlib.suppress(RuntimeError):  # no running loop: flush() at exit writes it
                self._flush_timer = asyncio.get_running_loop().call_later(delay, self.flush)

    def flush(self) -> None:
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        if self._pending:
            try:
                self.update(lambda data: None)
            except RtchatError as exc:
                log.error("%s", exc)

    def _read(self) -> dict:
        try:
            fd = open_own(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return _empty_state()
        except OSError as exc:
            raise StateError(f"cannot read state file {self.path}: {exc.strerror}. It was left untouched.") from None
        try:
            with os.fdopen(fd, "rb") as f:
                text = f.read().decode("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise StateError(f"cannot read state file {self.path}: {exc}. It was left untouched.") from None
        try:
            data = parse_json(text)
        except ValueError as exc:
            raise StateError(
                f"state file {self.path} is damaged ({exc}). It was left untouched: repair it, move it "
                f"away (a new one is then made, with a new identity), or use --state PATH.") from None
        if not isinstance(data, dict) or not isinstance(data.get("format"), int):
            raise StateError(f"{self.path} is not an rtchat state file. It was left untouched; "
                             f"use --state PATH for another file.")
        if data["format"] > STATE_FORMAT:
            raise StateError(f"{self.path} was written by a newer rtchat (format {data['format']}, this is "
                             f"format {STATE_FORMAT}). Upgrade rtchat.py, or use --state PATH.")
        problem = _state_problem(data)
        if problem:
            raise StateError(f"state file {self.path} is damaged: {problem}. It was left untouched: repair it, or "
                             f"use --state PATH.")
        for key, value in _empty_state().items():
            data.setdefault(key, value)
        return data

    def _write(self, data: dict) -> None:
        try:  # encoded first: nothing that cannot be written as UTF-8 may leave a temporary file or half a state
            encoded = json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        except (ValueError, TypeError) as exc:
            raise StateError(f"cannot write state file {self.path}: {exc}") from None
        fd, tmp = tempfile.mkstemp(prefix=self.path.name + ".", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), 0o600)
                f.write(encoded)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise StateError(f"cannot write state file {self.path}: {exc}") from None
        with contextlib.suppress(OSError):
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    def identity(self, passphrase: str | None = None) -> Identity:
        """Our identity: loaded, or made once and saved (0600, optionally passphrase-encrypted)."""
        stored = self.data.get("identity")
        if stored is not None and not (isinstance(stored, dict) and isinstance(stored.get("private_key"), str)):
            raise StateError(f"the identity in {self.path} is damaged; it was left untouched. Move the file "
                             f"away to start with a new identity (peers will see a new key).")
        message_pem = stored.get("message_key") if stored else None
        # A key under a passphrase in the older form (PEM's PBKDF2, 2048 rounds) or in the clear is sealed anew.
        outdated = bool(passphrase) and not stored["private_key"].startswith(SEALED_KEY_PREFIX) if stored else False
        if isinstance(message_pem, str) and not outdated:
            return Identity.from_pem(stored["private_key"], passphrase, message_pem)
        identity = Identity.from_pem(stored["private_key"], passphrase, message_pem) if stored else Identity.generate()
        salt = os.urandom(16)
        record = {"private_key": identity.to_pem(passphrase, salt=salt), "public_key": identity.public_key_string,
                  "message_key": identity.to_pem(passphrase, identity.message_key, salt),
                  "encrypted": bool(passphrase), "created": now_ms()}

        def save(data: dict) -> Identity:
            current = data.get("identity")
            if current and current != stored:  # another process was first (made, completed or sealed it)
                return Identity.from_pem(current["private_key"], passphrase, current.get("message_key"))
            data["identity"] = {**record, **({"created": current["created"]} if current else {})}
            return identity
        return self.update(save)

    def history_path(self, room: str) -> Path:
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", room)[:48]
        return Path(f"{self.path}.history") / f"{safe}-{hashlib.sha256(room.encode()).hexdigest()[:8]}.jsonl"


def sync_and_close(fd: int) -> None:
    """What makes a write durable; it blocks, so the loop runs it in a thread (it holds no Python lock)."""
    try:
        os.fsync(fd)
    except OSError as exc:
        raise StateError(f"cannot write history: {exc}") from None
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes) -> None:
    """os.write until all of data is written: a write may take only part (a full disk, a signal)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


_HISTORY_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))  # made once: see to_json


class HistoryLog:
    """A room's messages, one JSON object per line: an append costs the same however long the history is.

    Lives beside the state file. A line cut short by a crash is skipped; the file is compacted to the
    newest `limit` entries once it holds twice as many. Appends are locked and fsynced, so what is in it
    survives a kill -9 and two processes of one user can share it. A write that fails (a full disk) is cut back
    off, so the file never keeps half a line.
    """

    def __init__(self, path: Path, limit: int = HISTORY_PER_ROOM) -> None:
        self.path = path
        self.limit = limit
        self._entries: list[dict] = []
        self._lines: list[bytes] = []   # each entry's line as stored: compaction copies them, never re-encodes
        self._ids: set[str] = set()
        self._size = -1
        self._torn = False
        self._lock = threading.RLock()  # compaction runs in a worker thread

    def entries(self) -> list[dict]:
        """All entries, oldest first, re-read only when the file changed (another process appended)."""
        with self._lock:
            return list(self._read())

    def _read(self) -> list[dict]:
        try:
            fd = open_own(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return self._entries
        except OSError as exc:
            raise StateError(f"cannot read history file {self.path}: {exc.strerror}") from None
        with os.fdopen(fd, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == self._size:
                return self._entries
            entries, lines, ids, line = [], [], set(), b"\n"
            for line in f:
                try:
                    entry = parse_json(line)
                except ValueError:
                    continue
                if isinstance(entry, dict) and is_message_id(entry.get("id")) and entry["id"] not in ids:
                    ids.add(entry["id"])
                    entries.append(entry)
                    lines.append(line if line.endswith(b"\n") else line + b"\n")
        self._entries, self._lines, self._ids, self._size = entries, lines, ids, size
        self._torn = not line.endswith(b"\n")  # a line cut by a crash: ours must start on a new one
        return self._entries

    def ids(self) -> set[str]:
        with self._lock:
            self._read()
            return set(self._ids)

    def append(self, new: list[dict], sync: bool = True) -> list[dict]:
        """Add entries; with sync, return only once they are on disk (before they are acknowledged)."""
        written = self.write(new)
        if sync:
            self.sync()
        if self.needs_compaction:
            self.compact()
        return written

    def sync(self) -> None:
        """What makes the writes so far durable. It blocks, so a Room runs it in a thread (it holds no lock)."""
        try:
            fd = open_own(self.path, os.O_RDONLY)
        except OSError as exc:
            raise StateError(f"cannot write history file {self.path}: {exc.strerror}") from None
        sync_and_close(fd)

    @staticmethod
    def encode(entry: dict) -> bytes | None:
        """An entry's line; None for one that cannot be written as UTF-8 JSON."""
        try:
            return (_HISTORY_ENCODER.encode(entry) + "\n").encode()
        except (ValueError, TypeError) as exc:
            log.warning("history entry %r left out: %s", entry.get("id"), exc)
            return None

    def write(self, new: list[dict], lines: list[bytes | None] | None = None) -> list[dict]:
        """Add entries to the file, not yet surely on disk (see sync); lines: their encode(), if done already (on
        the event loop, in slices, while this runs in a worker thread). Returns the entries that are in the file
        now, whole (one that cannot be encoded is left out). StateError if the write fails: then nothing of this
        call is in the file."""
        lines = lines if lines is not None else [self.encode(entry) for entry in new]
        with self._lock, locked_beside(self.path):
            fd = -1
            try:
                fd = open_own(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
                self._read()
                there, added, kept, ids = [], [], [], set()
                for entry, line in zip(new, lines, strict=True):
                    if entry["id"] in self._ids or entry["id"] in ids:
                        there.append(entry)
                    elif line is not None:
                        added.append(entry)
                        kept.append(line)
                        ids.add(entry["id"])
                lines = kept
                if lines:
                    start = os.fstat(fd).st_size
                    try:
                        write_all(fd, b"".join([b"\n"] + lines if start > 0 and self._torn else lines))
                    except OSError:
                        with contextlib.suppress(OSError):  # if this fails too, _read sees the cut line as torn
                            os.ftruncate(fd, start)
                        raise
                    self._entries.extend(added)
                    self._lines.extend(lines)
                    self._ids.update(e["id"] for e in added)
                    self._size, self._torn = os.fstat(fd).st_size, False
                return there + added
            except OSError as exc:
                raise StateError(f"cannot write history file {self.path}: {exc.strerror or exc}") from None
            finally:
                if fd >= 0:
                    os.close(fd)

    @property
    def needs_compaction(self) -> bool:
        return len(self._entries) > 2 * self.limit

    def compact(self) -> None:
        """Keep the newest `limit` entries: a new file, fsynced, put in place. Blocks: a Room runs it in a thread."""
        with self._lock, locked_beside(self.path):
            try:
                self._read()
                keep, lines = self._entries[-self.limit:], self._lines[-self.limit:]
                fd, tmp = tempfile.mkstemp(prefix=self.path.name + ".", suffix=".tmp", dir=self.path.parent)
                with os.fdopen(fd, "wb") as f:
                    f.write(b"".join(lines))
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
                self._entries, self._lines, self._ids = keep, lines, {e["id"] for e in keep}
                self._size = self.path.stat().st_size
            except OSError as exc:
                raise StateError(f"cannot compact history file {self.path}: {exc}") from None


# =============================================================================
# Trust: pinned keys (trust on first use, like SSH known_hosts), kept by
# fingerprint in the state file, and the policy that judges a key for a name.
# Uses Identity and Store.
# =============================================================================

class Trust:
    """Pinned keys (TOFU, like SSH known_hosts), kept by fingerprint in the state file.

    policy: 'new' pins keys of names never seen and refuses changed keys; 'known' accepts only pinned
    keys; 'any' accepts everything (and still never re-pins silently).
    """

    POLICIES = ("new", "known", "any")

    def __init__(self, store: Store, policy: str = "new") -> None:
        if policy not in self.POLICIES:
            raise UsageError(f"trust policy must be one of {', '.join(self.POLICIES)}")
        self.store = store
        self.policy = policy
        self._accepting: dict[str, float] = {}  # bare name -> since when the next key it proves is pinned
        self._indexed = -1
        self._by_name: dict[str, dict[str, dict]] = {}
        self._by_skeleton: dict[str, set[str]] = {}

    def accept_next(self, name: str) -> None:
        """/trust NAME when no key of NAME is at hand: the next key NAME proves in a channel is pinned in place of
        the old one (for ACCEPT_NEXT_KEY_S), so a peer who changed keys can connect again."""
        self._accepting[name] = time.monotonic()

    def accepting_since(self, name: str) -> float | None:
        """When /trust NAME began to wait for NAME's next key, if it still does."""
        since = self._accepting.get(name)
        return since if since is not None and time.monotonic() - since < ACCEPT_NEXT_KEY_S else None

    def is_accepting(self, name: str) -> bool:
        return self.accepting_since(name) is not None

    def _index(self) -> None:
        """Pins by name and by look (skeleton), rebuilt when the state changed: looking a name up for every
        envelope must not scan every pin."""
        if self._indexed == self.store.generation:
            return
        by_name: dict[str, dict[str, dict]] = {}
        for fp, pin in self.store.data["pins"].items():
            for name in pin.get("names", ()):
                by_name.setdefault(name, {})[fp] = pin
        self._by_skeleton = {}
        for name in by_name:
            self._by_skeleton.setdefault(skeleton(name), set()).add(name)
        self._by_name, self._indexed = by_name, self.store.generation

    def pins_for(self, name: str) -> dict[str, dict]:
        self._index()
        return dict(self._by_name.get(name, {}))

    def names_like(self, name: str) -> set[str]:
        """Pinned names that look like this one (the same skeleton), itself excluded."""
        self._index()
        return self._by_skeleton.get(skeleton(name), set()) - {name}

    def verdict(self, name: str, key_string: str) -> str:
        """'known' (pinned for this name), 'new' (name never pinned) or 'changed' (pinned to another key)."""
        fp = fingerprint(key_string)
        pins = self.pins_for(name)
        if fp in pins:
            return "known"
        return "changed" if pins else "new"

    def allows(self, verdict: str) -> bool:
        return verdict == "known" or (verdict == "new" and self.policy != "known") or self.policy == "any"

    def signs(self, name: str) -> bool:
        """Does a key pinned for this name sign its signaling (an rtchat.py peer)? Then unsigned is forged."""
        return any(pin.get("signs") for pin in self.pins_for(name).values())

    def pin(self, name: str, key_string: str, signs: bool = False, replace: bool = False,
            author: dict | None = None) -> None:
        """Pin a key for a name. author: its certified message key too, in the same write (so a crash cannot
        leave a pin of a signing peer whose signatures we could not check)."""
        fp = fingerprint(key_string)
        if replace:
            self._accepting.pop(name, None)

        def add(data: dict) -> None:
            if author:
                data["authors"][fp] = author
            pins = data["pins"]
            if replace:
                for other in pins.values():
                    if name in other.get("names", ()):
                        other["names"].remove(name)
                for other_fp in [f for f, p in pins.items() if not p.get("names")]:
                    del pins[other_fp]
            pin = pins.setdefault(fp, {"key": key_string, "names": [], "since": now_ms()})
            if name not in pin["names"]:
                pin["names"].append(name)
            pin["signs"] = pin.get("signs", False) or signs
            pin["seen"] = now_ms()
        if fp in self.pins_for(name) and not replace and (not author or self.store.data["authors"].get(fp) == author):
            self.store.defer(add)
        else:
            self.store.update(add)

    def unpin(self, name: str) -> int:
        self._accepting.pop(name, None)

        def drop(data: dict) -> int:
            count = 0
            for fp in list(data["pins"]):
                names = data["pins"][fp].get("names", [])
                if name in names:
                    names.remove(name)
                    count += 1
                    if not names:
                        del data["pins"][fp]
            return count
        return self.store.update(drop)


# =============================================================================
# Signaling: one MQTT connection (paho, v2 callbacks) shared by the rooms of a
# client. mqtt:// mqtts:// ws:// wss://. paho's thread only hops payloads onto
# the event loop. Emits "connected" and "disconnected"; delivers (topic, bytes).
# =============================================================================

_SCHEMES = {"mqtt": ("tcp", False, 1883), "tcp": ("tcp", False, 1883), "mqtts": ("tcp", True, 8883),
            "ssl": ("tcp", True, 8883), "ws": ("websockets", False, 80), "wss": ("websockets", True, 443)}


@dataclasses.dataclass(frozen=True)
class BrokerURL:
    url: str
    transport: str
    tls: bool
    host: str
    port: int
    path: str
    username: str | None
    password: str | None

    @classmethod
    def parse(cls, url: str) -> BrokerURL:
        parts = urlsplit(url if "://" in url else f"mqtt://{url}")
        scheme = parts.scheme.lower()
        if scheme not in _SCHEMES:
            raise UsageError(f"broker URL {url!r}: use mqtt://, mqtts://, ws:// or wss://")
        transport, tls, default_port = _SCHEMES[scheme]
        try:
            port = parts.port or default_port
        except ValueError:
            raise UsageError(f"broker URL {url!r} has a bad port") from None
        if not parts.hostname:
            raise UsageError(f"broker URL {url!r} has no host")
        if not re.fullmatch(r"[A-Za-z0-9._-]+|[0-9A-Fa-f:.]+(?:%\w+)?", parts.hostname):
            raise UsageError(f"broker URL {url!r}: {parts.hostname!r} is not a host name or address")
        path = parts.path or "/mqtt"
        if parts.query:
            path += "?" + parts.query
        return cls(url, transport, tls, parts.hostname, port, path,
                   unquote(parts.username) if parts.username else None,
                   unquote(parts.password) if parts.password else None)

    def __str__(self) -> str:
        return self.url


class Signaling(Emitter):
    """An MQTT client on the event loop. Handlers get (topic, payload) for their subscribed topic."""

    def __init__(self, broker: str, connect_timeout: float = 10.0) -> None:
        super().__init__()
        self.broker = BrokerURL.parse(broker)
        self.connect_timeout = connect_timeout
        self.is_connected = False
        self.published_bytes = 0
        self._handlers: dict[str, Callable[[str, bytes], None]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._first_connack: asyncio.Future | None = None
        self._client = None

    async def connect(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._first_connack = self._loop.create_future()
        b = self.broker
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"rtchat-py-{secrets.token_hex(8)}",
                             transport=b.transport, protocol=mqtt.MQTTv311, reconnect_on_failure=True)
        if b.transport == "websockets":
            client.ws_set_options(path=b.path)
        if b.tls:
            client.tls_set()
        if b.username:
            client.username_pw_set(b.username, b.password)
        client.connect_timeout = self.connect_timeout
        client.reconnect_delay_set(0.5, 10)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        self._client = client
        try:
            await asyncio.wait_for(self._loop.run_in_executor(None, client.connect, b.host, b.port, 30),
                                   self.connect_timeout + 1)
            client.loop_start()
            await asyncio.wait_for(self._first_connack, self.connect_timeout)
        except (OSError, asyncio.TimeoutError, ValueError) as exc:
            client.loop_stop()
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else (str(exc) or "timed out")
            raise BrokerUnreachable(f"cannot reach broker {b}: {reason}") from None

    def subscribe(self, topic: str, handler: Callable[[str, bytes], None]) -> None:
        self._handlers[topic] = handler
        if self.is_connected:
            self._client.subscribe(topic, qos=0)

    def unsubscribe(self, topic: str) -> None:
        if self._handlers.pop(topic, None) and self.is_connected:
            self._client.unsubscribe(topic)

    def publish(self, topic: str, payload: bytes) -> None:
        """QoS 0, no retain, like browsers. While the broker is away the message is dropped (peers re-announce)."""
        if self._client is not None and self.is_connected:
            self.published_bytes += len(payload)
            self._client.publish(topic, payload, qos=0, retain=False)

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await asyncio.get_running_loop().run_in_executor(None, self._stop, client)
        self.is_connected = False

    @staticmethod
    def _stop(client) -> None:
        client.disconnect()
        client.loop_stop()

    # paho's thread: hop to the event loop and do nothing else here.
    def _hop(self, func: Callable, *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed under a late callback
            self._loop.call_soon_threadsafe(func, *args)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self._hop(self._connected, reason_code.is_failure, str(reason_code))

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._hop(self._disconnected, str(reason_code))

    def _on_message(self, client, userdata, message) -> None:
        self._hop(self._deliver, message.topic, message.payload)

    def _connected(self, failed: bool, reason: str) -> None:
        if failed:
            if not self._first_connack.done():
                self._first_connack.set_exception(OSError(0, f"broker refused the connection: {reason}"))
            return
        self.is_connected = True
        for topic in self._handlers:
            self._client.subscribe(topic, qos=0)
        if not self._first_connack.done():
            self._first_connack.set_result(None)
        self.emit("connected")

    def _disconnected(self, reason: str) -> None:
        was_connected, self.is_connected = self.is_connected, False
        if was_connected and self._client is not None:
            log.warning("lost the broker %s (%s); reconnecting", self.broker, reason)
            self.emit("disconnected", reason)

    def _deliver(self, topic: str, payload: bytes) -> None:
        handler = self._handlers.get(topic)
        if handler is not None:
            try:
                handler(topic, payload)
            except Exception:
                log.exception("dropped a message on %s that broke its handler", topic)


# =============================================================================
# Signaling gate: what comes on a room's topics (or through a member), judged
# without I/O. Sealed rooms, envelopes (capped; lz-string on a budget), replays
# and copies that came two ways, rates, freshness, signatures and impostors.
# Payload bytes, the clock and what is known of keys in; a RoomSignal or the
# reason it was dropped out. Uses Wire and Identity.
# =============================================================================


class Seal:
    """A sealed room: topic and AEAD key from room + secret through scrypt, so the broker sees only ciphertext."""

    def __init__(self, room: str, secret: str) -> None:
        material = Scrypt(salt=b"rtchat-sealed-room:" + room.encode(), length=64, n=2**15, r=8, p=1
                          ).derive(secret.encode())
        self.topic = f"{TOPIC_BASE}sealed/{material[32:48].hex()}"
        self._aead = AESGCM(material[:32])

    def seal(self, payload: bytes) -> bytes:
        nonce = os.urandom(12)
        return nonce + self._aead.encrypt(nonce, payload, self.topic.encode())

    def open(self, payload: bytes) -> bytes | None:
        try:
            return self._aead.decrypt(payload[:12], payload[12:], self.topic.encode())
        except (InvalidTag, ValueError):
            return None


@dataclasses.dataclass(frozen=True)
class KeyFacts:
    """What is known of the keys behind one wire name; the gate checks signatures with these plain values."""
    session_key: str | None = None     # the identity key our live session with that name holds (maybe announced)
    session_mkey: str | None = None    # the message key that session's peer said it signs with
    pinned: tuple[str, ...] = ()       # identity keys pinned for its bare name
    message_keys: dict[str, str] = dataclasses.field(default_factory=dict)  # of those: message key -> identity key
    signs: bool = False                # a key pinned for the name signs its signaling, so unsigned is forged
    accepting: bool = False            # /trust NAME waits for its next key: a new message key goes to the channel


@dataclasses.dataclass(frozen=True)
class RoomSignal:
    """A signaling message that passed the gate, as its sender sent it, with who signed it."""
    sender: str
    subtopic: str
    data: Any
    stamp: float                  # the sender's clock, epoch ms
    signer: str | None = None     # the identity key that signed it (RSA, or through a message key it certified)
    mkey: str | None = None       # the message key that signed it (rtchat.py's compact signing)
    impostor: bool = False        # in the name of a peer known to sign, not signed by it (only a connect passes)


GATE_IGNORES = ("own", "not-for-us", "twice")  # not drops: our own echo, offers and answers between others, and
#                                                  a copy from another source (the broker, or another member)


@dataclasses.dataclass(frozen=True)
class Checked:
    """The gate's verdict on one payload. reason: why there is no signal: replay, unreadable (a sealed payload
    this room's secret does not open), malformed, rate, forged, stale (old, or a nonce seen), or one of
    GATE_IGNORES. impostor: the sender, when it is signaling in a known name with another key; warn: this is the
    first such signaling in that name; hint_inbox: tell it, on this inbox tag, that we refuse its key."""
    signal: RoomSignal | None = None
    reason: str = ""
    impostor: str | None = None
    warn: bool = False
    hint_inbox: str | None = None


class SignalingGate:
    """Every payload a room receives is checked here before anything acts on it. facts(name) says what is known
    of a name's keys (from trust and the live sessions). drops counts what was refused, by reason."""

    def __init__(self, me: str, topic: str, facts: Callable[[str], KeyFacts], seal: Seal | None = None) -> None:
        self.me = me
        self.topic = topic               # what signatures cover: the room's (sealed) topic
        self.seal = seal
        self.facts = facts
        self.checked = 0                       # payloads looked at
        self.drops: collections.Counter[str] = collections.Counter()
        self._recent: dict[bytes, str] = {}    # digests of the last RECENT_PAYLOADS payloads -> where they came from
        self._lz = Budget(LZ_BUDGET)
        self._rates = RateLimit(*RATE_PER_SENDER)
        self._nonces: dict[Any, float] = {}
        self._nonce_limit = 20000
        self._warned = Once()                  # bare names whose impostors were reported (the user hears it once:
                                               # anyone can make fresh keys)
        self._hinted: dict[str, float] = {}    # bare name -> when we last told it we refuse its key

    @property
    def dropped(self) -> int:
        return sum(self.drops.values())

    @property
    def unreadable(self) -> int:
        return self.drops["unreadable"]

    def knows(self, payload: bytes) -> bool:
        """Were these exact bytes handled lately? (Then they are a replay.)"""
        return hashlib.blake2b(payload, digest_size=16).digest() in self._recent

    def sizes(self) -> dict[str, int]:
        """How big each table is (every one is bounded, whatever the broker brings)."""
        return {"recent": len(self._recent), "nonces": len(self._nonces), "rates": self._rates.size,
                "warned": len(self._warned), "hinted": len(self._hinted)}

    def check(self, payload: bytes, now: float, wall_ms: float, source: str = "") -> Checked:
        """One payload; now is monotonic seconds, wall_ms the epoch milliseconds. source: "" for the broker, else
        the member that passed it on (assisted signaling): the same bytes from another source are the copy that
        travelled the other way, not a replay."""
        self.checked += 1
        digest = hashlib.blake2b(payload, digest_size=16).digest()
        if digest in self._recent:  # the same bytes again: not decoded a second time
            if self._recent[digest] == source:
                return self._drop("replay")
            self._recent[digest] = source
            return Checked(reason="twice")
        self._recent[digest] = source
        if len(self._recent) > RECENT_PAYLOADS:
            del self._recent[next(iter(self._recent))]
        if self.seal:
            payload = self.seal.open(payload)
            if payload is None:
                return self._drop("unreadable")
        envelope = decode_envelope(payload, lambda size: self._lz.take(size, now))
        if envelope is None:
            return self._drop("malformed")
        sender, subtopic = envelope["sender"], envelope["subtopic"]
        if sender == self.me:
            return Checked(reason="own")
        if not self._for_us(envelope):
            return Checked(reason="not-for-us")
        if not self._rates.allow(sender, now):
            return self._drop("rate")
        facts = self.facts(sender)
        signer, mkey = self._signer(envelope, facts)
        # A peer we know signs: what comes in its name unsigned, or signed by a message key other than the ones we
        # know for it, is not from it. (Not knowing its message key, e.g. after a crash, the channel decides.)
        impostor = signer is None and facts.signs and (mkey is None or bool(facts.message_keys)) \
            and not (mkey is not None and facts.accepting)
        told = {}
        if impostor and mkey is not None:
            told = {"impostor": sender, "warn": self._warned(bare_name(sender)),
                    "hint_inbox": self._hint_inbox(sender, envelope, now)}
        if signer is False or (impostor and subtopic != "connect"):  # a connect is only a hint
            log.debug("dropped %s from %r: bad or missing signature", subtopic, sender)
            return self._drop("forged", **told)
        freshness = self._fresh(envelope, now, wall_ms)  # after the signature: a forged copy must not burn a nonce
        if freshness:
            return self._drop(freshness, **told)
        return Checked(RoomSignal(sender, subtopic, envelope["data"], envelope["timestamp"], signer, mkey, impostor),
                       **told)

    def _drop(self, reason: str, **told: Any) -> Checked:
        self.drops[reason] += 1
        return Checked(reason=reason, **told)

    def _for_us(self, envelope: dict) -> bool:
        """False for offers and answers to others: a room of N sees N² of them, and they must not use up the
        sender's rate allowance or our time on signatures."""
        data, subtopic = envelope["data"], envelope["subtopic"]
        if subtopic == "RTCOffer":
            data = data.get("offer") if isinstance(data, dict) else None
        elif subtopic != "RTCAnswer":
            return True
        return isinstance(data, dict) and data.get("target") == self.me

    def _fresh(self, envelope: dict, now: float, wall_ms: float) -> str:
        """'' if inside the clock window and not seen before (replay protection, §9.2), else why not."""
        if abs(wall_ms - envelope["timestamp"]) > CLOCK_SKEW_S * 1000:
            return "stale"
        nonce = envelope.get("nonce")
        key = nonce if isinstance(nonce, str) and len(nonce) <= 64 else (
            envelope["sender"], envelope["subtopic"], envelope["timestamp"])
        if key in self._nonces:
            return "stale"
        if len(self._nonces) >= self._nonce_limit:  # amortised: a flood costs O(1) per message, not O(n)
            fresh = {k: t for k, t in self._nonces.items() if now - t < 2 * CLOCK_SKEW_S}
            if len(fresh) > MAX_NONCES:
                fresh = dict(list(fresh.items())[-MAX_NONCES // 2:])
            self._nonces = fresh
            self._nonce_limit = max(20000, 2 * len(fresh))
        self._nonces[key] = now
        return ""

    def _signer(self, envelope: dict, facts: KeyFacts) -> tuple[str | None | bool, str | None]:
        """(the identity key that signed this envelope, None if unsigned or not known yet, False if the signature
        is bad; the Ed25519 message key that signed it, for compact signaling)."""
        sig, nonce, mkey = envelope.get("sig"), envelope.get("nonce"), envelope.get("mk")
        if sig is None:
            return None, None
        signed = signed_bytes("signaling", self.topic, envelope["sender"], envelope["subtopic"],
                              envelope["timestamp"], nonce, envelope["data"])
        if mkey is not None:
            if not (isinstance(mkey, str) and isinstance(nonce, str) and verify_message(mkey, sig, signed)):
                return False, None
            # Only a key certifying this message key makes the signature this sender's (not another peer's).
            owner = facts.session_key if facts.session_mkey == mkey else facts.message_keys.get(mkey)
            return owner, mkey
        return self._rsa_signer(envelope, facts, sig, nonce, signed), None

    @staticmethod
    def _rsa_signer(envelope: dict, facts: KeyFacts, sig: Any, nonce: Any, signed: bytes) -> str | None | bool:
        data, subtopic = envelope["data"], envelope["subtopic"]
        if subtopic == "connect":
            key = data.get("publicKeyString") if isinstance(data, dict) else None
        elif subtopic == "RTCOffer":
            info = data.get("userInfo") if isinstance(data, dict) else None
            key = info.get("publicKeyString") if isinstance(info, dict) else None
        else:
            key = facts.session_key
            if key is None and isinstance(sig, str) and isinstance(nonce, str):  # met before: one of its pinned keys
                with contextlib.suppress(ValueError):
                    signature = base64.b64decode(sig, validate=True)
                    key = next((k for k in facts.pinned if verify_signature(k, signature, signed)), None)
        if key is None and subtopic not in ("connect", "RTCOffer"):
            return None  # from a peer whose key we do not know yet: nothing to check it with
        if not (isinstance(key, str) and isinstance(sig, str) and isinstance(nonce, str) and len(sig) < 2048):
            return False
        try:
            signature = base64.b64decode(sig, validate=True)
        except ValueError:
            return False
        return key if verify_signature(key, signature, signed) else False

    def _hint_inbox(self, sender: str, envelope: dict, now: float) -> str | None:
        """The inbox tag to tell an impostor (an rtchat.py peer whose key is not the one pinned for its name) why
        it cannot connect: at most every REFUSAL_HINT_EVERY_S per name, and only to an inbox it named."""
        data = envelope["data"]
        info = data.get("userInfo") if envelope["subtopic"] == "RTCOffer" and isinstance(data, dict) else data
        tag = info.get("inbox") if isinstance(info, dict) else None
        bare = bare_name(sender)
        if not (isinstance(tag, str) and INBOX_TAG_RE.fullmatch(tag)) or \
                now - self._hinted.get(bare, -math.inf) < REFUSAL_HINT_EVERY_S:
            return None
        if len(self._hinted) > 1024:
            self._hinted.clear()
        self._hinted[bare] = now
        return tag


# =============================================================================
# PeerJS signaling: one WebSocket to a PeerServer (npm `peer`), where the
# peerjs-multichat page meets. Log-in by id, heartbeats, and OFFER, ANSWER,
# CANDIDATE, LEAVE, EXPIRE as checked plain values (PeerJSSignal). Uses Wire.
# Emits "signal" (PeerJSSignal) and "lost" (reason); knows no connection.
# =============================================================================

PEERJS_CLOUD = "wss://0.peerjs.com/"       # what the page's `new Peer(id)` uses (PeerJS 1.2.0), key "peerjs"
PEERJS_DEFAULT_KEY = "peerjs"
PEERJS_ID_PREFIX = "secure-p2p-multichat-"  # the page's appPrefix: user alice is secure-p2p-multichat-alice
PEERJS_HEARTBEAT_S = 5.0                   # as PeerJS clients; the server drops a client silent for 60-90 s
PEERJS_RECONNECT_S = (1.0, 30.0)           # a lost server is tried again after 1 s, then twice as long, up to 30 s
MAX_PEERJS_MESSAGE_CHARS = 64 * 1024       # one signaling message; an SDP is a few KiB
MAX_PEERJS_SOCKET_BYTES = 128 * 1024 ** 2  # above what the server relays (100 MiB), so that no peer can have our
                                           # socket closed by sending a big message (it is dropped, unparsed)
MAX_PEERJS_IDS = 256                       # ids read from one peer list (OFFER metadata, `connections` message)
PEERJS_RELAYED = ("OFFER", "ANSWER", "CANDIDATE", "LEAVE", "EXPIRE")
PEERJS_RTCHAT_VERSION = 1                  # `"rtchat": 1` in an OFFER or ANSWER: rtchat.py's identity frames and
                                           # signed lines on that connection (PROTOCOL.md, PeerJS); the page has none
_PEERJS_NAME_RE = re.compile(r"[A-Za-z0-9]+(?:[ _-][A-Za-z0-9]+)*")  # PeerJS's id rule (peerjs-multichat.md §2)
_CONNECTION_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")                # PeerJS makes dc_ + base 36
_DATA_SECTION_RE = re.compile(r"^m=application \d+ [A-Z/]*SCTP", re.MULTILINE)


def peerjs_id(name: str) -> str:
    """The page's id for a user name; UsageError for a name PeerJS refuses."""
    if not isinstance(name, str) or peerjs_name(PEERJS_ID_PREFIX + name) is None:
        raise UsageError(f"name {name!r} cannot be used on PeerJS: letters and digits, with single spaces, "
                         f"'_' or '-' between them, at most {MAX_NAME_CHARS} characters")
    return PEERJS_ID_PREFIX + name


def peerjs_name(peer_id: Any) -> str | None:
    """The user name in a page's id; None for anything else (another application's id, junk)."""
    if not (isinstance(peer_id, str) and peer_id.startswith(PEERJS_ID_PREFIX)):
        return None
    name = peer_id[len(PEERJS_ID_PREFIX):]
    return name if len(name) <= MAX_NAME_CHARS and _PEERJS_NAME_RE.fullmatch(name) else None


def peerjs_ids(value: Any) -> tuple[str, ...]:
    """A peer list from the network: the page's ids in it, each once, at most MAX_PEERJS_IDS."""
    if not isinstance(value, list):
        return ()
    ids = (peer_id for peer_id in value[:MAX_PEERJS_IDS] if peerjs_name(peer_id) is not None)
    return tuple(dict.fromkeys(ids))


@dataclasses.dataclass(frozen=True)
class PeerJSServer:
    """A PeerServer: ws[s]://host:port/path/ with its API key (?key=, default "peerjs")."""
    secure: bool
    host: str
    port: int
    path: str   # begins and ends with "/"
    key: str

    @classmethod
    def parse(cls, url: str | None = None) -> PeerJSServer:
        """None: the page's cloud server. ws:// wss:// (or http:// https://); with no scheme, wss:// when the
        port is 443 or not given (the cloud: `0.peerjs.com`), else ws:// (`127.0.0.1:9000`)."""
        url = url or PEERJS_CLOUD
        parts = urlsplit(url if "://" in url else f"//{url}")
        try:
            port = parts.port
        except ValueError:
            raise UsageError(f"PeerJS server URL {url!r} has a bad port") from None
        scheme = parts.scheme.lower() or ("wss" if port in (None, 443) else "ws")
        if scheme not in ("ws", "wss", "http", "https"):
            raise UsageError(f"PeerJS server URL {url!r}: use ws:// or wss://")
        if not parts.hostname:
            raise UsageError(f"PeerJS server URL {url!r} has no host")
        query = parse_qs(parts.query, keep_blank_values=True)
        if set(query) - {"key"} or len(query.get("key", [""])) != 1:
            raise UsageError(f"PeerJS server URL {url!r}: the only parameter it takes is ?key=")
        key = query.get("key", [PEERJS_DEFAULT_KEY])[0]
        if not key or len(key) > 256 or clean(key) != key:
            raise UsageError(f"PeerJS server URL {url!r} has a bad key")
        secure = scheme in ("wss", "https")
        path = "/" + parts.path.strip("/") + "/" if parts.path.strip("/") else "/"
        return cls(secure, parts.hostname, port or (443 if secure else 80), path, key)

    def socket_url(self, peer_id: str, token: str) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        query = urlencode({"key": self.key, "id": peer_id, "token": token}, quote_via=quote)
        return f"{'wss' if self.secure else 'ws'}://{host}:{self.port}{self.path}peerjs?{query}"

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'wss' if self.secure else 'ws'}://{host}:{self.port}{self.path}"


@dataclasses.dataclass(frozen=True)
class PeerJSSignal:
    """One message the server relayed, checked: every field has the type and size it should."""
    kind: str                        # OFFER, ANSWER, CANDIDATE, LEAVE or EXPIRE
    src: str                         # the sender's id, as the server saw it (EXPIRE: the id that was not there)
    connection_id: str = ""
    sdp: str = ""                    # OFFER, ANSWER
    candidate: dict | None = None    # CANDIDATE: candidate, sdpMid, sdpMLineIndex, usernameFragment
    peer_ids: tuple[str, ...] = ()   # OFFER: metadata.peerIds, the caller's mesh
    client: str = ""                 # OFFER, ANSWER: its `browser` field ("chrome", or rtchat.py's CLIENT_TAG)
    speaks_identity: bool = False    # OFFER, ANSWER: `"rtchat": 1`, an rtchat.py peer that proves its key

    @classmethod
    def parse(cls, message: Any) -> PeerJSSignal | None:
        """None for anything but a well-formed relayed message from one of the page's ids."""
        if not isinstance(message, dict) or message.get("type") not in PEERJS_RELAYED:
            return None
        kind, src, payload = message["type"], message.get("src"), message.get("payload")
        if peerjs_name(src) is None:
            return None
        if kind in ("LEAVE", "EXPIRE"):
            return cls(kind, src)
        if not isinstance(payload, dict):
            return None
        connection_id = payload.get("connectionId")
        if not (isinstance(connection_id, str) and _CONNECTION_ID_RE.fullmatch(connection_id)):
            return None
        if kind == "CANDIDATE":
            candidate = _peerjs_candidate(payload.get("candidate"))
            return cls(kind, src, connection_id, candidate=candidate) if candidate else None
        description = payload.get("sdp")
        expected = "offer" if kind == "OFFER" else "answer"
        if not (isinstance(description, dict) and description.get("type") == expected
                and isinstance(description.get("sdp"), str) and _DATA_SECTION_RE.search(description["sdp"])):
            return None  # no SDP, or one with no data channel in it
        client = payload.get("browser")
        client = clean(client, 64) if isinstance(client, str) else ""
        speaks_identity = type(payload.get("rtchat")) is int and payload["rtchat"] == PEERJS_RTCHAT_VERSION
        if kind == "ANSWER":
            return cls(kind, src, connection_id, description["sdp"], client=client, speaks_identity=speaks_identity)
        if payload.get("type") != "data" or payload.get("serialization", "json") != "json":
            return None  # a call, or a DataConnection in a serialization we do not speak (binary)
        metadata = payload.get("metadata")
        peer_ids = peerjs_ids(metadata.get("peerIds")) if isinstance(metadata, dict) else ()
        return cls(kind, src, connection_id, description["sdp"], peer_ids=peer_ids, client=client,
                   speaks_identity=speaks_identity)


def _peerjs_candidate(value: Any) -> dict | None:
    if not isinstance(value, dict):
        return None
    line, mid, index, ufrag = (value.get(k) for k in ("candidate", "sdpMid", "sdpMLineIndex", "usernameFragment"))
    if not (isinstance(line, str) and 0 < len(line) <= 512):
        return None
    return {"candidate": line,
            "sdpMid": mid if isinstance(mid, str) and len(mid) <= 32 else None,
            "sdpMLineIndex": index if isinstance(index, int) and not isinstance(index, bool) and 0 <= index < 64
            else None,
            "usernameFragment": ufrag if isinstance(ufrag, str) and len(ufrag) <= 256 else None}


def _websockets():
    """The websockets package: imported when the PeerJS network is first used, as nothing else needs it."""
    try:
        import websockets.asyncio.client
        import websockets.exceptions
    except ImportError:
        raise missing_packages_error(["websockets"], ["websockets"]) from None
    return websockets


class PeerJSSignaling(Emitter):
    """Our id on a PeerServer: log in, keep alive, relay. What fails a check is dropped and counted. Emits "signal"
    (PeerJSSignal), "lost" (reason) and "back" once a lost server let us in again (tried until close(); under the
    same token, so the server gives us our id back even before it noticed the old socket is gone)."""

    def __init__(self, peer_id: str, server: PeerJSServer | str | None = None, connect_timeout: float = 10.0,
                 heartbeat_s: float = PEERJS_HEARTBEAT_S) -> None:
        super().__init__()
        self.server = server if isinstance(server, PeerJSServer) else PeerJSServer.parse(server)
        self.peer_id = peer_id
        self.connect_timeout = connect_timeout
        self.heartbeat_s = heartbeat_s
        self.is_connected = False
        self.dropped = 0
        self._token = secrets.token_hex(8)
        self._rates = RateLimit(*RATE_PER_SENDER)
        self._socket = None
        self._tasks: list[asyncio.Task] = []

    def __repr__(self) -> str:
        return f"PeerJSSignaling({self.peer_id!r} on {self.server})"

    async def connect(self) -> None:
        """Log in; returns once the server has said OPEN.
        Raises NameTaken, PeerServerRefused (a bad key) or PeerServerUnreachable."""
        ws = _websockets()
        try:
            self._socket = await ws.asyncio.client.connect(
                self.server.socket_url(self.peer_id, self._token), max_size=MAX_PEERJS_SOCKET_BYTES, max_queue=1,
                open_timeout=self.connect_timeout)
            first = await asyncio.wait_for(self._socket.recv(), self.connect_timeout)
        except (OSError, asyncio.TimeoutError, ws.exceptions.WebSocketException) as exc:
            await self._drop_socket()
            raise PeerServerUnreachable(f"cannot reach PeerJS server {self.server}: {_socket_error(exc)}") from None
        with contextlib.suppress(ValueError):
            first = parse_json(first) if len(first) <= MAX_PEERJS_MESSAGE_CHARS else None
        kind = first.get("type") if isinstance(first, dict) else None
        if kind != "OPEN":
            await self._drop_socket()
            payload = first.get("payload") if isinstance(first, dict) else None
            reason = clean(payload.get("msg"), 200) if isinstance(payload, dict) else "no reason given"
            if kind == "ID-TAKEN":
                raise NameTaken(f"{peerjs_name(self.peer_id) or self.peer_id} is already taken on {self.server}")
            if kind == "ERROR":
                raise PeerServerRefused(f"PeerJS server {self.server} refused us: {reason}")
            raise PeerServerUnreachable(f"{self.server} is not a PeerJS server (it did not say OPEN)")
        self.is_connected = True
        self._tasks += [_spawn(self._read(), f"peerjs-read-{self.peer_id}"),
                        _spawn(self._heartbeat(), f"peerjs-heartbeat-{self.peer_id}")]

    async def send(self, kind: str, dst: str, payload: dict | None = None) -> bool:
        """Relay one message to dst; False while we are not connected."""
        if not self.is_connected:
            return False
        message = {"type": kind, "dst": dst} if payload is None else {"type": kind, "payload": payload, "dst": dst}
        try:
            await self._socket.send(to_json(message))
        except _websockets().exceptions.ConnectionClosed:
            return False
        return True

    async def close(self) -> None:
        self.is_connected = False
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._drop_socket()

    async def _drop_socket(self) -> None:
        socket, self._socket = self._socket, None
        if socket is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(socket.close(), 2)

    async def _heartbeat(self) -> None:
        while self.is_connected:
            await asyncio.sleep(self.heartbeat_s)
            with contextlib.suppress(_websockets().exceptions.ConnectionClosed):
                await self._socket.send('{"type":"HEARTBEAT"}')

    async def _read(self) -> None:
        closed = _websockets().exceptions.ConnectionClosed
        try:
            async for text in self._socket:
                self._receive(text)
            reason = "the server closed the connection"
        except closed as exc:
            reason = f"connection lost ({exc.rcvd.code if exc.rcvd else 'no close frame'})"
        if self.is_connected:
            self.is_connected = False
            log.warning("lost PeerJS server %s: %s", self.server, reason)
            self.emit("lost", reason)
            self._tasks.append(_spawn(self._reconnect(), f"peerjs-reconnect-{self.peer_id}"))

    async def _reconnect(self) -> None:
        for task in [t for t in self._tasks if t is not asyncio.current_task()]:
            task.cancel()  # the old socket's reader (done) and heartbeat
        self._tasks = [asyncio.current_task()]
        await self._drop_socket()
        delay, longest = PEERJS_RECONNECT_S
        while True:
            await asyncio.sleep(delay)
            try:
                await self.connect()
            except (PeerServerUnreachable, NameTaken) as exc:
                log.debug("%r: still no server: %s", self, exc)
                delay = min(delay * 2, longest)
                continue
            except PeerServerRefused as exc:
                log.warning("PeerJS server %s refuses us now: %s", self.server, exc)
                return
            log.warning("PeerJS server %s is back", self.server)
            self.emit("back")
            return

    def _receive(self, text: str | bytes) -> None:
        message = None
        if len(text) <= MAX_PEERJS_MESSAGE_CHARS:
            with contextlib.suppress(ValueError):
                message = parse_json(text)
        signal = PeerJSSignal.parse(message)
        if signal is None or not self._rates.allow(signal.src):
            self.dropped += 1
            log.debug("%r: dropped a server message", self)
            return
        self.emit("signal", signal)


def _socket_error(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    return clean(str(exc), 200) or type(exc).__name__


# =============================================================================
# Peer: one remote wire name, its RTCPeerConnection and the data channels its
# Dialect names, ask/answer by n, ping/pong liveness, call declining; its state
# machine and tasks. Uses Wire. Emits "open", "frame" (label, value),
# "file-channel", "no-route" (facts), "closed" (reason); knows no Room.
# =============================================================================

_ICE_URL_RE = re.compile(r"(?P<scheme>stun|turns?):(?:(?P<user>[^:@]+):(?P<password>[^@]+)@)?"
                         r"(?P<host>[^?:@/\[\]]+)(?::(?P<port>\d{1,5}))?(?:\?transport=(?P<transport>udp|tcp))?")


@dataclasses.dataclass(frozen=True)
class IceServer:
    """One STUN or TURN server as --ice gives it: stun:HOST[:PORT], turn[s]:USER:PASS@HOST[:PORT][?transport=tcp]."""
    scheme: str
    host: str
    port: int
    transport: str = "udp"
    user: str | None = None
    password: str | None = None

    @classmethod
    def parse(cls, url: str) -> IceServer:
        match = _ICE_URL_RE.fullmatch(url.strip())
        if match is None or (match["scheme"] == "stun" and (match["user"] or match["transport"])) \
                or (match["scheme"] == "turns" and match["transport"] == "udp"):
            raise UsageError(f"bad ICE server {clean(url, 200)!r}: use stun:HOST:PORT or "
                             f"turn:USER:PASS@HOST:PORT (add ?transport=tcp for TURN over TCP)")
        port = int(match["port"] or (5349 if match["scheme"] == "turns" else 3478))
        if not 0 < port < 65536:
            raise UsageError(f"bad port in ICE server {clean(url, 200)!r}")
        transport = match["transport"] or ("tcp" if match["scheme"] == "turns" else "udp")
        return cls(match["scheme"], match["host"], port, transport, match["user"], match["password"])

    @property
    def url(self) -> str:
        """The URL without credentials (what aiortc takes, and what may be shown)."""
        default = "tcp" if self.scheme == "turns" else "udp"
        query = f"?transport={self.transport}" if self.scheme != "stun" and self.transport != default else ""
        return f"{self.scheme}:{self.host}:{self.port}{query}"


def ice_configuration(servers: list[IceServer]) -> RTCConfiguration:
    """aiortc's configuration for these servers (aioice uses the first STUN and the first TURN server only)."""
    return RTCConfiguration(iceServers=[RTCIceServer(urls=s.url, username=s.user, credential=s.password)
                                        for s in servers])


def sctp_idle(pc, channels) -> bool:
    """What was sent on these channels has left our buffers and the remote SCTP stack acknowledged it (closing a
    connection aborts it: what is still queued is lost). aiortc raises no event for that: callers poll."""
    if any(c.bufferedAmount for c in channels if c.readyState == "open"):
        return False
    sctp = getattr(pc, "sctp", None)
    return not any(getattr(sctp, attr, None) for attr in ("_data_channel_queue", "_outbound_queue", "_sent_queue"))


def restrict_ice_hosts(addresses: list[str]) -> None:
    """Offer only these host addresses in ICE (process-wide: aioice has no per-connection setting).

    aioice never offers loopback addresses on its own, so `--ice-host 127.0.0.1` is what makes a
    loopback-only connection possible, and a way to keep other interfaces' addresses private.
    """
    import aioice.ice

    def host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return [a for a in addresses if (":" in a and use_ipv6) or (":" not in a and use_ipv4)]
    aioice.ice.get_host_addresses = host_addresses


SOCKET_BUFFER_BYTES = 4 * 1024 * 1024   # aioice's 256 KiB overflows on bursts (baseline.md, gotcha 7)


def enlarge_socket_buffers(pc) -> None:
    """Give the ICE sockets room for a burst: with aioice's default, bursts overflow the UDP receive buffer
    and SCTP stalls on retransmits. The kernel caps this at net.core.rmem_max."""
    import socket
    try:
        protocols = pc.sctp.transport.transport._connection._protocols
    except AttributeError:  # aiortc internals moved: keep the defaults
        return
    for protocol in protocols:
        sock = protocol.transport.get_extra_info("socket") if protocol.transport else None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER_BYTES)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER_BYTES)


def bound_sctp_reassembly(pc, on_exceeded: Callable[[str], None]) -> None:
    """Bound what a peer can leave in our SCTP reassembly. Checked against aiortc 1.16.0 (rtcsctptransport.py):
    RTCSctpTransport._receive_data_chunk keeps every fragment until a message's last one comes, and scans them all
    for each new one, so a peer that never finishes its messages (ignoring our max-message-size and our receive
    window) held 384 MB for 300 MB sent, at quadratic cost. Wrapped here, per association: a message longer than
    SCTP_MAX_MESSAGE_BYTES, or more than SCTP_MAX_HELD_BYTES held in all, ends it through on_exceeded(reason)."""
    sctp = getattr(pc, "sctp", None)
    receive = getattr(sctp, "_receive_data_chunk", None)
    if receive is None or not isinstance(getattr(sctp, "_inbound_streams", None), dict) \
            or not isinstance(getattr(sctp, "_advertised_rwnd", None), int):
        log.warning("aiortc internals moved: inbound SCTP reassembly is not bounded")
        return
    from aiortc.rtcsctptransport import SCTP_DATA_FIRST_FRAG, SCTP_DATA_LAST_FRAG
    window = sctp._advertised_rwnd          # aiortc lowers it by what reassembly holds, raises it as messages leave
    runs: dict[int, tuple[int, int]] = {}   # stream -> (TSN of its last fragment, bytes of its message so far)
    state = {"chunks": 0, "over": False}

    def held(chunks: int) -> int:
        return window - sctp._advertised_rwnd + SCTP_CHUNK_COST * chunks

    def exceeded(reason: str) -> None:
        if not state["over"]:
            state["over"] = True
            on_exceeded(reason)

    async def bounded_receive_data_chunk(chunk) -> None:
        if state["over"]:
            return
        last, size = runs.get(chunk.stream_id, (None, 0))
        follows = last is not None and chunk.tsn == (last + 1) % 2 ** 32 and not chunk.flags & SCTP_DATA_FIRST_FRAG
        size = len(chunk.user_data) + (size if follows else 0)  # fragments of a message come with consecutive TSNs
        runs[chunk.stream_id] = (chunk.tsn, 0 if chunk.flags & SCTP_DATA_LAST_FRAG else size)
        if size > SCTP_MAX_MESSAGE_BYTES:
            exceeded(f"sent a message over {SCTP_MAX_MESSAGE_BYTES >> 10} KiB")
            return
        stream = sctp._inbound_streams.get(chunk.stream_id)
        before = len(stream.reassembly) if stream else 0
        await receive(chunk)
        stream = sctp._inbound_streams.get(chunk.stream_id)
        state["chunks"] += (len(stream.reassembly) if stream else 0) - before
        if held(state["chunks"]) > SCTP_MAX_HELD_BYTES:  # recount (streams reset elsewhere), then judge
            state["chunks"] = sum(len(s.reassembly) for s in sctp._inbound_streams.values())
            if held(state["chunks"]) > SCTP_MAX_HELD_BYTES:
                exceeded(f"left over {SCTP_MAX_HELD_BYTES >> 20} MiB of unfinished messages")
    sctp._receive_data_chunk = bounded_receive_data_chunk


async def channel_drained(channel, below: int, timeout: float) -> bool:
    """Until the channel holds at most `below` bytes to send; False if it closed, or stayed fuller for timeout."""
    if channel.bufferedAmount > below and channel.readyState == "open":
        drained = asyncio.Event()
        channel.bufferedAmountLowThreshold = below
        channel.on("bufferedamountlow", drained.set)
        channel.on("close", drained.set)
        try:
            await asyncio.wait_for(drained.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        finally:
            channel.remove_listener("bufferedamountlow", drained.set)
            channel.remove_listener("close", drained.set)
    return channel.readyState == "open"


CANDIDATE_TYPES = {"host", "srflx", "prflx", "relay"}   # what a peer's SDP may say, all we repeat of it


def negotiated_fingerprint(pc) -> str | None:
    """The sha-256 fingerprint of the certificate the remote actually used in DTLS."""
    try:
        from aiortc.rtcdtlstransport import certificate_digest
        cert = pc.sctp.transport._ssl.get_peer_certificate(as_cryptography=True)
        return certificate_digest(cert, "sha-256").upper()
    except Exception:  # aiortc internals moved: aiortc itself has checked the SDP fingerprint in DTLS
        log.debug("cannot read the negotiated DTLS fingerprint", exc_info=True)
        return None


def dtls_fingerprints(pc, remote_sdp: str | None) -> tuple[str | None, str | None]:
    """(ours, theirs): the sha-256 fingerprints of the two DTLS certificates, theirs as actually used."""
    ours = sdp_fingerprint(pc.localDescription.sdp) if pc and pc.localDescription else None
    theirs = (negotiated_fingerprint(pc) if pc else None) or sdp_fingerprint(remote_sdp or "")
    return ours, theirs


def remote_candidate(data: dict, remote_sdp: str):
    """A trickled candidate as aiortc takes it; None if malformed or meant for another of the sender's sessions
    (its ufrag is not the one in remote_sdp: browsers' candidates carry no target, rtchat-wire.md §5.3)."""
    ufrag = data.get("usernameFragment")
    if ufrag and ufrag != sdp_field(remote_sdp, "ice-ufrag"):
        return None
    line = data.get("candidate")
    if not isinstance(line, str) or not line.strip() or len(line) > 512:
        return None
    try:
        candidate = candidate_from_sdp(line.split(":", 1)[1] if line.startswith(("candidate:", "a=")) else line)
    except (ValueError, IndexError):
        return None
    mid, index = data.get("sdpMid"), data.get("sdpMLineIndex")
    candidate.sdpMid = mid if isinstance(mid, str) else None
    candidate.sdpMLineIndex = index if isinstance(index, int) else (0 if candidate.sdpMid is None else None)
    return candidate


class Dialect:
    """What a remote speaks on the data plane, as far as Peer needs it: the channels an offerer opens, and whether
    the remote's silence counts from the session's start (it answers our pings at once) or from its first pong
    (browsers answer only once they have verified us). This base is the RTChat page's; the Dialects section below
    adds, per kind of peer, how it is announced to, how its offers and answers are signed, how it proves its key
    and what it can do (capabilities: "dm", "ask", "files", "acks", "signatures", "history")."""
    name = "browser"
    labels: tuple[str, ...] = CHANNELS
    capabilities: frozenset[str] = frozenset({"dm"})
    silence_from_open = False


class Pacer:
    """Our own messages to one peer: sent at once while within SEND_PACE (under the peer's CHAT_BUDGET, which would
    drop a burst) and while the channel is not backed up, else queued, in order, and sent as both allow."""

    def __init__(self, peer: Peer, tasks: Tasks) -> None:
        self.peer = peer
        self.backlog: collections.deque[tuple[str, Any]] = collections.deque()  # (label, value) waiting their turn
        self._pace = Budget(SEND_PACE)
        self._tasks = tasks
        self._pump: asyncio.Task | None = None

    def send(self, label: str, value: Any) -> bool:
        channel = self.peer.channels.get(label)
        if channel is None or channel.readyState != "open":
            return False
        if not self.backlog and channel.bufferedAmount <= SEND_BUFFER_BYTES and self._pace.take():
            return self.peer.send(label, value)
        self.backlog.append((label, value))
        if self._pump is None:
            self._pump = self._tasks.spawn(self._send_backlog(), f"backlog-{self.peer.name}")
        return True

    async def _send_backlog(self) -> None:
        try:
            while self.backlog and self.peer.is_open:
                label, value = self.backlog[0]
                await asyncio.sleep(self._pace.wait_s())
                channel = self.peer.channels.get(label)
                if channel is None or not await channel_drained(channel, SEND_BUFFER_BYTES, FILE_IDLE_S):
                    return
                if self._pace.take():
                    self.backlog.popleft()
                    self.peer.send(label, value)
        finally:
            self._pump = None


class IcePath:
    """The way ICE finds to one peer, read from aiortc's and aioice's objects (which raise no event for most of
    it): whether its checks find a pair in time, the candidates each side had, direct or through TURN."""

    def __init__(self, pc, ice: RTCConfiguration) -> None:
        self.pc = pc
        self.ice = ice

    def watch(self, tasks: Tasks, no_path: Callable[[], None]) -> None:
        """Both descriptions are set, so signaling reached the peer and ICE checks run: they find a pair soon, or
        never (aioice itself gives up only after about a minute). no_path is called on failure or at the deadline."""
        def on_state() -> None:
            if self.pc.iceConnectionState == "failed":
                no_path()

        def on_deadline() -> None:
            if self.pc.iceConnectionState not in ("completed", "closed"):
                no_path()
        self.pc.on("iceconnectionstatechange", on_state)
        tasks.later(NO_PATH_AFTER_S, on_deadline)

    def _transport(self):
        try:
            return self.pc.sctp.transport.transport
        except AttributeError:
            return None

    def facts(self) -> dict:
        """What ICE had to work with: candidate types on each side (host, srflx: an address a STUN server saw,
        relay: a TURN allocation), whether each side is behind NAT, and whether we have STUN and TURN servers."""
        ice = self._transport()
        ours = ice.iceGatherer.getLocalCandidates() if ice else []
        theirs = ice.getRemoteCandidates() if ice else []
        return {"ours": sorted({c.type for c in ours}), "theirs": sorted({c.type for c in theirs} & CANDIDATE_TYPES),
                "nat": self._behind_nat(ours), "their_nat": self._behind_nat(theirs),
                **{scheme: any(str(server.urls).startswith(scheme) for server in self.ice.iceServers or ())
                   for scheme in ("stun", "turn")}}

    @staticmethod
    def _behind_nat(candidates: list) -> bool | None:
        """A STUN server saw another address than the host's own; None: no STUN answer to tell."""
        seen = [c for c in candidates if c.type == "srflx"]
        return any(c.ip != c.relatedAddress for c in seen) if seen else None

    @property
    def kind(self) -> str | None:
        """"direct" or "relay" (through a TURN server); None if not connected (or aioice's internals moved)."""
        try:
            pair = next(iter(self._transport()._connection._nominated.values()))
        except (AttributeError, StopIteration):
            return None
        return "relay" if "relay" in (pair.local_candidate.type, pair.remote_candidate.type) else "direct"


class Peer(Emitter):
    """One remote. A Peer is one session: a reconnect is a new Peer, so nothing verified carries over.

    Its state moves only forward, by its own methods: seen (announced) -> connecting (begin) -> open (channels up)
    -> verified (verify) -> closed (close, from any state). Its tasks and timers end with it."""

    unsigned_signaling = False  # an rtchat.py peer signs its offers and answers: unsigned ones prove nothing

    def __init__(self, name: str, ice: RTCConfiguration, dialect: Dialect | None = None, *,
                 key_string: str | None = None, client_tag: str | None = None, candidates: list[dict] = ()) -> None:
        super().__init__()
        self.name = name
        self.dialect = dialect or Dialect()
        self.shape = skeleton(bare_name(name))  # what the name looks like, to spot look-alikes
        self.key_string = key_string
        self.fingerprint: str | None = None
        self.client_tag = client_tag
        self.signed_key: str | None = None   # identity key that signed this session's offer/answer (if known)
        self.signal_mkey: str | None = None  # message key that signed it (compact signaling, rtchat.py)
        self.signal_ts: float | None = None  # sender's timestamp on that offer/answer: older messages are replays
        self.state = "seen"                  # seen, connecting, open, verified, closed
        self.is_offerer = False
        self.was_open = False
        self.channel_bound = False
        self.rtt_ms: float | None = None
        self.remote_sdp: str | None = None
        self.created = time.monotonic()
        self.last_pong: float | None = None
        self.verified_at: float | None = None
        self.message_key: str | None = None     # an rtchat.py peer's certified Ed25519 key (its hello)
        self.late_signatures = False            # it takes a batch signature for messages sent ahead of it (hello)
        self.author: dict | None = None         # its key, message key and certificate, once proven in the channel
        self.takes_files = False                # it said so in its hello
        self.lookalike: str | None = None       # a known name its name looks like (Room decides, when verified)
        self.budgets = {kind: Budget(budget) for kind, budget in (
            ("frame", FRAME_BUDGET), ("chat", CHAT_BUDGET), ("sync", SYNC_BUDGET), ("identify", IDENTIFY_BUDGET),
            ("file", FILE_OFFER_BUDGET), ("signal", SIGNAL_FRAME_BUDGET), ("relay", RELAY_BUDGET),
            ("relay-bytes", RELAY_BYTES_BUDGET), ("box", BOX_BUDGET), ("reach", REACH_BUDGET),
            ("gossip", GOSSIP_BUDGET))}
        self.questions_open = 0                 # its questions being answered now
        self.over_budget: dict[str, int] = {}   # requests dropped, by kind
        self.pc = None
        self.ice_path: IcePath | None = None
        self.channels: dict[str, Any] = {}
        self._ice = ice
        self._answers: dict[int, asyncio.Future] = {}
        self._next_n = 0
        self._candidates: list[dict] = list(candidates)[:MAX_PENDING_CANDIDATES]
        self._labels = self.dialect.labels
        self._ping_sent: float | None = None
        self._pongs: list[asyncio.Future] = []  # probes waiting for the next pong
        self._answered = False                  # an answer was taken (a second one is not)
        self._tasks = Tasks()
        self._shutdown: asyncio.Task | None = None
        if key_string:
            with contextlib.suppress(ValueError):
                self.fingerprint = fingerprint(key_string)

    def __repr__(self) -> str:
        return f"Peer({self.name!r}, {self.state})"

    @functools.cached_property
    def pacer(self) -> Pacer:
        """Made when first sent through: a name only announced holds no reference to itself, so a flood of made-up
        names is freed as each is dropped, not at the next full garbage collection."""
        return Pacer(self, self._tasks)

    @property
    def is_rtchat_py(self) -> bool:
        return bool(self.client_tag and self.client_tag.startswith("rtchat-py/"))

    def can(self, capability: str) -> bool:
        """Does its dialect do this ("dm", "ask", "files", "acks", "signatures", "history")?"""
        return capability in self.dialect.capabilities

    @property
    def is_verified(self) -> bool:
        return self.state == "verified"

    @property
    def is_open(self) -> bool:
        return self.state in ("open", "verified")

    # -- session set-up ---------------------------------------------------------------------
    def begin(self, signer: str | None = None, mkey: str | None = None, stamp: float | None = None) -> None:
        """A session is being set up (it counts as one from now on): not open by CONNECT_TIMEOUT_S, it is closed.
        signer, mkey, stamp: who signed the offer that began it, and when (for an answerer)."""
        if self.state != "seen":
            return
        self.state = "connecting"
        self.signed_key, self.signal_mkey, self.signal_ts = signer, mkey, stamp
        self._tasks.later(CONNECT_TIMEOUT_S, self._open_deadline)

    def _make_pc(self):
        self.begin()
        self.pc = pc = RTCPeerConnection(self._ice)
        self.ice_path = IcePath(pc, self._ice)
        pc.on("datachannel", self._adopt)
        pc.on("connectionstatechange", self._on_connection_state)
        return pc

    async def create_offer(self) -> str:
        self.is_offerer = True
        pc = self._make_pc()
        for label in self._labels:
            self._adopt(pc.createDataChannel(label))
        bound_sctp_reassembly(pc, self.close)
        await pc.setLocalDescription(await pc.createOffer())
        return pc.localDescription.sdp

    async def accept_offer(self, sdp: str) -> str:
        pc = self._make_pc()
        await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        bound_sctp_reassembly(pc, self.close)
        self.remote_sdp = sdp
        await self._flush_candidates()
        await pc.setLocalDescription(await pc.createAnswer())
        self._watch_path()
        return pc.localDescription.sdp

    def accept_answer(self, sdp: str, signer: str | None = None, mkey: str | None = None,
                      stamp: float | None = None) -> Awaitable[None]:
        """Take the answer to our offer, and who signed it (a key that signed it is the one the channel must be
        bound to), at once: no other answer is taken from now on. Returns the coroutine that applies it."""
        self._answered = True
        self.signed_key, self.signal_mkey, self.signal_ts = signer, mkey, stamp
        if signer is not None and self.key_string is None:
            self.key_string, self.fingerprint = signer, fingerprint(signer)
        return self._apply_answer(sdp)

    async def _apply_answer(self, sdp: str) -> None:
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="answer"))
        self.remote_sdp = sdp
        await self._flush_candidates()
        self._watch_path()

    @property
    def awaits_answer(self) -> bool:
        return self.pc is not None and self.pc.signalingState == "have-local-offer" and not self._answered

    async def add_candidate(self, data: dict) -> None:
        """A trickled candidate from a browser: buffered until the remote SDP is known, then ufrag-checked."""
        if self.remote_sdp is None:
            if len(self._candidates) < MAX_PENDING_CANDIDATES:
                self._candidates.append(data)
            return
        candidate = remote_candidate(data, self.remote_sdp)
        if candidate is None or self.state == "closed":
            return
        try:
            await self.pc.addIceCandidate(candidate)
        except Exception as exc:
            log.debug("%r: candidate refused: %s", self, exc)

    async def _flush_candidates(self) -> None:
        buffered, self._candidates = self._candidates, []
        for data in buffered:
            await self.add_candidate(data)

    def dtls_fingerprints(self) -> tuple[str | None, str | None]:
        return dtls_fingerprints(self.pc, self.remote_sdp)

    def verify(self, key: str, channel_bound: bool, author: dict | None = None, lookalike: str | None = None) -> None:
        """It proved key on this connection (bound to it, if channel_bound): verified."""
        if self.state != "open":
            return
        self.key_string, self.fingerprint, self.channel_bound = key, fingerprint(key), channel_bound
        self.author, self.lookalike = author, lookalike
        self.state = "verified"
        self.verified_at = time.monotonic()

    # -- channels -----------------------------------------------------------------------------
    def _adopt(self, channel) -> None:
        label = channel.label
        if label.startswith("file/"):  # a file on its own channel, opened by an rtchat.py peer (Room decides)
            self.emit("file-channel", self, channel)
            return
        if label not in CHANNELS:  # nothing of ours: one more stream to keep for nothing
            channel.close()
            return
        if label in self.channels and self.channels[label] is not channel:
            return  # a second channel with a known label: keep the first
        self.channels[label] = channel
        channel.on("message", lambda data: self._on_message(label, data))
        if self.is_offerer:
            channel.on("open", self._maybe_all_open)
        if label == "chat":
            channel.on("close", lambda: self.close("chat channel closed"))

    async def open_channel(self, label: str, timeout: float = 10.0):
        """A further data channel on the live connection (in-band, no new signaling)."""
        if self.pc is None or not self.is_open:
            raise RtchatError(f"{self.name} is not connected")
        channel = self.pc.createDataChannel(label)
        opened = asyncio.get_running_loop().create_future()
        channel.on("open", lambda: opened.done() or opened.set_result(None))
        try:
            await asyncio.wait_for(opened, timeout)
        except asyncio.TimeoutError:
            channel.close()
            raise RtchatError(f"{self.name} did not open a channel within {timeout:g} s") from None
        return channel

    def _maybe_all_open(self) -> None:
        if self.state == "connecting" and all(
                c.readyState == "open" for c in self.channels.values()) and len(self.channels) == len(self._labels):
            self.send("connectedViaRTC", None)
            self._set_open()

    def _on_connection_state(self) -> None:
        state = self.pc.connectionState if self.pc else "closed"
        if state in ("failed", "closed"):
            self.close(f"connection {state}")
        elif state == "connected" and not self.is_offerer:
            self._tasks.later(2.0, self._answerer_fallback_open)

    # -- network path -------------------------------------------------------------------------
    def _watch_path(self) -> None:
        self.ice_path.watch(self._tasks, self._no_path)

    def _no_path(self) -> None:
        if self.state == "connecting":
            self.emit("no-route", self, self.ice_path.facts())
            self.close("no network path")

    @property
    def path(self) -> str | None:
        """How the session's packets go: "direct" or "relay" (through a TURN server); None if not known."""
        return self.ice_path.kind if self.ice_path is not None else None

    def _open_deadline(self) -> None:
        if self.state == "connecting":
            self.close("did not connect in time")

    def _answerer_fallback_open(self) -> None:
        """connectedViaRTC opens an answerer; if it never comes, chat and question channels suffice (§5.4)."""
        if self.state == "connecting" and {"chat", "question", "answer"} <= set(self.channels):
            self._set_open()

    def _set_open(self) -> None:
        if self.state != "connecting":
            return
        self.state = "open"
        self.was_open = True
        enlarge_socket_buffers(self.pc)
        self._tasks.spawn(self._keep_alive(), f"ping-{self.name}")
        self.emit("open", self)

    def send(self, label: str, value: Any) -> bool:
        """One JSON text frame on the channel named label; False if that channel is not open."""
        channel = self.channels.get(label)
        if channel is None or channel.readyState != "open":
            return False
        channel.send(to_json(value))
        return True

    def send_reply(self, label: str, value: Any) -> bool:
        """What we send because the peer asked: dropped while its channel holds REPLY_BUFFER_BYTES, so a peer that
        asks and does not read cannot fill our memory."""
        channel = self.channels.get(label)
        if channel is not None and channel.bufferedAmount > REPLY_BUFFER_BYTES:
            self.over_budget["reply"] = self.over_budget.get("reply", 0) + 1
            return False
        return self.send(label, value)

    def send_paced(self, label: str, value: Any) -> bool:
        """Our own message, kept within the peer's budget (see Pacer). False if the channel is not open."""
        return self.pacer.send(label, value)

    async def writable(self, label: str, below: int, timeout: float) -> bool:
        """Until the channel named label holds at most below bytes; False if it is not open, or at timeout."""
        channel = self.channels.get(label)
        return channel is not None and await channel_drained(channel, below, timeout)

    async def delivered(self, timeout: float) -> bool:
        """Until everything sent has been acknowledged by the remote SCTP stack (see is_idle); False at timeout.
        aiortc raises no event for SCTP acknowledgements, so this looks every 10 ms."""
        deadline = time.monotonic() + timeout
        while not self.is_idle():
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    def allow(self, kind: str, amount: float = 1.0) -> bool:
        """Within the peer's budget for this kind of request (and it is spent)? Else it is counted and dropped."""
        if self.budgets[kind].take(amount):
            return True
        self.over_budget[kind] = self.over_budget.get(kind, 0) + 1
        if self.over_budget[kind] == 1:
            log.info("%r: over its %s budget; such requests are dropped for a while", self, kind)
        return False

    def _on_message(self, label: str, data: Any) -> None:
        if self.state == "closed" or not self.allow("frame"):
            return  # (aiortc still hands over what had arrived before the close: nothing of a closed session is kept)
        if isinstance(data, bytes):
            try:
                data = data.decode("utf-8")
            except UnicodeDecodeError:
                return
        if len(data) > MAX_FRAME_CHARS:
            log.debug("%r: oversized frame on %s dropped", self, label)
            return
        try:
            value = parse_json(data)
        except ValueError:
            log.debug("%r: non-JSON frame on %s dropped", self, label)
            return
        if label == "connectedViaRTC":
            if not self.is_offerer:
                self._set_open()
        elif label == "answer":
            n = value.get("n") if isinstance(value, dict) else None
            future = self._answers.get(n) if isinstance(n, int) else None
            if future is not None and not future.done():
                future.set_result(value)
        elif label == "ping":
            if self.is_verified:
                self.send_reply("pong", "pong")
        elif label == "pong":
            self._on_pong()
        elif label == "streamoffer":
            self.send("endcall", None)  # a text client declines calls (§7)
        elif label in ("chat", "dm", "question"):
            self.emit("frame", self, label, value)

    def _on_pong(self) -> None:
        if self._ping_sent is not None:
            self.rtt_ms = (time.monotonic() - self._ping_sent) * 1000
            self._ping_sent = None
        self.last_pong = time.monotonic()
        waiting, self._pongs = self._pongs, []
        for future in waiting:
            if not future.done():
                future.set_result(True)

    # -- ask / answer and liveness ----------------------------------------------------------
    async def ask(self, topic: str, content: Any = None, timeout: float = ASK_TIMEOUT_S) -> Any:
        """RTChat's question RPC; the answer is matched by this peer and n, never by n alone."""
        n, self._next_n = self._next_n, self._next_n + 1
        future = asyncio.get_running_loop().create_future()
        self._answers[n] = future
        try:
            if not self.send("question", {"n": n, "question": {"topic": topic, "content": content}}):
                raise AskError(f"{self.name} is not connected")
            reply = await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            raise AskError(f"no answer from {self.name} within {timeout:g} s") from None
        finally:
            self._answers.pop(n, None)
        if isinstance(reply, dict) and isinstance(reply.get("error"), str):
            raise AskError(f"{self.name}: {clean(reply['error'], 200)}")
        return reply.get("answer") if isinstance(reply, dict) else None

    def reply(self, n: Any, question: Any, answer: Any = None, error: str | None = None) -> None:
        body = {"n": n, "answer": answer, "question": question}
        if error is not None:
            body["error"] = error
        self.send_reply("answer", body)

    async def _keep_alive(self) -> None:
        """Ping; a peer that stops answering is gone. Browsers answer only once they have verified us,
        so their silence counts from their first pong; an rtchat.py peer's from the session's start."""
        opened = time.monotonic()
        while self.is_open:
            self._ping_sent = time.monotonic()
            self.send("ping", "ping")
            await asyncio.sleep(PING_EVERY_S)
            heard = self.last_pong or (opened if self.dialect.silence_from_open else None)
            if heard is not None and time.monotonic() - heard > PEER_SILENT_S:
                self.close("stopped answering pings")

    async def probe(self, timeout: float = PROBE_TIMEOUT_S) -> bool:
        """Is this session alive (a pong within timeout)? Used before acting on an unauthenticated hint that it
        is not."""
        if not self.is_open:
            return False
        pong = asyncio.get_running_loop().create_future()
        self._pongs.append(pong)
        self._ping_sent = time.monotonic()
        self.send("ping", "ping")
        try:
            return await asyncio.wait_for(pong, timeout)
        except asyncio.TimeoutError:
            return False
        finally:
            with contextlib.suppress(ValueError):
                self._pongs.remove(pong)

    def is_idle(self) -> bool:
        """Everything sent has left our buffers and been acknowledged by the remote SCTP stack."""
        if not self.is_open or self.pc is None:
            return True
        return not self.pacer.backlog and sctp_idle(self.pc, self.channels.values())

    def close(self, reason: str = "closed") -> None:
        """End the session now: its tasks are cancelled and, with the connection, awaited in the background (see
        wait_closed)."""
        if self.state == "closed":
            return
        self.state = "closed"
        self._tasks.cancel()
        for future in self._answers.values():
            if not future.done():
                future.set_exception(AskError(f"{self.name} left"))
        for future in self._pongs:
            if not future.done():
                future.set_result(False)
        if self.pc is not None or self._tasks.busy:  # (a name only announced has neither: a flood of them costs
            self._shutdown = _spawn(self._finish(), f"close-{self.name}")  # no task each)
        self.emit("closed", self, reason)

    async def _finish(self) -> None:
        await self._tasks.close()
        if self.pc is not None:
            await self.pc.close()

    @property
    def closing(self) -> bool:
        """Closed, with tasks or a connection still being wound down (see wait_closed)."""
        return self._shutdown is not None and not self._shutdown.done()

    async def wait_closed(self) -> None:
        """Until a closed session's tasks have ended and its connection is closed."""
        if self._shutdown is not None:
            await asyncio.shield(self._shutdown)

# =============================================================================
# Dialects: what each kind of peer speaks, one strategy object each: the RTChat
# page (11 channels, identify/challenge, §6.4) and rtchat.py 0.2 and later (7
# channels, an identity frame bound to the DTLS session, signed messages, acks,
# history, files). How we announce to it and sign our offers and answers to it,
# how it proves its key on a connection, what it can do. Uses Identity, Peer.
# =============================================================================

RTCHAT_PY_MIN = (0, 2)    # rtchat.py 0.1 (a version that lived for a day) is not spoken to


class VerifyFailed(Exception):
    """A peer did not prove its key on this connection. reason: 'challenge-failed' (identify/challenge failed),
    'no-identity' (no identity frame in time), 'bad-identity' (a frame that proves no key), 'mitm' (its key signed
    another connection than this one: someone is in the middle; fingerprint is that key's), 'key-refused' (proven,
    but our trust policy refuses it, which the policy has reported)."""

    def __init__(self, reason: str, fingerprint: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.fingerprint = fingerprint


@dataclasses.dataclass(frozen=True)
class Proof:
    """A key proven on a connection: bound to that connection's DTLS session or not; rtchat.py's credentials."""
    key: str
    channel_bound: bool = False
    author: dict | None = None   # identity key, message key and its certificate


@dataclasses.dataclass
class Handshake:
    """What a dialect needs to check a peer on a fresh connection: plain values and two callbacks' worth."""
    me: str
    topic: str
    identity: Identity
    pins: dict[str, dict]               # keys pinned for its bare name ({} while /trust NAME waits for its next key)
    admits: Callable[[str], bool]       # does the trust policy take this key for it (a refusal is reported there)
    frame: asyncio.Future               # its identity frame (rtchat.py), resolved when it comes


class BrowserDialect(Dialect):
    """The RTChat page: RTChat's 11 channels, plain text on chat and dm, our key checked with identify/challenge
    and theirs the same way (fail closed, nothing carried over). It judges us by the key in our announcements and
    offers, so those carry it, RSA-signed; it cannot sign, so nothing it says is bound to its key."""
    name = "browser"
    compact = False             # our offers and answers to it: RSA-signed, our key in userInfo, on the room topic;
    #                             its own are unsigned
    keys_in_announcements = True  # it announces its key, and judges us by the key in ours (§6.5)
    yields_in_glare = True      # when both offer, it gives up its own offer and answers ours (§4.4)
    fallback_offer_s = FALLBACK_OFFER_S
    capabilities = frozenset({"dm", "ask"})

    @staticmethod
    def is_handshake(label: str, value: Any) -> bool:
        return False

    async def verify(self, peer: Peer, handshake: Handshake) -> Proof:
        """challenge if a key is pinned for its name, else identify (§6.4), with the holes closed: a false result
        fails, the key it answers with must be the one it announced, and the policy must take it."""
        challenge = secrets.token_bytes(32)
        key = None
        try:
            if handshake.pins:
                answer = await peer.ask("challenge", challenge.decode("latin-1"), VERIFY_TIMEOUT_S)
                signature = answer.encode("latin-1") if isinstance(answer, str) else b""
                key = next((p["key"] for p in handshake.pins.values()
                            if verify_signature(p["key"], signature, challenge)), None)
            else:
                answer = await peer.ask("identify", challenge.decode("latin-1"), VERIFY_TIMEOUT_S)
                if isinstance(answer, dict) and isinstance(answer.get("signature"), str):
                    offered = answer.get("publicKeyString")
                    signature = answer["signature"].encode("latin-1")
                    if isinstance(offered, str) and verify_signature(offered, signature, challenge) \
                            and peer.key_string in (None, offered) and handshake.admits(offered):
                        key = offered
        except (AskError, UnicodeEncodeError) as exc:
            log.debug("%r: verification failed: %s", peer, exc)
        if key is None:
            raise VerifyFailed("challenge-failed")
        return Proof(key)


class RtchatPyDialect(Dialect):
    """rtchat.py 0.2 and later: RTChat's text channels only; offers and answers signed with the Ed25519 message
    key, zlib'd on the peer's own inbox; once the channel is up each side sends an identity frame (its identity
    key's signature over the room, both names and both DTLS certificates as it sees them, and the certificate of
    the message key that signed its signaling). A man in the middle runs two DTLS sessions, so its frames do not
    fit. Messages are signed, acknowledged, passed on as history; files go on channels of their own."""
    name = "rtchat.py"
    labels = TEXT_CHANNELS
    compact = True              # signs its offers and answers with its message key (unsigned ones are forged), and
    #                             takes ours signed so, zlib'd on its inbox
    keys_in_announcements = False  # keys are proven in the channel, not told on the broker
    yields_in_glare = False     # it agrees who offers (should_offer), as we do
    fallback_offer_s = FALLBACK_OFFER_PY_S
    capabilities = frozenset({"dm", "ask", "files", "acks", "signatures", "history"})
    silence_from_open = True     # it verifies us within a round trip, then answers our pings

    @staticmethod
    def is_handshake(label: str, value: Any) -> bool:
        return label == "chat" and isinstance(value, dict) and value.get("t") == "id"

    @staticmethod
    def identity_frame(peer: Peer, handshake: Handshake) -> dict:
        ours, theirs = peer.dtls_fingerprints()
        identity = handshake.identity
        signature = identity.sign(signed_bytes("channel-id", handshake.topic, handshake.me, peer.name, ours, theirs))
        return {"t": "id", "key": identity.public_key_string, "mkey": identity.message_public,
                "mcert": identity.message_cert, "sig": base64.b64encode(signature).decode()}

    async def verify(self, peer: Peer, handshake: Handshake) -> Proof:
        peer.send("chat", self.identity_frame(peer, handshake))
        return await self.proven(peer, handshake)

    async def proven(self, peer: Peer, handshake: Handshake) -> Proof:
        """The key the peer's identity frame proves, once it came (see check), if the trust policy takes it."""
        try:
            frame = await asyncio.wait_for(asyncio.shield(handshake.frame), VERIFY_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise VerifyFailed("no-identity") from None
        key = self.check(peer, frame, handshake)
        if not handshake.admits(key):
            raise VerifyFailed("key-refused", fingerprint(key))
        return Proof(key, channel_bound=True, author={"key": key, "mkey": frame["mkey"], "mcert": frame["mcert"]})

    @staticmethod
    def check(peer: Peer, frame: dict, handshake: Handshake) -> str:
        """The identity key an identity frame proves: it certified the message key that signed the peer's offer
        or answer (or signed them itself), and it signed this channel as the peer sees it. VerifyFailed 'mitm' if
        such credentials signed another channel, else 'bad-identity'."""
        key, sig, mkey = frame.get("key"), frame.get("sig"), frame.get("mkey")
        if peer.signal_mkey is not None:
            signaled = mkey == peer.signal_mkey
        else:  # on PeerJS nothing in signaling is signed: the channel binding below is the whole proof
            signaled = key == peer.signed_key or (peer.signed_key is None and peer.unsigned_signaling)
        if not (isinstance(key, str) and len(key) <= MAX_KEY_CHARS and isinstance(sig, str) and signaled
                and peer.signed_key in (None, key) and verify_message_key(key, mkey, frame.get("mcert"))):
            raise VerifyFailed("bad-identity")
        ours, theirs = peer.dtls_fingerprints()
        binding = signed_bytes("channel-id", handshake.topic, peer.name, handshake.me, theirs, ours)
        try:
            genuine = verify_signature(key, base64.b64decode(sig, validate=True), binding)
        except ValueError:
            genuine = False
        if not genuine:
            raise VerifyFailed("mitm", fingerprint(key))
        return key


BROWSER = BrowserDialect()
RTCHAT_PY = RtchatPyDialect()


def dialect_for(tag: str | None) -> Dialect | None:
    """The dialect a client tag (userInfo.client) says its peer speaks; None for one we do not speak to."""
    if not (tag or "").startswith("rtchat-py/"):
        return BROWSER
    match = re.fullmatch(r"rtchat-py/(\d+)\.(\d+)(?:\..*)?", tag)
    return RTCHAT_PY if match and (int(match[1]), int(match[2])) >= RTCHAT_PY_MIN else None


def answer_identity(peer: Peer, value: Any, identity: Identity) -> bool:
    """Answer identify/challenge at once, from anyone: browsers ask before they talk to us (§6.4). True if value
    was such a question (answered, or over the peer's budget)."""
    question = value.get("question") if isinstance(value, dict) else None
    topic = question.get("topic") if isinstance(question, dict) else None
    if topic not in ("identify", "challenge"):
        return False
    if not peer.allow("identify"):  # each answer is an RSA signature
        return True
    content = question.get("content")
    try:
        # Exactly 32 bytes, as browsers send: we never sign anything that could be a signaling message.
        challenge = content.encode("latin-1") if isinstance(content, str) and len(content) == 32 else None
    except UnicodeEncodeError:
        challenge = None
    if challenge is not None:
        signature = identity.sign(challenge).decode("latin-1")
        answer = signature if topic == "challenge" else {
            "publicKeyString": identity.public_key_string, "signature": signature}
        peer.reply(value.get("n"), question, answer)
    return True


# =============================================================================
# Gossip: large rooms without a full mesh. HyParView membership (at most D
# connections per member, repaired from a passive view) and PlumTree broadcast
# (a spanning tree; ids announced on the other links), without I/O: events in,
# actions out, time and randomness passed in. Knows no Peer and no Room.
# =============================================================================

MAX_NEIGHBORS = 6            # D: connections a member keeps in a large room (HyParView active view; paper: 5)
MAX_PASSIVE = 30             # members known but not connected, to repair from (HyParView paper, p9)
JOIN_WALK_HOPS = 6           # ARWL: a join's random walk ends in a neighbour request after this many hops (p9)
PASSIVE_WALK_HOPS = 3        # PRWL: where the walk has this many hops left, the newcomer is kept as passive (p9)
SHUFFLE_WALK_HOPS = 6        # a shuffle walks this far before it is answered (p9)
SHUFFLE_ACTIVE, SHUFFLE_PASSIVE = 3, 4   # members from each view a shuffle carries, besides its origin (p9)
SHUFFLE_EVERY_S = 30.0       # ±20%, drawn from the injected random source so members do not shuffle in step
SHUFFLE_WAIT_S = 10.0        # a shuffle's answer is taken this long, and only with its nonce
MAX_SHUFFLES = 4             # shuffles waiting for an answer at once
NEIGHBOR_WAIT_S = 3.0        # a join or neighbour request unanswered this long is sent again, ... (iroh-gossip)
NEIGHBOR_TRIES = 2           # ... and after this many tries the member is taken as gone
REPAIR_EVERY_S = 5.0         # how often a member short of neighbours asks again
REFUSED_KEEP_S = 60.0        # a member that refused us, or dropped us, is not asked again within this
DISCONNECT_TIPS = 4          # members named in a disconnect, so the one dropped has someone to ask
GRAFT_WAIT_S = 0.08          # an announced message that has not come by then is asked for (PlumTree timeout 1; as
#                              iroh-gossip: a tree cut by concurrent prunes is mended at this cost per hop)
GRAFT_RETRY_S = 0.04         # an unanswered GRAFT goes to the next announcer after this (timeout 2, as iroh-gossip)
IHAVE_DELAY_S = 0.005        # announcements are gathered this long into one IHAVE per neighbour (as iroh-gossip)
IHAVE_MAX_IDS = 64           # ids in one IHAVE, and announcements queued per neighbour
OPTIMIZE_HOPS = 7            # a lazy link this many hops shorter than the tree's replaces it (PlumTree paper, p12)
MAX_HOPS = 255               # a message further from its author than this is malformed
SEEN_KEEP_S = 600.0          # ids of messages had are remembered this long, ...
MAX_SEEN = 20_000            # ... and at most this many (about 3 MB); Room's ledger dedupes beyond that
CACHE_KEEP_S = 60.0          # messages kept to answer GRAFTs and to catch up new neighbours, ...
MAX_CACHED = 500             # ... at most this many (8 MB if every one were a line of MAX_TEXT_CHARS)
MAX_MISSING = 1000           # ids announced to us but not yet had, tracked at once
MAX_MESSAGE_ID_CHARS = 64    # as Room's message ids

GOSSIP_KINDS = ("join", "fwd", "nbr", "nbr-re", "dis", "shuffle", "shuffle-re", "gossip", "ihave", "graft", "prune")
"""The `t` of every gossip frame (PROTOCOL.md, Membership and gossip)."""
LINK_KINDS = frozenset(("fwd", "shuffle", "gossip", "ihave", "graft", "prune"))
"""Kinds taken only from a neighbour whose connection is up; the others may come through signaling."""


@dataclasses.dataclass(slots=True)
class Timer:
    """A timer the core asked for; it comes back as TimerExpired. seq tells a timer from a later one alike."""
    kind: str
    key: str = ""
    seq: int = 0


@dataclasses.dataclass(slots=True)
class RecvMessage:
    """A gossip frame from a member, over our connection to it or through signaling."""
    peer: str
    msg: Any


@dataclasses.dataclass(slots=True)
class Broadcast:
    """Our own message for the room. The id is the caller's; payload is any JSON value, passed on unread. whole:
    pushed whole to every neighbour, not announced to some (our last words: nobody can ask us for it later)."""
    id: str
    payload: Any
    whole: bool = False


@dataclasses.dataclass(slots=True)
class TimerExpired:
    timer: Timer


@dataclasses.dataclass(slots=True)
class NeighborUp:
    """The connection to a member is open (one we asked for with Connect)."""
    peer: str


@dataclasses.dataclass(slots=True)
class NeighborDown:
    """The connection to a member failed or closed."""
    peer: str


@dataclasses.dataclass(slots=True)
class Join:
    """Enter the room through a member seen on the broker; more contacts may follow."""
    contact: str


@dataclasses.dataclass(slots=True)
class Merge:
    """A member of the room that we do not hear by gossip (it is in another part of a split overlay, seen on the
    broker): ask it to be a neighbour, at high priority, so the parts become one."""
    peer: str


@dataclasses.dataclass(slots=True)
class Leave:
    """We are leaving: neighbours are told, so they repair at once."""


@dataclasses.dataclass(slots=True)
class SendMessage:
    """Send a gossip frame: over the connection to the member if one is open, else through signaling."""
    peer: str
    msg: dict


@dataclasses.dataclass(slots=True)
class Connect:
    """The member is now a neighbour: open a connection to it (it asks for the same) and report NeighborUp."""
    peer: str


@dataclasses.dataclass(slots=True)
class Disconnect:
    """The member is no longer a neighbour: close the connection, or stop setting it up."""
    peer: str


@dataclasses.dataclass(slots=True)
class ScheduleTimer:
    delay: float
    timer: Timer


@dataclasses.dataclass(slots=True)
class Deliver:
    """A message of the room, new to us: via is the neighbour it came from, hops its distance from the author."""
    id: str
    payload: Any
    via: str
    hops: int


@dataclasses.dataclass(slots=True)
class FindContact:
    """We have fewer than half of D neighbours and no one to ask: Join a member seen on the broker, if any.
    This is also what joins a group of members cut off from the rest back to it."""


@dataclasses.dataclass(slots=True)
class _Linked:
    """Between the two parts: a neighbour's connection came up or went away."""
    peer: str
    up: bool


def _peer_field(value: Any) -> str | None:
    """A member's wire name from a frame, or None: a string short and clean enough to be a name."""
    if isinstance(value, str) and 0 < len(value) <= MAX_NAME_CHARS + 16 and clean(value) == value:
        return value
    return None


def _id_field(value: Any) -> str | None:
    return value if isinstance(value, str) and 0 < len(value) <= MAX_MESSAGE_ID_CHARS else None


def _count_field(value: Any, top: int) -> int | None:
    """An int from 0 to top (JSON true is not 1 here)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= top else None


def _peers_field(value: Any, most: int) -> list[str] | None:
    """A list of at most `most` wire names; one bad entry spoils the list."""
    if not isinstance(value, list) or len(value) > most:
        return None
    peers = [_peer_field(v) for v in value]
    return None if None in peers else peers


class Membership:
    """HyParView: the members we hold connections to (the active view, at most max_active) and those we know of
    to repair from (the passive view). A newcomer's join walks the overlay and ends in neighbour requests; a lost
    neighbour is replaced from the passive view; shuffles keep passive views fresh.

    Members that agree to be neighbours both emit Connect, so a connection exists only while both want it."""

    def __init__(self, me: str, rng: random.Random, max_active: int = MAX_NEIGHBORS,
                 neighbor_wait: float = NEIGHBOR_WAIT_S) -> None:
        self.me, self.rng, self.max_active, self.neighbor_wait = me, rng, max_active, neighbor_wait
        self.active: dict[str, bool] = {}        # neighbour -> is its connection up
        self.passive: dict[str, None] = {}       # an ordered set, so runs with one seed repeat exactly
        self.pending: dict[str, tuple[int, dict, int]] = {}  # joins and neighbour requests out -> timer seq, msg, try
        self._connecting: dict[str, int] = {}    # neighbours whose connection is not up -> the seq of its timer
        self._refused: dict[str, float] = {}     # member -> until when it is not asked again
        self._shuffles: dict[int, float] = {}    # our shuffles' nonces -> until when their answer is taken
        self._seq = itertools.count(1)

    def up_neighbors(self) -> list[str]:
        return [peer for peer, up in self.active.items() if up]

    # -- entering, and neighbour requests ------------------------------------------------------------
    def join(self, contact: str, now: float, out: list) -> None:
        """Enter through the contact; once in (or on the way in), a contact is one more member to repair from."""
        if contact == self.me or contact in self.active or contact in self.pending:
            return
        self._add_passive(contact)
        if self.active or self.pending:
            self._refill(now, out)
        else:
            self._ask(contact, {"t": "join"}, out)

    def merge(self, peer: str, out: list) -> None:
        """Bridge to a member of another part of a split overlay: a high-priority request (never refused; each side
        makes room by dropping a neighbour, which repairs from its passive view)."""
        if peer != self.me and peer not in self.active and peer not in self.pending:
            self._add_passive(peer)
            self._ask(peer, {"t": "nbr", "hi": True}, out)

    def on_join(self, peer: str, out: list) -> None:
        """A newcomer: ours even if someone must go, and introduced to the room by walks from each neighbour."""
        fresh = peer not in self.active
        self._accept(peer, out)
        if fresh:
            for neighbor in self.up_neighbors():
                if neighbor != peer:
                    out.append(SendMessage(neighbor, {"t": "fwd", "n": peer, "ttl": JOIN_WALK_HOPS}))

    def on_forward_join(self, sender: str, peer: str, ttl: int, out: list) -> None:
        if peer == self.me or peer in self.active or peer in self.pending:
            return
        onward = [n for n in self.up_neighbors() if n not in (sender, peer)]
        if ttl == 0 or not onward:
            if len(self.pending) < self.max_active:
                self._ask(peer, {"t": "nbr", "hi": True}, out)
            else:
                self._add_passive(peer)
            return
        if ttl == PASSIVE_WALK_HOPS:
            self._add_passive(peer)
        out.append(SendMessage(self.rng.choice(onward), {"t": "fwd", "n": peer, "ttl": ttl - 1}))

    def on_neighbor_request(self, peer: str, high: bool, out: list) -> None:
        """High priority (the asker has no neighbour, or ends a join's walk) is never refused."""
        if high or peer in self.active or len(self.active) < self.max_active:
            self._accept(peer, out)
        else:
            out.append(SendMessage(peer, {"t": "nbr-re", "ok": False}))
            self._add_passive(peer)

    def on_neighbor_reply(self, peer: str, ok: bool, now: float, out: list) -> None:
        if self.pending.pop(peer, None) is None:
            return  # not asked, or given up on: its connection will not be wanted here, and so will not open
        if not ok:
            self._refuse(peer, now)
            if 2 * len(self.active) < self.max_active:
                self._refill(now, out)  # short of neighbours: the repair goes on with someone else
            # (else it ends here: in a room every request is a session set up, and most members' views are full)
        elif peer not in self.active:
            self._add_active(peer, out)

    def _ask(self, peer: str, msg: dict, out: list, attempt: int = 1) -> None:
        seq = next(self._seq)
        self.pending[peer] = (seq, msg, attempt)
        out.append(SendMessage(peer, msg))
        out.append(ScheduleTimer(self.neighbor_wait, Timer("nbr", peer, seq)))

    def _accept(self, peer: str, out: list) -> None:
        out.append(SendMessage(peer, {"t": "nbr-re", "ok": True}))
        if peer not in self.active:
            self._add_active(peer, out)

    def _add_active(self, peer: str, out: list) -> None:
        if len(self.active) >= self.max_active:
            self._drop_random(peer, out)
        self.passive.pop(peer, None)
        self.pending.pop(peer, None)
        self.active[peer] = False
        seq = self._connecting[peer] = next(self._seq)
        out.append(Connect(peer))
        out.append(ScheduleTimer(CONNECT_TIMEOUT_S, Timer("connect", peer, seq)))

    def _drop_random(self, keep: str, out: list) -> None:
        """Make room: a random neighbour goes to the passive view, told why and given members to ask instead."""
        victim = self.rng.choice([p for p in self.active if p != keep])
        out.append(SendMessage(victim, {"t": "dis", "alive": True, "ns": self._tips(victim, DISCONNECT_TIPS)}))
        self._remove(victim, out)
        self._add_passive(victim)

    def _tips(self, exclude: str, count: int) -> list[str]:
        """Up to count members we know, passive first, for a member that needs some."""
        tips = self._sample([p for p in self.passive if p != exclude], count)
        return tips + self._sample([p for p in self.active if p != exclude], count - len(tips))

    def _sample(self, population: list[str], count: int) -> list[str]:
        return self.rng.sample(population, min(count, len(population))) if count > 0 else []

    # -- connections ---------------------------------------------------------------------------------
    def link_up(self, peer: str, out: list) -> None:
        if peer not in self.active:
            out.append(Disconnect(peer))  # a connection we did not ask for
        elif not self.active[peer]:
            self.active[peer] = True
            self._connecting.pop(peer, None)
            out.append(_Linked(peer, True))

    def link_down(self, peer: str, now: float, out: list) -> None:
        """A neighbour's connection failed or closed: it is taken as gone, and replaced."""
        if peer in self.active:
            self._remove(peer, out)
            self.passive.pop(peer, None)
            self._refill(now, out)

    def on_disconnect(self, peer: str, alive: bool, tips: list[str], now: float, out: list) -> None:
        """A neighbour (or a member we asked) drops us; if it stays in the room, we keep it as passive."""
        was_asked = self.pending.pop(peer, None) is not None
        if not was_asked and peer not in self.active:
            return  # not ours: its tips are not taken either
        for tip in tips:
            self._add_passive(tip)
        if peer in self.active:
            self._remove(peer, out)
        if alive:
            self._add_passive(peer)
            self._refuse(peer, now)
        else:
            self.passive.pop(peer, None)
        self._refill(now, out)

    def _remove(self, peer: str, out: list) -> None:
        was_up = self.active.pop(peer)
        self._connecting.pop(peer, None)
        out.append(Disconnect(peer))
        if was_up:
            out.append(_Linked(peer, False))

    def leave(self, out: list) -> None:
        for peer in list(self.active):
            out.append(SendMessage(peer, {"t": "dis", "alive": False, "ns": []}))
            self._remove(peer, out)
        self.passive.clear()
        self.pending.clear()

    # -- repair --------------------------------------------------------------------------------------
    def _refill(self, now: float, out: list) -> None:
        """One more neighbour from the passive view, if there is room: high priority if we have none at all."""
        candidates = self._candidates(now)
        if candidates:
            self._ask(self.rng.choice(candidates), {"t": "nbr", "hi": not self.active}, out)

    def _candidates(self, now: float) -> list[str]:
        """Whom we would ask to be a neighbour now: none if the view is full (with the requests out)."""
        if len(self.active) + len(self.pending) >= self.max_active:
            return []
        return [p for p in self.passive if p not in self.pending and self._refused.get(p, 0.0) <= now]

    def _refuse(self, peer: str, now: float) -> None:
        self._refused.pop(peer, None)
        self._refused[peer] = now + REFUSED_KEEP_S
        if len(self._refused) > 2 * MAX_PASSIVE:
            del self._refused[next(iter(self._refused))]

    def _add_passive(self, peer: str) -> None:
        if peer == self.me or peer in self.active or peer in self.passive:
            return
        if len(self.passive) >= MAX_PASSIVE:
            del self.passive[self.rng.choice(list(self.passive))]
        self.passive[peer] = None

    def on_timer(self, timer: Timer, now: float, out: list) -> None:
        if timer.kind == "nbr" and self.pending.get(timer.key, (None,))[0] == timer.seq:
            _, msg, attempt = self.pending.pop(timer.key)
            if attempt < NEIGHBOR_TRIES:
                self._ask(timer.key, msg, out, attempt + 1)
            else:  # no answer: gone
                self.passive.pop(timer.key, None)
                self._refill(now, out)
        elif timer.kind == "connect" and self._connecting.get(timer.key) == timer.seq:
            self._remove(timer.key, out)  # agreed, but the connection never came up
            self.passive.pop(timer.key, None)
            self._refill(now, out)
        elif timer.kind == "repair":
            self._repair(now, out)
        elif timer.kind == "shuffle":
            self._shuffle(now, out)

    def _repair(self, now: float, out: list) -> None:
        """A member left with fewer than half of D neighbours (every try to replace the lost ones failed) asks
        again, or for contacts when there is no one left to ask. Above that, only losses cause requests."""
        for peer in [p for p, until in self._refused.items() if until <= now]:
            del self._refused[peer]
        if 2 * (len(self.active) + len(self.pending)) < self.max_active:
            self._refill(now, out)
            if not self.pending:
                out.append(FindContact())
        out.append(ScheduleTimer(REPAIR_EVERY_S, Timer("repair")))

    # -- shuffles ------------------------------------------------------------------------------------
    def _shuffle(self, now: float, out: list) -> None:
        """Trade a few members we know for a few a random walk's end knows, so passive views stay alive."""
        neighbors = self.up_neighbors()
        if neighbors:
            to = self.rng.choice(neighbors)
            nodes = [self.me] + self._sample([p for p in self.active if p != to], SHUFFLE_ACTIVE) \
                + self._sample(list(self.passive), SHUFFLE_PASSIVE)
            nonce = self.rng.getrandbits(31)
            self._shuffles[nonce] = now + SHUFFLE_WAIT_S
            if len(self._shuffles) > MAX_SHUFFLES:
                del self._shuffles[next(iter(self._shuffles))]
            out.append(SendMessage(to, {"t": "shuffle", "o": self.me, "ns": nodes, "ttl": SHUFFLE_WALK_HOPS,
                                        "k": nonce}))
        out.append(ScheduleTimer(SHUFFLE_EVERY_S * self.rng.uniform(0.8, 1.2), Timer("shuffle")))

    def on_shuffle(self, sender: str, origin: str, nodes: list[str], ttl: int, nonce: int, out: list) -> None:
        if origin == self.me:
            return
        onward = [n for n in self.up_neighbors() if n not in (sender, origin)]
        if ttl > 0 and onward:
            out.append(SendMessage(self.rng.choice(onward), {"t": "shuffle", "o": origin, "ns": nodes,
                                                             "ttl": ttl - 1, "k": nonce}))
            return
        out.append(SendMessage(origin, {"t": "shuffle-re", "ns": self._tips(origin, len(nodes)), "k": nonce}))
        for node in nodes:
            self._add_passive(node)

    def on_shuffle_reply(self, nodes: list[str], nonce: int, now: float) -> None:
        until = self._shuffles.pop(nonce, None)
        if until is not None and until >= now:
            for node in nodes:
                self._add_passive(node)


class BroadcastTree:
    """PlumTree: each message once to every member, pushed whole along a spanning tree of the neighbours (the
    eager links) and announced by id on the others (lazy links). A member the tree missed asks an announcer for
    it (GRAFT), which puts that link in the tree; a duplicate takes its link out (PRUNE).

    lazy=False floods instead (every message whole on every link): the baseline the benchmark compares with.
    check(id, payload), if given, says whether a payload is genuinely the message with that id (an author's
    signature, or a content hash); a message that fails it is dropped and its id stays free."""

    def __init__(self, lazy: bool = True, check: Callable[[str, Any], bool] | None = None) -> None:
        self.is_lazy, self.check = lazy, check
        self.eager: dict[str, None] = {}
        self.lazy: dict[str, None] = {}
        self._queued: dict[str, list[list]] = {}         # neighbour -> [id, hops] for its next IHAVE
        self._dispatch_due = False
        self._seen: dict[str, float] = {}                # id -> until when it is remembered
        self._cache: dict[str, tuple[Any, int, float]] = {}  # id -> payload, hops to us, until when kept
        self._missing: dict[str, list[tuple[str, int]]] = {}  # announced, not had: id -> [(announcer, hops)]
        self._grafting: dict[str, None] = {}             # ids with a GRAFT timer running

    def has_seen(self, msg_id: str) -> bool:
        return msg_id in self._seen

    def broadcast(self, msg_id: str, payload: Any, now: float, out: list, whole: bool = False) -> None:
        if msg_id in self._seen:
            return
        self._remember(msg_id, payload, 0, now)
        if whole:
            out.extend(SendMessage(peer, {"t": "gossip", "id": msg_id, "r": 1, "d": payload})
                       for peer in [*self.eager, *self.lazy])
        else:
            self._push(msg_id, payload, 0, None, out)

    def neighbor_up(self, peer: str, now: float, out: list) -> None:
        """A new neighbour starts in the tree, and hears what we had lately (it may have missed it while away)."""
        self.eager[peer] = None
        self._expire(now)
        recent = [[msg_id, hops + 1] for msg_id, (_, hops, _) in self._cache.items()][-IHAVE_MAX_IDS:]
        if recent:
            out.append(SendMessage(peer, {"t": "ihave", "h": recent}))

    def neighbor_down(self, peer: str) -> None:
        self.eager.pop(peer, None)
        self.lazy.pop(peer, None)
        self._queued.pop(peer, None)
        for msg_id in list(self._missing):
            self._missing[msg_id] = [(p, h) for p, h in self._missing[msg_id] if p != peer]

    def on_gossip(self, peer: str, msg_id: str, hops: int, payload: Any, now: float, out: list) -> None:
        if msg_id in self._seen:
            if self.is_lazy:  # we had it: this link is not needed in the tree
                self._make_lazy(peer)
                out.append(SendMessage(peer, {"t": "prune"}))
            return
        if self.check is not None and not self.check(msg_id, payload):
            return
        self._remember(msg_id, payload, hops, now)
        self._grafting.pop(msg_id, None)
        announcers = self._missing.pop(msg_id, None)
        self.eager[peer] = None
        self.lazy.pop(peer, None)
        self._push(msg_id, payload, hops, peer, out)
        if announcers and self.is_lazy:
            self._shorten(peer, hops, *min(announcers, key=lambda a: a[1]), out)
        out.append(Deliver(msg_id, payload, peer, hops))

    def _shorten(self, parent: str, hops: int, peer: str, announced: int, out: list) -> None:
        """The tree brought a message the long way round: the much shorter announced link replaces its last hop."""
        if hops - announced >= OPTIMIZE_HOPS and peer != parent:
            if peer not in self.eager:
                self.eager[peer] = None
                self.lazy.pop(peer, None)
                out.append(SendMessage(peer, {"t": "graft"}))
            self._make_lazy(parent)
            out.append(SendMessage(parent, {"t": "prune"}))

    def on_ihave(self, peer: str, entries: list[tuple[str, int]], out: list) -> None:
        for msg_id, hops in entries:
            if msg_id in self._seen:
                continue
            announcers = self._missing.get(msg_id)
            if announcers is None:
                if len(self._missing) >= MAX_MISSING:
                    continue
                announcers = self._missing[msg_id] = []
            if all(p != peer for p, _ in announcers):
                announcers.append((peer, hops))
            if msg_id not in self._grafting:
                self._grafting[msg_id] = None
                out.append(ScheduleTimer(GRAFT_WAIT_S, Timer("graft", msg_id)))

    def on_graft(self, peer: str, msg_id: str | None, out: list) -> None:
        self.eager[peer] = None
        self.lazy.pop(peer, None)
        if msg_id in self._cache:
            payload, hops, _ = self._cache[msg_id]
            out.append(SendMessage(peer, {"t": "gossip", "id": msg_id, "r": hops + 1, "d": payload}))

    def on_prune(self, peer: str) -> None:
        if self.is_lazy:
            self._make_lazy(peer)

    def on_timer(self, timer: Timer, now: float, out: list) -> None:
        if timer.kind == "ihave":
            self._dispatch_due = False
            for peer in list(self._queued):
                self._flush(peer, out)
        elif timer.kind == "graft":
            self._graft(timer.key, out)

    def _graft(self, msg_id: str, out: list) -> None:
        """Still missing: ask the first announcer left, and the next one if that does not answer either."""
        self._grafting.pop(msg_id, None)
        announcers = self._missing.get(msg_id)
        if msg_id in self._seen or not announcers:
            self._missing.pop(msg_id, None)
            return
        peer, _ = announcers.pop(0)
        self.eager[peer] = None
        self.lazy.pop(peer, None)
        out.append(SendMessage(peer, {"t": "graft", "id": msg_id}))
        self._grafting[msg_id] = None
        out.append(ScheduleTimer(GRAFT_RETRY_S, Timer("graft", msg_id)))

    def _push(self, msg_id: str, payload: Any, hops: int, came_from: str | None, out: list) -> None:
        frame = {"t": "gossip", "id": msg_id, "r": hops + 1, "d": payload}
        for peer in self.eager:
            if peer != came_from:
                out.append(SendMessage(peer, frame))
        for peer in self.lazy:
            if peer != came_from:
                queue = self._queued.setdefault(peer, [])
                queue.append([msg_id, hops + 1])
                if len(queue) >= IHAVE_MAX_IDS:
                    self._flush(peer, out)
                elif not self._dispatch_due:
                    self._dispatch_due = True
                    out.append(ScheduleTimer(IHAVE_DELAY_S, Timer("ihave")))

    def _flush(self, peer: str, out: list) -> None:
        entries = self._queued.pop(peer, None)
        if entries:
            out.append(SendMessage(peer, {"t": "ihave", "h": entries}))

    def _make_lazy(self, peer: str) -> None:
        if peer in self.eager or peer in self.lazy:
            self.eager.pop(peer, None)
            self.lazy[peer] = None

    def _remember(self, msg_id: str, payload: Any, hops: int, now: float) -> None:
        self._expire(now)
        self._seen[msg_id] = now + SEEN_KEEP_S
        if len(self._seen) > MAX_SEEN:
            del self._seen[next(iter(self._seen))]
        self._cache[msg_id] = (payload, hops, now + CACHE_KEEP_S)
        if len(self._cache) > MAX_CACHED:
            del self._cache[next(iter(self._cache))]

    def _expire(self, now: float) -> None:
        """Oldest first: both tables are in the order things came."""
        while self._seen and next(iter(self._seen.values())) < now:
            del self._seen[next(iter(self._seen))]
        while self._cache and next(iter(self._cache.values()))[2] < now:
            del self._cache[next(iter(self._cache))]


class Gossip:
    """One member's gossip in one large room: Membership and BroadcastTree behind one handle(event, now).

    Frames from members are checked here, field by field, before either part sees them; a malformed frame, or a
    link kind from a member that is not an up neighbour, is dropped. Time is `now` in seconds (monotonic), passed
    in; randomness comes from rng, so a seeded simulation repeats exactly."""

    def __init__(self, me: str, rng: random.Random, *, max_neighbors: int = MAX_NEIGHBORS, flood: bool = False,
                 check: Callable[[str, Any], bool] | None = None, neighbor_wait: float = NEIGHBOR_WAIT_S) -> None:
        self.me = me
        self.membership = Membership(me, rng, max_neighbors, neighbor_wait)
        self.tree = BroadcastTree(lazy=not flood, check=check)
        self.has_left = False
        self._started = False

    def handle(self, event: Any, now: float) -> list:
        out: list = []
        if self.has_left:
            return out
        if not self._started:
            self._started = True
            out += [ScheduleTimer(SHUFFLE_EVERY_S * self.membership.rng.uniform(0.8, 1.2), Timer("shuffle")),
                    ScheduleTimer(REPAIR_EVERY_S, Timer("repair"))]
        kind = type(event)
        if kind is RecvMessage:
            self._receive(event.peer, event.msg, now, out)
        elif kind is Broadcast:
            if _id_field(event.id) is None:
                raise ValueError(f"a message id is a string of 1 to {MAX_MESSAGE_ID_CHARS} characters")
            self.tree.broadcast(event.id, event.payload, now, out, event.whole)
        elif kind is TimerExpired:
            part = self.tree if event.timer.kind in ("graft", "ihave") else self.membership
            part.on_timer(event.timer, now, out)
        elif kind is NeighborUp:
            self.membership.link_up(event.peer, out)
        elif kind is NeighborDown:
            self.membership.link_down(event.peer, now, out)
        elif kind is Join:
            if _peer_field(event.contact) is not None:
                self.membership.join(event.contact, now, out)
        elif kind is Merge:
            if _peer_field(event.peer) is not None:
                self.membership.merge(event.peer, out)
        elif kind is Leave:
            self.membership.leave(out)
            self.has_left = True
        return self._relay_links(out, now)

    def _relay_links(self, out: list, now: float) -> list:
        """Tell the tree about neighbours that came and went; what it says goes out after the membership's."""
        if not any(type(o) is _Linked for o in out):
            return out
        result = []
        for o in out:
            if type(o) is not _Linked:
                result.append(o)
            elif o.up:
                self.tree.neighbor_up(o.peer, now, result)
            else:
                self.tree.neighbor_down(o.peer)
        return result

    def _receive(self, peer: Any, msg: Any, now: float, out: list) -> None:
        if _peer_field(peer) is None or peer == self.me or not isinstance(msg, dict):
            return
        kind = msg.get("t")
        handler = self._KINDS.get(kind) if isinstance(kind, str) else None
        if handler is not None and (kind not in LINK_KINDS or self.membership.active.get(peer)):
            handler(self, peer, msg, now, out)

    def _on_join(self, peer: str, msg: dict, now: float, out: list) -> None:
        self.membership.on_join(peer, out)

    def _on_forward_join(self, peer: str, msg: dict, now: float, out: list) -> None:
        newcomer, ttl = _peer_field(msg.get("n")), _count_field(msg.get("ttl"), JOIN_WALK_HOPS)
        if newcomer is not None and ttl is not None:
            self.membership.on_forward_join(peer, newcomer, ttl, out)

    def _on_neighbor(self, peer: str, msg: dict, now: float, out: list) -> None:
        if isinstance(msg.get("hi"), bool):
            self.membership.on_neighbor_request(peer, msg["hi"], out)

    def _on_neighbor_reply(self, peer: str, msg: dict, now: float, out: list) -> None:
        if isinstance(msg.get("ok"), bool):
            self.membership.on_neighbor_reply(peer, msg["ok"], now, out)

    def _on_disconnect(self, peer: str, msg: dict, now: float, out: list) -> None:
        tips = _peers_field(msg.get("ns"), DISCONNECT_TIPS)
        if isinstance(msg.get("alive"), bool) and tips is not None:
            self.membership.on_disconnect(peer, msg["alive"], tips, now, out)

    def _on_shuffle(self, peer: str, msg: dict, now: float, out: list) -> None:
        origin, ttl = _peer_field(msg.get("o")), _count_field(msg.get("ttl"), SHUFFLE_WALK_HOPS)
        nodes = _peers_field(msg.get("ns"), 1 + SHUFFLE_ACTIVE + SHUFFLE_PASSIVE)
        nonce = _count_field(msg.get("k"), 2 ** 31)
        if None not in (origin, ttl, nodes, nonce):
            self.membership.on_shuffle(peer, origin, nodes, ttl, nonce, out)

    def _on_shuffle_reply(self, peer: str, msg: dict, now: float, out: list) -> None:
        nodes = _peers_field(msg.get("ns"), 1 + SHUFFLE_ACTIVE + SHUFFLE_PASSIVE)
        nonce = _count_field(msg.get("k"), 2 ** 31)
        if nodes is not None and nonce is not None:
            self.membership.on_shuffle_reply(nodes, nonce, now)

    def _on_gossip(self, peer: str, msg: dict, now: float, out: list) -> None:
        msg_id, hops = _id_field(msg.get("id")), _count_field(msg.get("r"), MAX_HOPS)
        if msg_id is not None and hops and "d" in msg:
            self.tree.on_gossip(peer, msg_id, hops, msg["d"], now, out)

    def _on_ihave(self, peer: str, msg: dict, now: float, out: list) -> None:
        entries = msg.get("h")
        if not isinstance(entries, list) or len(entries) > IHAVE_MAX_IDS:
            return
        parsed = [(_id_field(e[0]), _count_field(e[1], MAX_HOPS)) if isinstance(e, list) and len(e) == 2
                  else (None, None) for e in entries]
        if all(msg_id is not None and hops for msg_id, hops in parsed):
            self.tree.on_ihave(peer, parsed, out)

    def _on_graft(self, peer: str, msg: dict, now: float, out: list) -> None:
        msg_id = msg.get("id")
        if msg_id is None or _id_field(msg_id) is not None:
            self.tree.on_graft(peer, msg_id, out)

    def _on_prune(self, peer: str, msg: dict, now: float, out: list) -> None:
        self.tree.on_prune(peer)

    _KINDS = {"join": _on_join, "fwd": _on_forward_join, "nbr": _on_neighbor, "nbr-re": _on_neighbor_reply,
              "dis": _on_disconnect, "shuffle": _on_shuffle, "shuffle-re": _on_shuffle_reply, "gossip": _on_gossip,
              "ihave": _on_ihave, "graft": _on_graft, "prune": _on_prune}


# =============================================================================
# PeerJS mesh: the peerjs-multichat page's data plane and merge rules. One
# RTCPeerConnection per DataConnection (PeerJSConnection); MeshPlan decides who
# to dial, PeerJSMesh does the I/O; between two rtchat.py peers, the rtchat.py
# dialect's identity frame binds each connection to a key. Uses Wire, PeerJS
# signaling, Peer's ICE helpers, Dialects. Emits "join", "leave", "chat"
# (PeerJSChat), "unreachable", "verify-failed", "lost", "back".
# =============================================================================

PEERJS_CONSENT = (1.0, 5)        # ICE consent checked every ~1 s, gone after 5 misses in a row: a closed tab is seen
                                 # in ~7 s, as Chrome sees one in ~6 s (aioice alone: 6 misses 5 s apart, ~33 s)
MAX_PEERJS_CONNECTIONS = 4       # per peer: merge races make two; more is a flood
MAX_MESH_PEERS = 256             # peers connected or being connected, and ids waiting to be dialled
CHAT_RATE = (10.0, 30)           # chat lines one peer may send: per second, burst
DEFAULT_MAX_MESSAGE_BYTES = 65536  # what a peer takes whose SDP has no a=max-message-size (RFC 8841)
PEERJS_TOPIC = "peerjs"          # what rtchat.py peers sign as the "topic" on PeerJS (no rooms: one network)
MAX_HELD_FRAMES = 100            # frames from an rtchat.py peer held until it has proven its key


def quicken_consent(pc, interval_s: float, misses: int) -> None:
    """Check ICE consent on this connection every ~interval_s and give up after misses in a row.

    aioice reads its CONSENT_INTERVAL and CONSENT_FAILURES as module globals: this connection gets its own copy
    of aioice's check reading other values, so other connections keep aioice's pace. Call it before the
    connection starts (after createDataChannel or setRemoteDescription)."""
    import types

    import aioice.ice
    try:
        connection = pc.sctp.transport.transport._connection
        check = aioice.ice.Connection.query_consent
    except AttributeError:  # aiortc or aioice internals moved: keep their pace
        log.debug("cannot tune ICE consent checks here")
        return
    values = {**vars(aioice.ice), "CONSENT_INTERVAL": interval_s, "CONSENT_FAILURES": misses}
    tuned = types.FunctionType(check.__code__, values, check.__name__, check.__defaults__, check.__closure__)
    connection.query_consent = tuned.__get__(connection)


def max_message_bytes(sdp: str) -> int:
    """The largest message the author of this SDP takes (a=max-message-size; 0 there means no limit)."""
    value = sdp_field(sdp, "max-message-size")
    if value is None or not value.isdigit():
        return DEFAULT_MAX_MESSAGE_BYTES
    return min(int(value) or MAX_FRAME_CHARS, MAX_FRAME_CHARS)


class PeerJSConnection(Emitter):
    """One PeerJS DataConnection: an RTCPeerConnection of its own with one unordered channel labelled with the
    connection id, JSON objects as text frames. Emits "open", "message" (dict), "closed" (reason).

    To an rtchat.py peer that said it proves its key (speaks_identity), it is what RtchatPyDialect checks an
    identity frame against: its DTLS session, and no signed signaling (PeerJS has none)."""

    signal_mkey = None                   # nothing in PeerJS signaling is signed
    signed_key = None
    unsigned_signaling = True

    def __init__(self, peer_id: str, connection_id: str, ice: RTCConfiguration) -> None:
        super().__init__()
        self.peer_id = peer_id
        self.name = peerjs_name(peer_id)
        self.connection_id = connection_id
        self.state = "connecting"        # connecting, open, closed
        self.client = ""                 # what its OFFER or ANSWER said it runs (unchecked)
        self.speaks_identity = False     # both sides said `"rtchat": 1`: its key is proven before it counts as open
        self.proof: Proof | None = None  # the key it proved on this connection
        self.identity_frame = asyncio.get_running_loop().create_future()
        self.held: list[dict] = []       # what it sent before it proved its key
        self.max_message_bytes = DEFAULT_MAX_MESSAGE_BYTES
        self.dropped = 0                 # frames that were not a JSON object of a sane size
        self.channel = None
        self.remote_sdp: str | None = None
        self._candidates: list[dict] = []
        self.pc = RTCPeerConnection(ice)
        self.pc.on("datachannel", self._adopt)
        self.pc.on("connectionstatechange", self._on_connection_state)
        self._deadline = asyncio.get_running_loop().call_later(CONNECT_TIMEOUT_S, self.close, "did not connect")

    def __repr__(self) -> str:
        return f"PeerJSConnection({self.peer_id!r}, {self.connection_id!r}, {self.state})"

    async def offer(self) -> str:
        self._adopt(self.pc.createDataChannel(self.connection_id, ordered=False))
        quicken_consent(self.pc, *PEERJS_CONSENT)
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return self.pc.localDescription.sdp

    async def answer(self, sdp: str) -> str:
        await self._set_remote(sdp, "offer")
        quicken_consent(self.pc, *PEERJS_CONSENT)
        await self.pc.setLocalDescription(await self.pc.createAnswer())
        return self.pc.localDescription.sdp

    async def accept_answer(self, sdp: str) -> None:
        if self.pc.signalingState != "have-local-offer":
            return  # a second ANSWER: the first one stands
        try:
            await self._set_remote(sdp, "answer")
        except Exception as exc:  # an SDP aiortc cannot take
            log.debug("%r: answer refused: %s", self, exc)
            self.close("bad answer")

    async def _set_remote(self, sdp: str, kind: str) -> None:
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type=kind))
        self.remote_sdp = sdp
        self.max_message_bytes = max_message_bytes(sdp)
        buffered, self._candidates = self._candidates, []
        for data in buffered:
            await self.add_candidate(data)

    async def add_candidate(self, data: dict) -> None:
        """A trickled candidate; kept until the remote SDP is known."""
        if self.remote_sdp is None:
            if len(self._candidates) < MAX_PENDING_CANDIDATES:
                self._candidates.append(data)
            return
        candidate = remote_candidate(data, self.remote_sdp)
        if candidate is not None and self.state != "closed":
            try:
                await self.pc.addIceCandidate(candidate)
            except Exception as exc:
                log.debug("%r: candidate refused: %s", self, exc)

    def _adopt(self, channel) -> None:
        if self.channel is not None:
            return  # PeerJS opens one channel per connection: a second one is not read
        self.channel = channel
        channel.on("open", self._set_open)
        channel.on("message", self._on_frame)
        channel.on("close", lambda: self.close("channel closed"))
        if channel.readyState == "open":  # a remote channel is announced already open
            self._set_open()

    def _set_open(self) -> None:
        if self.state == "connecting":
            self.state = "open"
            self._deadline.cancel()
            self.emit("open", self)

    def _on_connection_state(self) -> None:
        if self.pc.connectionState in ("failed", "closed"):
            self.close(f"connection {self.pc.connectionState}")

    def _on_frame(self, data: str | bytes) -> None:
        """A JSON object, in a text frame (PeerJS 1.2's "json") or a binary one (PeerJS 1.5's)."""
        value = None
        if len(data) <= MAX_FRAME_CHARS:
            with contextlib.suppress(ValueError):
                value = parse_json(data)
        if isinstance(value, dict):
            self.emit("message", self, value)
        else:
            self.dropped += 1

    def is_idle(self) -> bool:
        return self.state != "open" or sctp_idle(self.pc, [self.channel])

    def dtls_fingerprints(self) -> tuple[str | None, str | None]:
        return dtls_fingerprints(self.pc, self.remote_sdp)

    @property
    def rtt_ms(self) -> float | None:
        """The round trip SCTP measured on what we sent (the page answers no pings); None before it has."""
        srtt = getattr(self.pc.sctp, "_srtt", None) if self.pc.sctp else None
        return srtt * 1000 if isinstance(srtt, float) else None

    def send(self, value: dict) -> bool:
        """One JSON text frame; False if the connection is not open or the frame is over what the peer takes."""
        text = to_json(value)  # ASCII: as many bytes as characters
        if self.state != "open" or self.channel.readyState != "open" or len(text) > self.max_message_bytes:
            return False
        self.channel.send(text)
        return True

    def close(self, reason: str = "closed") -> None:
        if self.state == "closed":
            return
        self.state = "closed"
        self._deadline.cancel()
        _spawn(self.pc.close(), f"close-{self.connection_id}")
        self.emit("closed", self, reason)


@dataclasses.dataclass(frozen=True)
class PeerJSChat:
    """A chat line on the PeerJS network, exactly as its author sent it (clean() it to show it)."""
    sender: str                 # the author: always the user whose connection it came on
    text: str
    timestamp: int | None       # the author's clock, epoch ms; None if it sent nothing that makes sense
    action: bool = False        # /me (rtchat.py peers only: the page has no actions)
    proof: Proof | None = None  # the author's key, proven on the connection it came on (rtchat.py peers), and
    msg_id: str | None = None   # with it, what its message frame carried: the id bound to its words, the salt
    salt: str | None = None     # in that id, and the signature by the message key it proved (PROTOCOL.md, The
    sig: str | None = None      # PeerJS network)

    def frame(self) -> dict:
        """What the page sends and reads."""
        return {"type": "chat", "chat": {"sender": self.sender, "message": self.text, "timestamp": self.timestamp}}

    def signed_frame(self) -> dict:
        """What carries our signed line to an rtchat.py peer that proved its key (PROTOCOL.md, Messages)."""
        return {"t": "msg", "id": self.msg_id, "ts": self.timestamp, "text": self.text, "action": self.action,
                "salt": self.salt, "sig": self.sig}

    @classmethod
    def read_signed(cls, value: dict, sender: str, proof: Proof) -> PeerJSChat | None:
        """An rtchat.py message frame from a peer that proved its key; None if malformed, if its id is not bound to
        its words, or if it is not signed by the message key the peer proved."""
        text, stamp, msg_id, salt, sig = (value.get(k) for k in ("text", "ts", "id", "salt", "sig"))
        action = value.get("action") is True
        if not (isinstance(text, str) and 0 < len(text) <= MAX_TEXT_CHARS and type(stamp) is int and _epoch_ms(stamp)
                and isinstance(salt, str) and SALT_RE.fullmatch(salt) and is_signature_text(sig)):
            return None
        if msg_id != message_id(sender, fingerprint(proof.key), stamp, text, action, salt) or not verify_message(
                proof.author["mkey"], sig, signed_bytes("message", PEERJS_TOPIC, sender, msg_id, stamp, text, action)):
            log.debug("%s sent a line whose id or signature does not fit: dropped", sender)
            return None
        return cls(sender, text, stamp, action, proof, msg_id, salt, sig)

    @classmethod
    def read(cls, value: Any, peer_id: str) -> PeerJSChat | None:
        """A page's chat frame from the connection of peer_id; None if malformed, too long, or in another's name
        (the page lets anyone write any sender)."""
        chat = value.get("chat") if isinstance(value, dict) and value.get("type") == "chat" else None
        if not isinstance(chat, dict):
            return None
        sender, text, stamp = chat.get("sender"), chat.get("message"), chat.get("timestamp")
        if sender != peerjs_name(peer_id) or not isinstance(text, str) or not 0 < len(text) <= MAX_TEXT_CHARS:
            return None
        return cls(sender, text, int(stamp) if _epoch_ms(stamp) else None)


def _epoch_ms(stamp: Any) -> bool:
    return isinstance(stamp, (int, float)) and not isinstance(stamp, bool) and math.isfinite(stamp) and \
        0 <= stamp < 2 ** 53


@dataclasses.dataclass(frozen=True)
class MeshAction:
    """What MeshPlan asks for: dial, answer, send-peers (a `connections` message), drop (a connection), or
    tell about a peer: join, leave, unreachable (the server does not know it, or no connection to it opened)."""
    kind: str
    peer_id: str
    connection_id: str = ""
    peer_ids: tuple[str, ...] = ()
    reason: str = ""


class MeshPlan:
    """The page's merge rules, with no I/O: connection events in, MeshActions out.

    A caller puts its peer list in its OFFER; the callee sends its own (`connections`) once the connection is
    open; each side dials every id it has no connection with (ours skipped), so two meshes become one. Merge
    races make duplicate connections to one peer: all are read, and sends go on the oldest open one, the one
    the page is sure to handle (it ignores an incoming connection from a peer it already has open)."""

    def __init__(self, me: str, new_connection_id: Callable[[], str], max_peers: int = MAX_MESH_PEERS,
                 max_pending: int = MAX_PENDING_SESSIONS) -> None:
        self.me = me
        self.new_connection_id = new_connection_id
        self.max_peers = max_peers
        self.max_pending = max_pending
        self._connections: dict[str, dict[str, int | None]] = {}  # peer -> connection id -> open order, or None
        self._incoming: set[tuple[str, str]] = set()   # (peer, connection id) of the connections peers opened
        self._heard: set[str] = set()       # peers whose list we have (in their OFFER or a `connections`)
        self._queued: dict[str, None] = {}  # ids to dial once fewer connections are being set up
        self._opened = itertools.count()

    # -- what happened --------------------------------------------------------------------------
    def want(self, peer_id: str) -> list[MeshAction]:
        """Someone asked to connect to peer_id."""
        return self._dial([peer_id])

    def offered(self, peer_id: str, connection_id: str, peer_ids: tuple[str, ...]) -> list[MeshAction]:
        """An OFFER: answered unless over a cap, and every id in the caller's list we lack is dialled."""
        known = self._connections.get(peer_id, {})
        if peer_id == self.me or connection_id in known or len(known) >= MAX_PEERJS_CONNECTIONS or \
                self._pending() >= self.max_pending or (not known and self._peer_count() >= self.max_peers):
            return []
        self._connections.setdefault(peer_id, {})[connection_id] = None
        self._incoming.add((peer_id, connection_id))
        self._heard.add(peer_id)
        return [MeshAction("answer", peer_id, connection_id)] + self._dial(peer_ids)

    def opened(self, peer_id: str, connection_id: str) -> list[MeshAction]:
        """A connection is open: the peer joins if it is its first, and a callee sends its list."""
        connections = self._connections.get(peer_id, {})
        if connection_id not in connections or connections[connection_id] is not None:
            return []  # unknown, or open already
        joined = not self._open(peer_id)
        connections[connection_id] = next(self._opened)
        actions = [MeshAction("join", peer_id)] if joined else []
        if (peer_id, connection_id) in self._incoming:
            others = tuple(p for p in self.peers() if p != peer_id)
            actions.append(MeshAction("send-peers", peer_id, connection_id, others))
        return actions + self._drain()

    def listed(self, peer_id: str, peer_ids: tuple[str, ...]) -> list[MeshAction]:
        """A `connections` message from peer_id."""
        if not self._open(peer_id):
            return []
        self._heard.add(peer_id)
        return self._dial(peer_ids)

    def closed(self, peer_id: str, connection_id: str, reason: str = "") -> list[MeshAction]:
        connections = self._connections.get(peer_id, {})
        if connection_id not in connections:
            return []
        was_open = connections.pop(connection_id) is not None
        self._incoming.discard((peer_id, connection_id))
        actions = []
        if was_open and not self._open(peer_id):
            actions.append(MeshAction("leave", peer_id, connection_id, reason=reason))
        if not connections:
            del self._connections[peer_id]
            self._heard.discard(peer_id)
            if not was_open:
                actions.append(MeshAction("unreachable", peer_id, connection_id, reason=reason))
        return actions + self._drain()

    def expired(self, peer_id: str) -> list[MeshAction]:
        """The server could not deliver to peer_id (EXPIRE): connections still being set up with it are dropped."""
        self._queued.pop(peer_id, None)
        connections = self._connections.get(peer_id, {})
        pending = [c for c, order in connections.items() if order is None]
        if not pending:
            return []
        for connection_id in pending:
            del connections[connection_id]
            self._incoming.discard((peer_id, connection_id))
        if not connections:
            del self._connections[peer_id]
            self._heard.discard(peer_id)
        return [MeshAction("drop", peer_id, c) for c in pending] + \
            [MeshAction("unreachable", peer_id, reason="not online")] + self._drain()

    # -- what is -----------------------------------------------------------------------------------
    def peers(self) -> list[str]:
        """Peers with an open connection, in the order they joined."""
        firsts = {p: min(o for o in c.values() if o is not None) for p, c in self._connections.items()
                  if self._open(p)}
        return sorted(firsts, key=firsts.get)

    def sending_connection(self, peer_id: str) -> str | None:
        """The oldest open connection to peer_id."""
        open_ = {c: o for c, o in self._connections.get(peer_id, {}).items() if o is not None}
        return min(open_, key=open_.get) if open_ else None

    def is_settled(self) -> bool:
        """Nothing is being set up or waits to be, and we have the list of every peer: the mesh reached so far
        is merged."""
        return not self._queued and not self._pending() and all(p in self._heard for p in self.peers())

    def unsettled(self) -> list[str]:
        """Peers being connected to or waiting their turn: who the mesh is not merged with yet."""
        return [p for p in self._connections if not self._open(p)] + list(self._queued)

    # -- inside -------------------------------------------------------------------------------------
    def _open(self, peer_id: str) -> bool:
        return any(order is not None for order in self._connections.get(peer_id, {}).values())

    def _pending(self) -> int:
        return sum(order is None for c in self._connections.values() for order in c.values())

    def _peer_count(self) -> int:
        return len(self._connections) + len(self._queued)

    def _dial(self, peer_ids) -> list[MeshAction]:
        actions = []
        for peer_id in peer_ids:
            if peer_id == self.me or peer_id in self._connections or peer_id in self._queued:
                continue
            if self._peer_count() >= self.max_peers:
                break
            if self._pending() >= self.max_pending:
                self._queued[peer_id] = None
                continue
            connection_id = self.new_connection_id()
            self._connections[peer_id] = {connection_id: None}
            actions.append(MeshAction("dial", peer_id, connection_id, tuple(self.peers())))
        return actions

    def _drain(self) -> list[MeshAction]:
        queued = list(self._queued)[: max(0, self.max_pending - self._pending())]
        for peer_id in queued:
            del self._queued[peer_id]
        return self._dial(queued)


class PeerJSMesh(Emitter):
    """Us in a peerjs-multichat mesh: our id on a PeerServer, a PeerJSConnection per DataConnection, MeshPlan's
    decisions carried out. Emits "join" (name), "leave" (name, reason), "chat" (PeerJSChat), "unreachable"
    (name), "lost" (reason: the server went away; open connections go on) and "back" (it let us in again).

    With an identity, it tells other rtchat.py peers so (`"rtchat": 1` in its OFFERs and ANSWERs), and a
    connection on which both said it opens only once each side has proven its key with the rtchat.py dialect's
    identity frame, bound to that connection's DTLS session, and admits(name, key) took it; else it is closed
    ("verify-failed": name, reason, fingerprint of the key that signed another connection or None). Its lines
    then come as rtchat.py message frames, taken only with an id bound to their words and the signature of the
    key it proved (PeerJSChat.proof, msg_id, salt, sig), and go as the frame send_chat is given.

        mesh = PeerJSMesh("alice", server="ws://127.0.0.1:9000/", ice=ice_configuration([]))
        await mesh.start()               # NameTaken, PeerServerRefused, PeerServerUnreachable
        await mesh.connect("bob")        # PeerUnavailable: "bob is not online"
        mesh.send_chat("hi")
    """

    def __init__(self, name: str, *, server: PeerJSServer | str | None = None, ice: RTCConfiguration,
                 connect_timeout: float = 10.0, heartbeat_s: float = PEERJS_HEARTBEAT_S,
                 identity: Identity | None = None, admits: Callable[[str, str], bool] = lambda name, key: True
                 ) -> None:
        super().__init__()
        self.name = name
        self.peer_id = peerjs_id(name)
        self.ice = ice
        self.identity = identity
        self.admits = admits
        self.signaling = PeerJSSignaling(self.peer_id, server, connect_timeout, heartbeat_s)
        self.plan = MeshPlan(self.peer_id, lambda: f"dc_{secrets.token_hex(6)}")
        self.connections: dict[tuple[str, str], PeerJSConnection] = {}
        self.dropped = 0                 # chat lines refused: malformed, in another's name, over the rate
        self._chat_rates = RateLimit(*CHAT_RATE)
        self._waiting: dict[str, list[asyncio.Future]] = {}   # connect() calls, by peer id
        self._progress = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._closing = False

    def __repr__(self) -> str:
        return f"PeerJSMesh({self.name!r}, {len(self.plan.peers())} peers)"

    async def start(self) -> PeerJSMesh:
        self.signaling.on("signal", self._on_signal)
        self.signaling.on("lost", lambda reason: self.emit("lost", reason))
        self.signaling.on("back", lambda: self.emit("back"))
        await self.signaling.connect()
        return self

    async def connect(self, name: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
        """Until a connection to this user is open (the merge with its mesh goes on: see wait_settled).
        Raises PeerUnavailable if nobody by that name is on the server, NoPeers if it does not connect in time."""
        peer_id = peerjs_id(name)
        if peer_id == self.peer_id:
            raise UsageError("that is your own name")
        if peer_id in self.plan.peers():
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(peer_id, []).append(waiter)
        try:
            self._carry_out(self.plan.want(peer_id))
            await asyncio.wait_for(waiter, timeout)
        except asyncio.TimeoutError:
            raise NoPeers(f"{name} is on the server but did not connect within {timeout:g} s") from None
        finally:
            with contextlib.suppress(ValueError):
                self._waiting.get(peer_id, []).remove(waiter)

    async def wait_settled(self, timeout: float) -> bool:
        """Until the mesh reached so far has merged (MeshPlan.is_settled); False after timeout."""
        deadline = time.monotonic() + timeout
        while not self.plan.is_settled():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._progress.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._progress.wait(), remaining)
        return True

    def peers(self) -> list[str]:
        """Names of the users we have an open connection to, in the order they joined."""
        return [peerjs_name(p) for p in self.plan.peers()]

    def pending(self) -> list[str]:
        """Names of the users being connected to (the mesh is merged when there are none, see wait_settled)."""
        return [peerjs_name(p) for p in self.plan.unsettled()]

    def send_chat(self, text: str, action: bool = False) -> tuple[PeerJSChat, list[str]]:
        """Say text to everyone in the mesh: as the page does, and, signed, to rtchat.py peers that proved their
        key (with an identity, the chat returned has its id, salt and signature); returns the chat and the names
        it went to. The page has no actions: it gets '* NAME text'."""
        if not 0 < len(text) <= MAX_TEXT_CHARS:
            raise UsageError(f"a chat line has 1 to {MAX_TEXT_CHARS} characters")
        chat = PeerJSChat(self.name, text, now_ms(), action) if self.identity is None else self._signed(text, action)
        page = PeerJSChat(self.name, f"* {self.name} {text}" if action else text, chat.timestamp).frame()
        sent = []
        for name in self.peers():
            connection = self.connection_to(name)
            if connection is not None and connection.send(page if connection.proof is None else chat.signed_frame()):
                sent.append(name)
        return chat, sent

    def _signed(self, text: str, action: bool) -> PeerJSChat:
        stamp, salt = now_ms(), new_id()
        msg_id = message_id(self.name, self.identity.fingerprint, stamp, text, action, salt)
        signed = signed_bytes("message", PEERJS_TOPIC, self.name, msg_id, stamp, text, action)
        return PeerJSChat(self.name, text, stamp, action, None, msg_id, salt, self.identity.sign_message(signed))

    def connection_to(self, name: str) -> PeerJSConnection | None:
        """The connection we send to this user on (the oldest open one), if any."""
        peer_id = PEERJS_ID_PREFIX + name
        return self.connections.get((peer_id, self.plan.sending_connection(peer_id)))

    async def flush(self, timeout: float) -> bool:
        """Until what was sent has arrived: every open connection's SCTP acknowledged it (the page sends no
        acknowledgements of its own); False after timeout."""
        deadline = time.monotonic() + timeout
        while not all(c.is_idle() for c in self.connections.values()):
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    async def close(self) -> None:
        """Leave: peers are told (LEAVE through the server, and each connection closes), the server let go.
        From the start nothing new is dialled or answered, and no leave is said (we are the one leaving)."""
        self._closing = True
        for peer_id in self.plan.peers():
            await self.signaling.send("LEAVE", peer_id)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        connections = list(self.connections.values())  # with those being dialled or answered
        for connection in connections:
            connection.close("we left")
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*(c.pc.close() for c in connections), return_exceptions=True), 2)
        await self.signaling.close()

    # -- carrying out the plan ----------------------------------------------------------------
    def _carry_out(self, actions: list[MeshAction]) -> None:
        if self._closing:
            return
        for action in actions:
            peer_id, name = action.peer_id, peerjs_name(action.peer_id)
            if action.kind == "dial":
                self._task(self._dial(self._connection(peer_id, action.connection_id), action.peer_ids))
            elif action.kind == "send-peers":
                connection = self.connections.get((peer_id, action.connection_id))
                if connection is not None:
                    connection.send({"type": "connections", "peerIds": list(action.peer_ids)})
            elif action.kind == "drop":
                connection = self.connections.get((peer_id, action.connection_id))
                if connection is not None:
                    connection.close("not on the server")
            elif action.kind == "join":
                self._settle(peer_id, None)
                self.emit("join", name)
            elif action.kind == "leave":
                self.emit("leave", name, action.reason)
            elif action.kind == "unreachable":
                self._settle(peer_id, PeerUnavailable(f"{name} is not online" if action.reason == "not online"
                                                      else f"could not connect to {name} ({action.reason})"))
                self.emit("unreachable", name, action.reason)
        self._progress.set()

    def _settle(self, peer_id: str, error: Exception | None) -> None:
        for waiter in self._waiting.pop(peer_id, []):
            if not waiter.done():
                waiter.set_result(None) if error is None else waiter.set_exception(error)

    def _task(self, coro) -> None:
        task = _spawn(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _connection(self, peer_id: str, connection_id: str) -> PeerJSConnection:
        connection = PeerJSConnection(peer_id, connection_id, self.ice)
        self.connections[(peer_id, connection_id)] = connection
        connection.on("open", self._on_open)
        connection.on("message", self._on_message)
        connection.on("closed", self._on_closed)
        return connection

    async def _dial(self, connection: PeerJSConnection, peer_ids: tuple[str, ...]) -> None:
        try:
            sdp = await connection.offer()
        except Exception:
            log.exception("%r: cannot make an offer", connection)
            connection.close("no offer")
            return
        payload = {"sdp": {"type": "offer", "sdp": slim_sdp(sdp)}, "type": "data",
                   "connectionId": connection.connection_id, "label": connection.connection_id, "browser": CLIENT_TAG,
                   "reliable": False, "serialization": "json",
                   "metadata": {"peerIds": list(peer_ids)},  # the page fails on an OFFER without it
                   **self._identity_offered()}
        if not await self.signaling.send("OFFER", connection.peer_id, payload):
            connection.close("no PeerJS server")

    async def _answer(self, connection: PeerJSConnection, sdp: str) -> None:
        try:
            answer = await connection.answer(sdp)
        except Exception as exc:  # an SDP aiortc cannot take
            log.debug("%r: offer refused: %s", connection, exc)
            connection.close("bad offer")
            return
        payload = {"sdp": {"type": "answer", "sdp": slim_sdp(answer)}, "type": "data",
                   "connectionId": connection.connection_id, "browser": CLIENT_TAG, **self._identity_offered()}
        await self.signaling.send("ANSWER", connection.peer_id, payload)

    def _identity_offered(self) -> dict:
        return {"rtchat": PEERJS_RTCHAT_VERSION} if self.identity is not None else {}

    def _on_open(self, connection: PeerJSConnection) -> None:
        if connection.speaks_identity:
            self._task(self._verify(connection))
        else:
            self._carry_out(self.plan.opened(connection.peer_id, connection.connection_id))

    async def _verify(self, connection: PeerJSConnection) -> None:
        """Both sides send the identity frame; the connection counts as open once the peer's proves its key."""
        handshake = Handshake(self.name, PEERJS_TOPIC, self.identity, {},
                              lambda key: self.admits(connection.name, key), connection.identity_frame)
        connection.send(RTCHAT_PY.identity_frame(connection, handshake))
        try:
            connection.proof = await RTCHAT_PY.proven(connection, handshake)
        except VerifyFailed as failure:
            if connection.state == "open":
                self.emit("verify-failed", connection.name, failure.reason, failure.fingerprint)
                connection.close(f"did not prove its key ({failure.reason})")
            return
        if connection.state == "open":
            self._carry_out(self.plan.opened(connection.peer_id, connection.connection_id))
            held, connection.held = connection.held, []
            for value in held:
                self._on_message(connection, value)

    # -- from the server and the connections --------------------------------------------------------
    def _on_signal(self, signal: PeerJSSignal) -> None:
        if self._closing:
            return
        connection = self.connections.get((signal.src, signal.connection_id))
        if signal.kind == "OFFER":
            actions = self.plan.offered(signal.src, signal.connection_id, signal.peer_ids)
            if any(action.kind == "answer" for action in actions):
                connection = self._connection(signal.src, signal.connection_id)
                connection.client = signal.client
                connection.speaks_identity = signal.speaks_identity and self.identity is not None
                self._task(self._answer(connection, signal.sdp))
            self._carry_out([action for action in actions if action.kind != "answer"])
        elif signal.kind == "ANSWER" and connection is not None and connection.pc.signalingState == "have-local-offer":
            connection.client = signal.client
            connection.speaks_identity = signal.speaks_identity and self.identity is not None
            self._task(connection.accept_answer(signal.sdp))
        elif signal.kind == "CANDIDATE" and connection is not None:
            self._task(connection.add_candidate(signal.candidate))
        elif signal.kind == "LEAVE":
            for (peer_id, _), connection in list(self.connections.items()):
                if peer_id == signal.src:
                    connection.close("left")
        elif signal.kind == "EXPIRE":
            self._carry_out(self.plan.expired(signal.src))

    def _on_message(self, connection: PeerJSConnection, value: dict) -> None:
        """The page's frames; from an rtchat.py peer, its identity frame (the first) and, once it proved its key,
        its message frames (it sends no page chat frames), what came before held until then."""
        if connection.speaks_identity and connection.proof is None:
            if value.get("t") == "id":
                if not connection.identity_frame.done():
                    connection.identity_frame.set_result(value)
            elif len(connection.held) < MAX_HELD_FRAMES:
                connection.held.append(value)
            return
        kind = value.get("type")
        if kind == "connections":
            self._carry_out(self.plan.listed(connection.peer_id, peerjs_ids(value.get("peerIds"))))
        elif kind == "chat" or value.get("t") == "msg":
            chat = PeerJSChat.read(value, connection.peer_id) if connection.proof is None else \
                PeerJSChat.read_signed(value, connection.name, connection.proof) if value.get("t") == "msg" else None
            if chat is None or not self._chat_rates.allow(connection.peer_id):
                self.dropped += 1
                return
            self.emit("chat", chat)

    def _on_closed(self, connection: PeerJSConnection, reason: str) -> None:
        self.connections.pop((connection.peer_id, connection.connection_id), None)
        self._carry_out(self.plan.closed(connection.peer_id, connection.connection_id, reason))


# =============================================================================
# Network check: what lies between us and the STUN/TURN servers, in the spirit
# of `tailscale netcheck`: our public address, whether the NAT mapping depends
# on the destination, UDP, which servers answer. aioice asks only the first
# STUN server, so this asks them all, from one socket. Uses IceServer above.
# =============================================================================

NETCHECK_TIMEOUT_S = 3.0
NETCHECK_MAX_SERVERS = 8


@dataclasses.dataclass
class ServerAnswer:
    """One server's answer: a STUN binding (our address as it saw it) or a TURN allocation (a relay)."""
    server: IceServer
    ms: float | None = None                  # round trip; None: no answer
    mapped: tuple[str, int] | None = None    # our public address as this server saw it
    relay: tuple[str, int] | None = None     # TURN: the address it relays for us
    error: str | None = None

    @property
    def answered(self) -> bool:
        return self.ms is not None and self.error is None

    def to_dict(self) -> dict:
        return {"server": self.server.url, "ok": self.answered, "ms": self.ms,
                "mapped": _address(self.mapped), "relay": _address(self.relay), "error": self.error}


def _address(pair: tuple[str, int] | None) -> str | None:
    return f"{pair[0]}:{pair[1]}" if pair else None


@dataclasses.dataclass
class NetReport:
    """What NetCheck found. mapping: "none" (no NAT), "endpoint-independent" (one public address for every
    destination: most peers reach us directly), "endpoint-dependent" (a symmetric NAT: a peer behind another
    one needs TURN), "unknown" (one STUN answer), or None (no STUN answer)."""
    local: tuple[str, int] | None
    answers: list[ServerAnswer]

    @property
    def stun(self) -> list[ServerAnswer]:
        return [a for a in self.answers if a.server.scheme == "stun"]

    @property
    def udp(self) -> bool | None:
        """Whether UDP gets out (a STUN server answered); None with no STUN server to ask."""
        return any(a.answered for a in self.stun) if self.stun else None

    @property
    def public(self) -> list[str]:
        return list(dict.fromkeys(_address(a.mapped) for a in self.stun if a.answered))

    @property
    def mapping(self) -> str | None:
        seen = [a.mapped for a in self.stun if a.answered]
        if not seen:
            return None
        if seen[0] == self.local:
            return "none"
        if len(set(seen)) > 1:
            return "endpoint-dependent"
        return "endpoint-independent" if len(seen) > 1 else "unknown"

    def to_dict(self) -> dict:
        return {"udp": self.udp, "public": self.public, "mapping": self.mapping, "local": _address(self.local),
                "servers": [a.to_dict() for a in self.answers]}


class _BindingSocket(asyncio.DatagramProtocol):
    """One UDP socket for every binding request, so that the addresses the servers see are comparable."""

    def __init__(self) -> None:
        self.transport = None
        self._waiting: dict[bytes, tuple[tuple[str, int], asyncio.Future]] = {}

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        from aioice import stun
        try:
            message = stun.parse_message(data)
        except Exception:  # untrusted bytes: not STUN, or malformed
            return
        server, future = self._waiting.get(message.transaction_id, (None, None))
        if future is not None and tuple(addr[:2]) == server and not future.done():
            future.set_result(message)

    async def binding(self, server: tuple[str, int], timeout: float) -> tuple[str, int]:
        """Our address as server sees it; retransmits as RFC 8489 does, raises TimeoutError without answer."""
        from aioice import stun
        request = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
        future = asyncio.get_running_loop().create_future()
        self._waiting[request.transaction_id] = (server, future)
        deadline, wait = time.monotonic() + timeout, 0.25
        try:
            while not future.done() and time.monotonic() < deadline:
                self.transport.sendto(bytes(request), server)
                await asyncio.wait({future}, timeout=min(wait, deadline - time.monotonic()))
                wait *= 2
        finally:
            self._waiting.pop(request.transaction_id, None)
        if not future.done():
            raise asyncio.TimeoutError
        mapped = future.result().attributes.get("XOR-MAPPED-ADDRESS")
        if not (isinstance(mapped, tuple) and len(mapped) == 2 and isinstance(mapped[1], int)):
            raise ValueError("no mapped address in the answer")
        return clean(mapped[0], 64), mapped[1]


class _TurnEnd(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.closed = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


class NetCheck:
    """Ask every configured STUN server for our address (from one socket) and every TURN server for a relay."""

    def __init__(self, servers: list[IceServer], hosts: list[str] | None = None,
                 timeout: float = NETCHECK_TIMEOUT_S) -> None:
        self.servers = servers[:NETCHECK_MAX_SERVERS]
        self.hosts = hosts or []
        self.timeout = timeout

    async def run(self) -> NetReport:
        stun_servers = [s for s in self.servers if s.scheme == "stun"]
        socket_end = local = None
        if stun_servers:
            bind_to = next((h for h in self.hosts if ":" not in h), "0.0.0.0")
            try:
                transport, socket_end = await asyncio.get_running_loop().create_datagram_endpoint(
                    _BindingSocket, local_addr=(bind_to, 0))
            except OSError as exc:
                raise RtchatError(f"cannot open a UDP socket on {bind_to}: {exc.strerror or exc}") from None
            local = transport.get_extra_info("sockname")[:2]
        try:
            answers = await asyncio.gather(*(
                self._binding(socket_end, s) if s.scheme == "stun" else self._allocate(s) for s in self.servers))
        finally:
            if socket_end is not None:
                socket_end.transport.close()
        if local is not None and local[0] == "0.0.0.0":
            local = (await self._source_address(stun_servers[0]), local[1])
        return NetReport(local, list(answers))

    async def _resolve(self, server: IceServer) -> tuple[str, int]:
        import socket
        infos = await asyncio.get_running_loop().getaddrinfo(server.host, server.port, family=socket.AF_INET,
                                                             type=socket.SOCK_DGRAM)
        return infos[0][4][0], server.port

    async def _source_address(self, server: IceServer) -> str | None:
        """The address this host sends from towards server (a connected UDP socket sends nothing)."""
        import socket
        with contextlib.suppress(OSError, asyncio.TimeoutError), \
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect(await asyncio.wait_for(self._resolve(server), self.timeout))
            return sock.getsockname()[0]
        return None

    async def _binding(self, end: _BindingSocket, server: IceServer) -> ServerAnswer:
        answer = ServerAnswer(server)
        try:
            address = await asyncio.wait_for(self._resolve(server), self.timeout)
            started = time.monotonic()
            answer.mapped = await end.binding(address, self.timeout)
            answer.ms = (time.monotonic() - started) * 1000
        except asyncio.TimeoutError:
            answer.error = "no answer"
        except (OSError, ValueError) as exc:
            answer.error = clean(str(exc), 200)
        return answer

    async def _allocate(self, server: IceServer) -> ServerAnswer:
        """A TURN allocation with the configured credentials, deleted again at once."""
        from aioice import stun, turn
        answer = ServerAnswer(server)
        started = time.monotonic()
        try:  # by name, as ICE does: a TLS certificate names the host
            transport, end = await asyncio.wait_for(turn.create_turn_endpoint(
                _TurnEnd, (server.host, server.port), server.user, server.password, ssl=server.scheme == "turns",
                transport=server.transport), self.timeout)
            answer.ms = (time.monotonic() - started) * 1000
            answer.relay = transport.get_extra_info("sockname")
            answer.mapped = transport.get_extra_info("related_address")
            transport.close()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(end.closed, 1.0)
        except asyncio.TimeoutError:
            answer.error = "no answer"
        except stun.TransactionFailed as exc:
            code = exc.response.attributes.get("ERROR-CODE", (0, ""))[0]
            answer.error = "credentials refused" if code in (401, 403, 441) else f"refused ({code})"
        except Exception as exc:  # a TCP refusal, TLS, a malformed answer: one line, not a traceback
            answer.error = clean(f"{type(exc).__name__}: {exc}", 200)
        return answer


# =============================================================================
# Room sessions: a room's signaling on the broker (RoomSignaling: its topic,
# our inbox, signed envelopes out, the gate's signals in, announcements), who
# may connect under which name (Admission), the sessions with its members
# (Sessions: each Peer registered, verified by its Dialect, closed), signaling
# through members (AssistedSignaling) and how sessions begin (Negotiation:
# offer/answer, glare, fallbacks, candidates, the seen table, retries). Emits
# typed events. Uses everything above but Gossip, the PeerJS mesh and the
# network check.
# =============================================================================

BROWSER_MEMORY_S = 600.0   # after seeing a browser in a room, announce with our key (RSA-signed) this long
SETUP_FAILURES = ("no network path", "did not connect in time", "connection failed")  # tried again, later each time
CLOSED_BECAUSE = {"challenge-failed": "verification failed", "no-identity": "no identity",
                  "bad-identity": "channel binding failed", "mitm": "channel binding failed",
                  "key-refused": "key refused"}   # VerifyFailed reason -> why the session closed


def user_info_fields(data: Any) -> tuple[str | None, str | None]:
    """(publicKeyString, client tag) from a userInfo object, each None unless sane."""
    if not isinstance(data, dict):
        return None, None
    key, tag = data.get("publicKeyString"), data.get("client")
    key = key if isinstance(key, str) and len(key) <= MAX_KEY_CHARS else None
    tag = tag[:64] if isinstance(tag, str) else None
    return key, tag


class RoomSignaling(Emitter):
    """One room on the broker: its topic and our inbox under it (where rtchat.py peers send us their offers and
    answers), envelopes signed as each audience expects, the gate's verdicts, announcements. Emits "signal"
    (RoomSignal) and "key-changed" (name, None, "changed") the first time signaling in a known name is signed by
    another key (its identity key is not shown on the broker, so there is no fingerprint to give); for signaling
    through members (AssistedSignaling), "published" (subtopic, to, payload) for what we send and "heard-via"
    (sender, member) before a signal a member passed on."""

    def __init__(self, signaling: Signaling, gate: SignalingGate, *, me: str, topic: str, identity: Identity,
                 seal: Seal | None = None) -> None:
        super().__init__()
        self.signaling = signaling
        self.gate = gate
        self.me = me
        self.topic = topic
        self.identity = identity
        self.seal = seal
        # Offers and answers between rtchat.py peers go to the recipient's own subtopic: on the room topic every
        # process in a room of N would decompress all N² of them (browsers ignore the extra userInfo field).
        tag = secrets.token_hex(8)
        self.inbox = f"{topic}/{tag}"
        self.user_info = {"publicKeyString": identity.public_key_string, "client": CLIENT_TAG, "inbox": tag}
        self.compact_info = {"client": CLIENT_TAG, "inbox": tag}  # what rtchat.py peers need
        self.is_on = False
        self._inboxes: dict[str, str] = {}      # wire name -> its inbox topic
        self._browser_seen = -math.inf          # when a browser last showed up
        self._last_announce = 0.0
        self._announcing: asyncio.TimerHandle | None = None
        self._answers = Budget(ANSWER_CONNECT_BUDGET)
        self._tasks = Tasks()

    def start(self) -> None:
        self.is_on = True
        self.signaling.subscribe(self.topic, self.receive)
        self.signaling.subscribe(self.inbox, self.receive)
        self.signaling.on("connected", self.announce)

    async def close(self) -> None:
        self.is_on = False
        self.signaling.off("connected", self.announce)
        self.signaling.unsubscribe(self.topic)
        self.signaling.unsubscribe(self.inbox)
        await self._tasks.close()

    def receive(self, topic: str, payload: bytes, via: str = "") -> None:
        """A payload from the broker on one of our topics (or passed on by the member via): through the gate, then
        out as a "signal" (after "heard-via" (sender, via) for one a member passed on)."""
        checked = self.gate.check(payload, time.monotonic(), now_ms(), via)
        if checked.hint_inbox:  # only a hint: it opens nothing (PROTOCOL.md, Refusal hints)
            self.publish("refused", {"target": checked.impostor, "reason": "key-changed"}, compact=True,
                         topic=f"{self.topic}/{checked.hint_inbox}")
        if checked.warn:
            self.emit("key-changed", checked.impostor, None, "changed")
        if checked.signal is not None:
            if via:
                self.emit("heard-via", checked.signal.sender, via)
            self.emit("signal", checked.signal)

    def publish(self, subtopic: str, data: Any, to: str | None = None, compact: bool = False,
                topic: str | None = None) -> None:
        """Signed signaling: browsers ignore the extra fields (rtchat-wire.md §9.3). With `to`, it goes to that
        peer's inbox if it has one; the signature still covers the room topic. compact, for rtchat.py: signed
        with our Ed25519 message key (which the channel later ties to our identity), and zlib'd on an inbox.
        Emits "published" (subtopic, to, payload), so that members may carry it too (AssistedSignaling)."""
        topic = topic or self._inboxes.get(to, self.topic)
        payload = self.envelope(subtopic, data, compact, topic)
        self.signaling.publish(topic, payload)
        self.emit("published", subtopic, to, payload)

    def envelope(self, subtopic: str, data: Any, compact: bool, topic: str) -> bytes:
        """The payload publish() sends on topic: signed, encoded, sealed in a sealed room."""
        envelope = {"sender": self.me, "timestamp": now_ms(), "subtopic": subtopic, "data": data, "nonce": new_id()}
        signed = signed_bytes("signaling", self.topic, self.me, subtopic, envelope["timestamp"], envelope["nonce"],
                              data)
        if compact:
            envelope.update(mk=self.identity.message_public, sig=self.identity.sign_message(signed))
        else:
            envelope["sig"] = base64.b64encode(self.identity.sign(signed)).decode()
        payload = encode_envelope(envelope, compact and topic != self.topic)
        return self.seal.seal(payload) if self.seal else payload

    def info(self, dialect: Dialect) -> dict:
        """Our userInfo for a peer of this dialect: browsers judge us by our key (§6.5); rtchat.py peers by what
        we prove in the channel."""
        return self.compact_info if dialect.compact else self.user_info

    def note_inbox(self, name: str, info: Any, trusted: bool) -> None:
        """Where an rtchat.py peer wants its offers and answers. For a peer we know, only from what it signed
        (trusted); a stranger's may be forged, but that wins no session: identities are proven in the channel."""
        if not trusted:
            return
        tag = info.get("inbox") if isinstance(info, dict) else None
        if isinstance(tag, str) and INBOX_TAG_RE.fullmatch(tag):
            self._inboxes[name] = f"{self.topic}/{tag}"
        else:
            self._inboxes.pop(name, None)

    def inbox_of(self, name: str) -> str | None:
        return self._inboxes.get(name)

    def forget(self, name: str) -> None:
        self._inboxes.pop(name, None)

    def note_dialect(self, dialect: Dialect) -> None:
        if dialect.keys_in_announcements:
            self._browser_seen = time.monotonic()

    @property
    def browsers_near(self) -> bool:
        """A browser was here lately: announcements carry our key, RSA-signed, as browsers expect."""
        return time.monotonic() - self._browser_seen < BROWSER_MEMORY_S

    def announce(self) -> None:
        """Where browsers are, with our key and signed: they judge a peer by the key in its connect (§6.5).
        Among rtchat.py peers only who we are and where our inbox is: keys are proven in the channel."""
        self._last_announce = time.monotonic()
        dialect = BROWSER if self.browsers_near else RTCHAT_PY
        self.publish("connect", self.info(dialect), compact=dialect.compact)

    def announce_soon(self) -> None:
        """Answer a newcomer's connect with ours so it can offer. It joined after our last announce, so it has
        not heard it; one broadcast serves every newcomer, so they are coalesced (one per REANNOUNCE_MIN_S)."""
        if self._announcing is None and self.is_on:
            delay = max(0.0, self._last_announce + REANNOUNCE_MIN_S - time.monotonic())
            self._announcing = self._tasks.later(delay, self._announce_due)

    def answer(self, name: str, dialect: Dialect) -> None:
        """Let a newcomer (or a peer whose session ended) hear us so that it can offer: an rtchat.py peer with an
        inbox on its inbox, so that a join costs the broker one delivery per member, not one per member squared (a
        broadcast from every member to every member); others, and beyond a budget, by the coalesced announcement."""
        if dialect.compact and name in self._inboxes and self._answers.take():
            self.publish("connect", self.compact_info, to=name, compact=True)
        else:
            self.announce_soon()

    def _announce_due(self) -> None:
        self._announcing = None
        if self.is_on:
            self.announce()

    def say_goodbye(self) -> None:
        self.publish("unload", "disconnecting", compact=not self.browsers_near)


class Admission(Emitter):
    """Which keys may connect under which names (the trust policy, applied to sessions), and what peers tell us
    about our own key. Emits "key-changed" (name, fingerprint, verdict) once per refused key, and "key-refused"
    (name, reason, confirmed) once per peer and reason."""

    def __init__(self, trust: Trust, me: str) -> None:
        super().__init__()
        self.trust = trust
        self.me = me
        self.refused: dict[str, str] = {}       # bare name -> the last key refused for it (what /trust NAME takes)
        self._first = Once()  # what was said once already
        self._refused_by: set[str] = set()      # wire names that told us they refuse our key (one retry each)

    def admits(self, name: str, key: str | None, dialect: Dialect | None = None) -> bool:
        """May we connect to this name with this key? A changed key is refused loudly, once per key.
        rtchat.py shows its key in the channel: it is judged there (so a refusal is loud there too)."""
        if key is None:
            return self.trust.policy != "known" or (dialect is not None and not dialect.keys_in_announcements)
        try:
            verdict = self.trust.verdict(bare_name(name), key)
        except ValueError:
            return False
        if self.trust.allows(verdict) or (verdict == "changed" and self.trust.is_accepting(bare_name(name))):
            return True
        self.refused[bare_name(name)] = key
        if len(self.refused) > 256:
            self.refused.pop(next(iter(self.refused)))
        if self._first((name, key)):
            self.emit("key-changed", name, fingerprint(key), verdict)
        return False

    def trusts_signaling(self, name: str, signer: str | None) -> bool:
        """Is what came in this name as good as signed by it? Unsigned in a name whose key signs is not (unless
        /trust NAME waits for its next key)."""
        bare = bare_name(name)
        return signer is not None or not self.trust.signs(bare) or self.trust.is_accepting(bare)

    def hopeless(self, peer: Peer) -> bool:
        """A session being set up that cannot succeed as it is: begun before /trust took the name's next key, or
        with a peer that told us it refuses our key (its next announcement may mean it takes it now: one retry per
        refusal, and not of a session younger than OFFER_DEDUP_S, which may be the answer to that announcement)."""
        since = self.trust.accepting_since(bare_name(peer.name))
        if since is not None and peer.created < since:
            return True
        if peer.name in self._refused_by and time.monotonic() - peer.created > OFFER_DEDUP_S:
            self._refused_by.discard(peer.name)
            return True
        return False

    def on_refused(self, signal: RoomSignal) -> None:
        """A peer says it refuses our key (it has another pinned for our name): a 'key-refused' event, once per
        peer and reason. confirmed: signed by the key we have pinned for it, else anyone could have sent it."""
        data = signal.data
        if not isinstance(data, dict) or data.get("target") != self.me:
            return
        reason = data.get("reason") if data.get("reason") in ("key-changed",) else "unknown"
        if len(self._refused_by) > 256:
            self._refused_by.clear()
        self._refused_by.add(signal.sender)
        if self._first(("refused-by", signal.sender, reason)):
            self.emit("key-refused", signal.sender, reason, signal.signer is not None)


class Sessions(Emitter):
    """The sessions of one room with its members, once they exist: each Peer registered by name (a new one
    replaces the old), verified by its peer's Dialect when it opens (what the peer sends meanwhile held, its
    identify/challenge questions answered), its key pinned, and forgotten when it closes. Owns every Peer's tasks
    from registration on; how sessions begin is Negotiation's.

    Emits "verified" (peer), "first-contact" (peer, just before its name's first key is pinned), "frame" (peer,
    label, value: from verified peers; what came before, once verified), "file-channel" (peer, channel),
    "leave" (peer, reason: a verified peer gone), "closed" (peer, reason: any session ended), "no-route" (peer,
    facts), "key-accepted" (peer), "mitm-detected" (peer, fingerprint of the key that signed another connection),
    "verify-failed" (peer, reason: VerifyFailed's), and "phase" (name, step: open, verified) for whoever measures
    set-up (Negotiation emits the steps before)."""

    def __init__(self, admission: Admission, *, me: str, topic: str, identity: Identity, trust: Trust,
                 store: Store, ice: RTCConfiguration) -> None:
        super().__init__()
        self.admission = admission
        self.me = me
        self.topic = topic
        self.identity = identity
        self.trust = trust
        self.store = store
        self.ice = ice
        self.peers: dict[str, Peer] = {}
        self.changes = Pulse()              # notified when a peer is heard of, verified or gone
        self._early: dict[Peer, list[tuple[str, Any]]] = {}  # frames from a peer not verified yet
        self._frames: dict[Peer, asyncio.Future] = {}      # its identity frame (rtchat.py)
        self._tasks = Tasks()

    async def close(self) -> None:
        """Every session ends ("we left") and is awaited (its connection closed) for up to 2 s."""
        peers = list(self.peers.values())
        for peer in peers:
            peer.close("we left")
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(p.wait_closed() for p in peers), return_exceptions=True), 2)
        await self._tasks.close()

    def verified(self) -> list[Peer]:
        return [p for p in self.peers.values() if p.is_verified]

    def lookalike_of(self, name: str) -> str | None:
        """A pinned or present name, not this one, that this one looks like (the same skeleton): 'alice' for
        'аlice' with a Cyrillic а, or for 'ａｌｉｃｅ'. None if it looks like no other."""
        bare = bare_name(name)
        like = self.trust.names_like(bare)
        if not like:
            shape = skeleton(bare)
            like = {other for p in self.peers.values() if (other := bare_name(p.name)) != bare and p.shape == shape}
        return min(like) if like else None

    def key_facts(self, name: str) -> KeyFacts:
        """What the gate may know of this name's keys: its live session's, and those pinned for it."""
        bare, peer = bare_name(name), self.peers.get(name)
        pins, authors = self.trust.pins_for(bare), self.store.data["authors"]
        return KeyFacts(
            session_key=peer.key_string if peer else None, session_mkey=peer.message_key if peer else None,
            pinned=tuple(pin["key"] for pin in pins.values()),
            message_keys={a["mkey"]: pins[fp]["key"] for fp in pins
                          if isinstance(a := authors.get(fp), dict) and isinstance(a.get("mkey"), str)},
            signs=self.trust.policy != "any" and self.trust.signs(bare), accepting=self.trust.is_accepting(bare))

    def sizes(self) -> dict[str, int]:
        """How big each table is (every one is bounded, whatever peers send)."""
        return {"peers": len(self.peers), "early": sum(len(e) for e in self._early.values())}

    async def until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Until predicate() holds, looked at whenever a peer is heard of, verified or gone; False at timeout."""
        return await self.changes.until(predicate, timeout)

    def add(self, name: str, dialect: Dialect, key: str | None, tag: str | None, candidates: list[dict] = ()) -> Peer:
        """A new session with name (announced, or being set up), in place of the one there was."""
        peer = Peer(name, self.ice, dialect, key_string=key, client_tag=tag, candidates=candidates)
        old = self.peers.get(name)
        self.peers[name] = peer  # first: closing the old one must not forget what we know of the name
        self.changes.fire()
        if old is not None:
            old.close("replaced")
        peer.on("open", self._on_open)
        peer.on("frame", self._on_frame)
        peer.on("file-channel", lambda p, channel: self.emit("file-channel", p, channel))
        peer.on("no-route", lambda p, facts: self.emit("no-route", p, facts))
        peer.on("closed", self._on_closed)
        return peer

    def _on_open(self, peer: Peer) -> None:
        self.emit("phase", peer.name, "open")
        self._tasks.spawn(self._verify(peer), f"verify-{peer.name}")

    async def _verify(self, peer: Peer) -> None:
        bare = bare_name(peer.name)
        handshake = Handshake(self.me, self.topic, self.identity,
                              pins={} if self.trust.is_accepting(bare) else self.trust.pins_for(bare),
                              admits=lambda key: self.admission.admits(peer.name, key),
                              frame=self._frames.setdefault(peer, asyncio.get_running_loop().create_future()))
        try:
            proof = await peer.dialect.verify(peer, handshake)
        except VerifyFailed as failure:
            if peer.state != "open":
                return
            if failure.reason == "mitm":
                self.emit("mitm-detected", peer, failure.fingerprint)
            elif failure.reason != "key-refused":  # the policy has said why
                self.emit("verify-failed", peer, failure.reason)
            peer.close(CLOSED_BECAUSE[failure.reason])
            return
        if peer.state == "open":
            self._verified(peer, proof)

    def _verified(self, peer: Peer, proof: Proof) -> None:
        peer.verify(proof.key, proof.channel_bound, proof.author, self.lookalike_of(peer.name))
        accepted = False
        with contextlib.suppress(RtchatError, ValueError):
            bare = bare_name(peer.name)
            verdict = self.trust.verdict(bare, peer.key_string)
            accepted = verdict == "changed" and self.trust.is_accepting(bare)
            if verdict == "new":
                self.emit("first-contact", peer)
            if verdict != "changed" or accepted:  # --trust any: never re-pin; after /trust NAME: in place of the old
                self.trust.pin(bare, peer.key_string, signs=peer.channel_bound, author=peer.author, replace=accepted)
        if accepted:
            self.emit("key-accepted", peer)
        self.changes.fire()
        self.emit("phase", peer.name, "verified")
        self.emit("verified", peer)
        for label, value in self._early.pop(peer, []):
            self.emit("frame", peer, label, value)

    def _on_frame(self, peer: Peer, label: str, value: Any) -> None:
        """What a peer sends before it is verified: identify/challenge answered (browsers ask first), its identity
        frame taken (the first one), anything else kept (100 at most) until it is verified."""
        if label == "question" and answer_identity(peer, value, self.identity):
            return
        if peer.dialect.is_handshake(label, value):
            frame = self._frames.setdefault(peer, asyncio.get_running_loop().create_future())
            if peer.state in ("connecting", "open") and not frame.done():
                frame.set_result(value)  # it is open on its side already; checked once we are
            return
        if not peer.is_verified:
            early = self._early.setdefault(peer, [])
            if len(early) < 100:
                early.append((label, value))
            return
        self.emit("frame", peer, label, value)

    def _on_closed(self, peer: Peer, reason: str) -> None:
        name = peer.name
        if self.peers.get(name) is peer:
            del self.peers[name]
        self._early.pop(peer, None)
        frame = self._frames.pop(peer, None)
        if frame is not None and not frame.done():
            frame.cancel()
        if peer.closing:
            self._tasks.spawn(peer.wait_closed(), f"closed-{name}")
        self.changes.fire()
        if peer.verified_at is not None and reason != "we left":
            self.emit("leave", peer, reason)
        self.emit("closed", peer, reason)


SIGNAL_FRAME = "signal"   # the data-channel frame that carries signaling through a member (PROTOCOL.md)


class AssistedSignaling:
    """Signaling through members, so that a room keeps forming links while the broker is down or loses messages.
    What we publish for an rtchat.py peer we have no open session with goes, as the same signed bytes, also to a
    few verified rtchat.py members, asking each to pass it on; our announcement goes to every member we verify
    (and, while the broker is away, every announcement), to be passed on to all of theirs. What members pass on
    to us goes through the room's gate as the broker's does: a member can drop an envelope but not alter or forge
    one, and a copy that also came another way is ignored there. Our last envelopes for a peer not connected
    yet are sent again through a member we then verify, or hear that peer through: they may have been lost while
    no member could reach it. relay: whether we pass on for others (--no-relay: we do not). counts: frames sent,
    received, passed on, and refused by reason."""

    def __init__(self, network: RoomSignaling, sessions: Sessions, relay: bool = True) -> None:
        self.network = network
        self.sessions = sessions
        self.relay = relay
        self.counts: collections.Counter[str] = collections.Counter()
        self._carriers: dict[str, str] = {}      # wire name -> the member its signaling last came through
        self._pending: dict[str, list[tuple[float, bytes]]] = {}  # wire name -> our last envelopes for it, and when
        self._introduction: tuple[float, bytes] = (-math.inf, b"")  # our announcement for members, and when made
        self._sending: dict[str, Budget] = {}    # member name -> what it takes from us (more would be dropped there)
        network.on("published", self._on_published)
        network.on("heard-via", self._heard_via)
        sessions.on("verified", self._introduce)
        sessions.on("closed", self._closed)

    def _closed(self, peer: Peer, reason: str) -> None:
        self._pending.pop(peer.name, None)
        self._sending.pop(peer.name, None)

    def _members(self, but: str = "") -> list[Peer]:
        """Verified rtchat.py peers bound to their channel: the ones that can carry signaling."""
        return [p for p in self.sessions.verified() if p.channel_bound and p.dialect.compact and p.name != but]

    def _carrier(self, name: str) -> Peer | None:
        """The member name's signaling last came through, if it is still one that can carry ours to it."""
        via = self._carriers.get(name)
        return next((m for m in self._members(but=name) if m.name == via), None) if via else None

    def _heard_via(self, sender: str, via: str) -> None:
        self._carriers.pop(sender, None)
        self._carriers[sender] = via
        if len(self._carriers) > MAX_SEEN_PEERS:
            del self._carriers[next(iter(self._carriers))]
        carrier = self._carrier(sender)
        if carrier is not None:
            self._send_pending(carrier, [sender])

    def _send_pending(self, carrier: Peer, targets: list[str]) -> None:
        """Our last envelopes for these peers, while fresh and the peer not connected, through carrier."""
        now = time.monotonic()
        for name in targets:
            target = self.sessions.peers.get(name)
            if target is not None and not target.is_open and name != carrier.name:
                for _, payload in [p for p in self._pending.get(name, ()) if now - p[0] < CLOCK_SKEW_S / 2]:
                    self._send([carrier], payload, name)

    def _send(self, members: list[Peer], payload: bytes, to: str) -> None:
        """Within what each member takes from us: a flood of made-up names that we answer (each answer is
        published, so passed on too) costs members no more than SIGNAL_FRAME_BUDGET."""
        frame = {"t": SIGNAL_FRAME, "to": to, "p": base64.b64encode(payload).decode()}
        for member in members:
            if not self._sending.setdefault(member.name, Budget(SIGNAL_FRAME_BUDGET)).take():
                self.counts["over-budget"] += 1
            elif member.send("chat", frame):
                self.counts["sent"] += 1

    def _introduce(self, peer: Peer) -> None:
        """A member just verified passes our announcement on to its members, so that those the broker did not
        tell of us (it lost our announcement, or is down) hear of us and begin sessions."""
        self._pending.pop(peer.name, None)
        if peer.channel_bound and peer.dialect.compact:
            made, payload = self._introduction
            if time.monotonic() - made > CLOCK_SKEW_S / 4:  # one for all members meanwhile: its copies are
                payload = self.network.envelope("connect", self.network.info(RTCHAT_PY), True, self.network.topic)
                self._introduction = (time.monotonic(), payload)  # dropped unread where they meet
            self._send([peer], payload, "*")
            self._send_pending(peer, list(self._pending)[-ASSIST_RESEND_TARGETS:])

    def _on_published(self, subtopic: str, to: str | None, payload: bytes) -> None:
        if to is None:
            if subtopic == "connect" and not self.network.signaling.is_connected:
                self._send(self._members(), payload, "*")
            return
        target = self.sessions.peers.get(to)
        if target is None or target.is_open or not target.dialect.compact:
            return  # browsers take signaling from the broker only; an open session needs none
        pending = self._pending.pop(to, [])[-1:] + [(time.monotonic(), payload)]
        self._pending[to] = pending
        if len(self._pending) > MAX_SEEN_PEERS:
            del self._pending[next(iter(self._pending))]
        carrier = self._carrier(to)
        others = [m for m in self._members(but=to) if m is not carrier]
        random.shuffle(others)
        self._send(([carrier] if carrier else []) + others[:ASSIST_MEMBERS - bool(carrier)], payload, to)

    def on_frame(self, peer: Peer, label: str, value: dict) -> None:
        """A signaling frame from a peer: for us (no "to"), to pass on to one member, or to all ("*")."""
        if not (label == "chat" and peer.is_verified and peer.channel_bound and peer.dialect.compact):
            self.counts["refused-peer"] += 1  # a browser, or a peer not bound to its key: it vouches for nothing
            return
        payload, to = value.get("p"), value.get("to")
        if not (isinstance(payload, str) and len(payload) <= (MAX_ASSISTED_BYTES + 2) // 3 * 4
                and (to is None or to == "*" or is_wire_name(to))):
            self.counts["refused-malformed"] += 1
            return
        if to is None:
            recipients = []
        elif not self.relay:
            self.counts["refused-no-relay"] += 1
            return
        else:
            recipients = self._members(but=peer.name) if to == "*" else [
                m for m in self._members(but=peer.name) if m.name == to]
            if not recipients:
                self.counts["unreachable"] += 1  # not connected to us (any more): the sender tried others too
        if not peer.allow("signal", max(1, len(recipients))):
            self.counts["refused-rate"] += 1
            return
        try:
            raw = base64.b64decode(payload, validate=True)
        except ValueError:
            self.counts["refused-malformed"] += 1
            return
        for member in recipients:
            if member.send_reply("chat", {"t": SIGNAL_FRAME, "p": payload}):
                self.counts["passed"] += 1
        if to in (None, "*"):
            self.counts["received"] += 1
            self.network.receive(self.network.topic, raw, via=peer.name)

    def sizes(self) -> dict[str, int]:
        """How big each table is (every one is bounded, whatever members pass on)."""
        return {"carriers": len(self._carriers), "pending": sum(len(p) for p in self._pending.values())}


class SessionPolicy:
    """With whom Negotiation sets up sessions: here, everyone (a full mesh). A large room's Overlay answers
    otherwise (it keeps at most D sessions with the members that gossip)."""

    def heard(self, name: str, data: Any, dialect: Dialect) -> None:
        """A member announced itself (data: its userInfo)."""

    def offered(self, name: str, data: Any, dialect: Dialect) -> None:
        """A member offered us a session (data: its userInfo)."""

    def wants(self, name: str, dialect: Dialect) -> bool:
        """A session with this member, now?"""
        return True

    def answers(self, name: str, data: Any) -> bool:
        """Answer a newcomer we want no session with (data: its userInfo), so that it can find the room?"""
        return True

    def announces(self, due: bool) -> bool:
        """Announce on schedule (due: a full mesh would)?"""
        return due


class Negotiation(Emitter):
    """How the sessions of one room begin: signaling in (through RoomSignaling), who offers, glare, fallback
    offers, candidates that come before their session, the seen table (names announced, bounded), hints that a
    live session ended (checked by ping), and set-ups that found no network path, tried again later each time.
    Uses Sessions for the sessions themselves.

    Emits "probed" (peer, alive: an unauthenticated hint that a live session ended was checked by pinging it) and
    "phase" (name, step) as a session is set up, for whoever measures it: heard, offering, offer-sent, offered,
    answer-sent, answered (Sessions emits open and verified)."""

    def __init__(self, network: RoomSignaling, admission: Admission, sessions: Sessions, trust: Trust) -> None:
        super().__init__()
        self.network = network
        self.admission = admission
        self.sessions = sessions
        self.peers = sessions.peers
        self.trust = trust
        self.me = network.me
        self.topic = network.topic
        self.running = False
        self._seen: dict[str, float] = {}     # names announced but never connected: when last heard, oldest first
        self._timers: dict[str, asyncio.TimerHandle] = {}  # per name: our fallback offer, or the next try
        self._offered_at: dict[str, float] = {}
        self._candidates: dict[str, list[dict]] = {}       # trickled before we had a session with the sender
        self._failures: dict[str, tuple[int, float]] = {}  # name -> (set-ups failed in a row, when to try again)
        self._last_setup = 0.0                # when a session last began, or a peer last answered one
        self.reached: Callable[[str], bool] = lambda name: False  # reached through another member (not waited for)
        self.policy: SessionPolicy = SessionPolicy()   # with whom to set up sessions (a large room's Overlay)
        self._tasks = Tasks()
        sessions.on("verified", lambda peer: self._failures.pop(peer.name, None))
        sessions.on("closed", self._on_closed)

    def start(self) -> None:
        self.running = True
        self._last_setup = time.monotonic()
        self.network.on("signal", self._on_signal)
        self._tasks.spawn(self._announce_loop(), f"announce-{self.topic}")

    async def close(self) -> None:
        self.running = False
        self.network.off("signal", self._on_signal)
        await self._tasks.close()

    def should_offer(self, name: str) -> bool:
        """Who offers: the side whose name sorts first as browsers sort (§4.4)."""
        return collation_key(self.me) < collation_key(name)

    def retry(self, name: str) -> None:
        """Start again with a bare name: sessions with it not open yet are dropped (they were set up under the old
        verdict on its key) and we announce, so that a new one begins (after /trust NAME)."""
        for peer in [p for p in self.peers.values() if bare_name(p.name) == name and not p.is_open]:
            self._failures.pop(peer.name, None)
            peer.close("trying again")
        self.network.announce()

    def open(self, name: str) -> None:
        """Set up a session with an rtchat.py member whichever name sorts first: a large room's overlay wants it,
        and the member may not know of us yet. A session already there or on its way is left as it is."""
        peer = self.peers.get(name)
        if peer is None or peer.state == "closed":
            peer = self._new_peer(name, RTCHAT_PY, None, None)
        if peer.state == "seen" and self.running and not self._backing_off(name):
            self._offer(peer)

    def _began(self, name: str) -> None:
        """A session with name is being set up: what is sent waits for it (see settle), unless name is reached
        another way (through a member; in a large room by gossip, where sessions come and go)."""
        if not self.reached(name):
            self._last_setup = time.monotonic()

    def note_activity(self) -> None:
        """Something that what is sent should wait for happened (a large room's member became known): the room
        settles again (see settle)."""
        self._last_setup = time.monotonic()
        self.sessions.changes.fire()

    def sizes(self) -> dict[str, int]:
        """How big each table is (every one is bounded, whatever the broker brings)."""
        return {"seen": len(self._seen), "timers": len(self._timers), "candidate_senders": len(self._candidates),
                "candidates_each": max((len(c) for c in self._candidates.values()), default=0),
                "failures": len(self._failures)}

    # -- waiting for the room --------------------------------------------------------------------------------
    def in_setup(self, now: float | None = None) -> tuple[list[Peer], float]:
        """Sessions being set up that are worth waiting for: the peer took part (it offered, or answered our
        offer), or our offer is out for less than ANSWER_WAIT_S (a name that was only announced may be made up).
        Not those with a name whose set-up failed (no network path) and is being tried again, nor those reached
        through another member meanwhile. Also how long until
        the first of those offers stops counting."""
        now = time.monotonic() if now is None else now
        waiting, soonest = [], math.inf
        for peer in self.peers.values():
            if peer.state not in ("connecting", "open") or peer.name in self._failures or self.reached(peer.name):
                continue
            if peer.signal_ts is not None:
                waiting.append(peer)
            elif now - self._offered_at.get(peer.name, -math.inf) < ANSWER_WAIT_S:
                waiting.append(peer)
                soonest = min(soonest, self._offered_at[peer.name] + ANSWER_WAIT_S - now)
        return waiting, soonest

    def trying(self, name: str) -> bool:
        """A session with name is being set up (or proving its key), and none with it has found no path yet."""
        peer = self.peers.get(name)
        return peer is not None and peer.state in ("connecting", "open") and name not in self._failures

    def unreached(self) -> list[Peer]:
        """Peers that are here but not verified: sessions worth waiting for (see in_setup), and names whose
        sessions found no network path."""
        waiting = self.in_setup()[0]
        return waiting + [p for p in self.peers.values() if p.name in self._failures and not p.is_verified
                          and p not in waiting and not self.reached(p.name)]

    async def settle(self, timeout: float, quiet: float = SETTLE_S) -> None:
        """Until no session worth waiting for is being set up (see in_setup) and none began for `quiet` seconds:
        what is sent then reaches everyone here. At most timeout."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            now = time.monotonic()
            waiting, soonest = self.in_setup(now)
            if waiting:
                left = min(left, soonest)
            elif now - self._last_setup >= quiet:
                return
            else:
                left = min(left, self._last_setup + quiet - now)
            await self.sessions.changes.next(left)

    # -- signaling in ----------------------------------------------------------------------------------------
    def _on_signal(self, signal: RoomSignal) -> None:
        handler = {"connect": self._on_connect, "RTCOffer": self._on_offer, "RTCAnswer": self._on_answer,
                   "RTCIceCandidate": self._on_candidate, "unload": self._on_unload,
                   "nameChange": self._on_name_change, "refused": self.admission.on_refused}.get(signal.subtopic)
        if handler is not None:
            handler(signal)

    def _on_connect(self, signal: RoomSignal) -> None:
        sender = signal.sender
        key, tag = user_info_fields(signal.data)
        dialect = dialect_for(tag)
        if dialect is None:
            return
        self.emit("phase", sender, "heard")
        self.network.note_dialect(dialect)
        peer = self.peers.get(sender)
        if peer is not None and peer.state not in ("seen", "closed"):
            if peer.is_open or (time.monotonic() - peer.created < STUCK_AFTER_S and not self.admission.hopeless(peer)):
                return
            peer.close("stuck; trying again")
        if not self.admission.admits(sender, key, dialect):
            return
        self.network.note_inbox(sender, signal.data, self.admission.trusts_signaling(sender, signal.signer))
        if peer is None or peer.state == "closed" or peer.key_string != key:
            peer = self._new_peer(sender, dialect, key, tag)
        # else a repeat while our offer is on its way: replacing the peer would orphan that offer's answer
        self._note_seen(sender)
        self.policy.heard(sender, signal.data, dialect)
        if self._backing_off(sender):
            return  # the next try is set
        if not self.policy.wants(sender, dialect):
            if self.policy.answers(sender, signal.data):
                self.network.answer(sender, dialect)  # a newcomer to a large room: a few members let it find us
            return
        if self.should_offer(sender):
            self._offer(peer)
        else:
            self.network.answer(sender, dialect)
            if sender not in self._timers:
                self._timers[sender] = self._tasks.later(dialect.fallback_offer_s, self._fallback_offer, sender)

    def _fallback_offer(self, name: str) -> None:
        self._timers.pop(name, None)
        peer = self.peers.get(name)
        if peer is not None and peer.state == "seen" and self.running and not self._backing_off(name) and \
                self.policy.wants(name, peer.dialect):
            self._offer(peer)

    def _offer(self, peer: Peer) -> None:
        if not self._may_start_session(peer.name, peer.key_string):
            return
        now = time.monotonic()
        if now - self._offered_at.get(peer.name, -OFFER_DEDUP_S) < OFFER_DEDUP_S:
            return
        self._offered_at[peer.name] = now
        self._began(peer.name)
        handle = self._timers.pop(peer.name, None)
        if handle:
            handle.cancel()
        peer.begin()  # counted as a session in set-up from now on
        self._seen.pop(peer.name, None)
        self.emit("phase", peer.name, "offering")
        self._tasks.spawn(self._send_offer(peer), f"offer-{peer.name}")

    async def _send_offer(self, peer: Peer) -> None:
        if self.peers.get(peer.name) is not peer:
            return  # replaced or closed before its turn came
        try:
            sdp = await peer.create_offer()
        except Exception as exc:
            peer.close(f"could not make an offer: {exc}")
            return
        if peer.state != "closed" and self.running:
            self.network.publish("RTCOffer", {"userInfo": self.network.info(peer.dialect), "offer": {
                "localDescription": {"type": "offer", "sdp": slim_sdp(sdp)}, "target": peer.name}}, to=peer.name,
                compact=peer.dialect.compact)
            self.emit("phase", peer.name, "offer-sent")

    def _on_offer(self, signal: RoomSignal) -> None:
        sender, data = signal.sender, signal.data
        offer = data.get("offer") if isinstance(data, dict) else None
        if not isinstance(offer, dict) or offer.get("target") != self.me:
            return  # not for us: never prompt or act on others' offers (§9.1 #4)
        description = offer.get("localDescription")
        sdp = description.get("sdp") if isinstance(description, dict) else None
        if not isinstance(sdp, str) or len(sdp) > 32768:
            return
        key, tag = user_info_fields(data.get("userInfo"))
        dialect = dialect_for(tag)
        if dialect is None:
            return
        self.network.note_dialect(dialect)
        if dialect.compact and signal.signer is None and signal.mkey is None:
            return  # rtchat.py signs every offer: this is a copy with the signature stripped
        key = key or signal.signer
        if not self.admission.admits(sender, key, dialect):
            return
        self.network.note_inbox(sender, data.get("userInfo"), self.admission.trusts_signaling(sender, signal.signer))
        self.policy.offered(sender, data.get("userInfo"), dialect)
        existing = self.peers.get(sender)
        if existing is not None and existing.state != "closed":
            if existing.signal_ts is not None and signal.stamp <= existing.signal_ts:
                return  # older than what set up the current session: a replay (e.g. to us after a restart)
            if signal.signer is None and (existing.signed_key or (existing.signal_mkey
                                                                  and signal.mkey != existing.signal_mkey)):
                return  # an offer never replaces a session set up by signed signaling unless signed alike
        if existing is not None and existing.state not in ("seen", "closed"):
            if existing.awaits_answer and (dialect.yields_in_glare or self.should_offer(sender)):
                return  # glare: ours stands; a browser gives up its own offer and answers ours (§4.4)
            if existing.is_open:
                self._tasks.spawn(self._replace_if_dead(existing, signal, sdp, key, dialect, tag), f"probe-{sender}")
                return
            existing.close("replaced by a new offer")
        elif not self._may_start_session(sender, signal.signer):  # an unsigned offer proves no key
            return
        self._answer(signal, sdp, key, dialect, tag)

    async def _replace_if_dead(self, existing: Peer, signal: RoomSignal, sdp: str, key: str | None,
                               dialect: Dialect, tag: str | None) -> None:
        """An offer for a live session is a reload or a forgery: answer only if the old session is dead."""
        if signal.signer is None and await existing.probe():
            log.info("ignored an offer in %s's name: the current session is alive", signal.sender)
            self.emit("probed", existing, True)
            return
        existing.close("replaced by a new session")
        self._answer(signal, sdp, key, dialect, tag)

    def _answer(self, signal: RoomSignal, sdp: str, key: str | None, dialect: Dialect, tag: str | None) -> None:
        peer = self._new_peer(signal.sender, dialect, key, tag)
        peer.begin(signal.signer, signal.mkey, signal.stamp)
        self._began(peer.name)
        self.emit("phase", peer.name, "offered")
        self._tasks.spawn(self._send_answer(peer, sdp), f"answer-{peer.name}")

    async def _send_answer(self, peer: Peer, sdp: str) -> None:
        try:
            answer = await peer.accept_offer(sdp)
        except Exception as exc:
            peer.close(f"bad offer: {exc}")
            return
        if peer.state != "closed" and self.running:
            self.network.publish("RTCAnswer", {"localDescription": {"type": "answer", "sdp": slim_sdp(answer)},
                                               "target": peer.name}, to=peer.name, compact=peer.dialect.compact)
            self.emit("phase", peer.name, "answer-sent")

    def _on_answer(self, signal: RoomSignal) -> None:
        data = signal.data
        if not isinstance(data, dict) or data.get("target") != self.me:
            return
        peer = self.peers.get(signal.sender)
        description = data.get("localDescription")
        sdp = description.get("sdp") if isinstance(description, dict) else None
        if peer is None or not peer.awaits_answer or not isinstance(sdp, str) or len(sdp) > 32768:
            return  # only the peer we offered to, and only once (§9.2)
        if signal.signer is None and signal.mkey is None and peer.dialect.compact:
            return  # rtchat.py signs its answers
        self._began(peer.name)
        self._tasks.spawn(self._accept_answer(peer, peer.accept_answer(sdp, signal.signer, signal.mkey,
                                                                       signal.stamp)), f"accept-{peer.name}")

    async def _accept_answer(self, peer: Peer, applying: Awaitable[None]) -> None:
        try:
            await applying
        except Exception as exc:
            peer.close(f"bad answer: {exc}")
            return
        self.emit("phase", peer.name, "answered")

    def _on_candidate(self, signal: RoomSignal) -> None:
        if not isinstance(signal.data, dict):
            return
        peer = self.peers.get(signal.sender)
        if peer is not None:  # it buffers until it has the remote description
            self._tasks.spawn(peer.add_candidate(signal.data), f"candidate-{signal.sender}")
        elif len(self._candidates) < 256:
            pending = self._candidates.setdefault(signal.sender, [])
            if len(pending) < MAX_PENDING_CANDIDATES:
                pending.append(signal.data)

    def _on_unload(self, signal: RoomSignal) -> None:
        peer = self.peers.get(signal.sender)
        if peer is None:
            return
        signed = signal.signer is not None or signal.mkey is not None
        if signed and peer.signal_ts is not None and signal.stamp < peer.signal_ts:
            return  # sent before the current session began: a replay
        if (signal.signer is not None and signal.signer == peer.key_string) or (
                signal.mkey is not None and signal.mkey == peer.signal_mkey) or (
                not peer.is_open and not peer.signed_key and not peer.signal_mkey):
            peer.close("left")
        elif peer.is_open:
            self._tasks.spawn(self._close_if_dead(peer, "left"), f"probe-{signal.sender}")

    def _on_name_change(self, signal: RoomSignal) -> None:
        """Only a hint (§9.2), and about someone else: an open browser session is probed, nothing else is touched.
        rtchat.py peers never send nameChange (they leave and announce again), so it is never about them."""
        data = signal.data
        if isinstance(data, dict) and data.get("newName") == signal.sender and isinstance(data.get("oldName"), str):
            peer = self.peers.get(data["oldName"])
            if peer is not None and peer.is_open and not peer.signed_key \
                    and not self.trust.signs(bare_name(peer.name)):
                self._tasks.spawn(self._close_if_dead(peer, "left"), f"probe-{peer.name}")

    async def _close_if_dead(self, peer: Peer, reason: str) -> None:
        """An unauthenticated hint that a live session ended: it is closed only if it stops answering pings."""
        for _ in range(2):  # a browser publishes unload from beforeunload, while its page may still answer a ping
            if not await peer.probe():
                peer.close(reason)
                self.emit("probed", peer, False)
                return
            await asyncio.sleep(PROBE_TIMEOUT_S)
        self.emit("probed", peer, True)

    # -- the sessions ----------------------------------------------------------------------------------------
    async def _announce_loop(self) -> None:
        """Announce at join, then on a schedule while someone we know of is not connected (or nobody is known):
        browsers offer only on hearing us, and a pair that failed is retried this way. At the steady pace, the
        member that sorts first among those connected to it announces anyway: on brokers joined by a bridge, the
        groups a bridge failure kept apart have no other reason to announce when it is back, and cannot see it."""
        self.network.announce()
        schedule = itertools.chain(ANNOUNCE_EVERY_S[:-1], itertools.repeat(ANNOUNCE_EVERY_S[-1]))
        for tick, delay in enumerate(schedule):
            await asyncio.sleep(delay)
            self._expire_seen()
            steady = tick >= len(ANNOUNCE_EVERY_S) - 1
            due = not self.peers or not all(p.is_open for p in self.peers.values()) or (steady and self._sorts_first())
            if self.policy.announces(due):
                self.network.announce()

    def _sorts_first(self) -> bool:
        """We sort first (as who offers is decided) among us and the rtchat.py peers we are connected to, so one
        member of each group connected together keeps announcing (browsers announce only while alone)."""
        return all(self.should_offer(p.name) for p in self.peers.values() if p.is_open and p.is_rtchat_py)

    def _may_start_session(self, name: str, key: str | None) -> bool:
        """Each session being set up is a PeerConnection: a bounded number, except for a key pinned for the name."""
        pending = sum(1 for p in self.peers.values() if p.state == "connecting" and p.name != name)
        if pending < MAX_PENDING_SESSIONS or (key is not None and fingerprint(key) in self.trust.pins_for(
                bare_name(name))):
            return True
        log.debug("too many sessions being set up: ignored %r", name)
        return False

    def _note_seen(self, name: str) -> None:
        """A name announced: until it connects it is kept among the newest MAX_SEEN_PEERS, for SEEN_EXPIRE_S after
        it was last heard, so a flood of made-up names costs a bounded table and the same work per name."""
        self._seen.pop(name, None)
        self._seen[name] = time.monotonic()
        self._expire_seen()

    def _expire_seen(self) -> None:
        now = time.monotonic()
        while self._seen:
            name, heard = next(iter(self._seen.items()))
            if len(self._seen) <= MAX_SEEN_PEERS and now - heard < SEEN_EXPIRE_S:
                return
            del self._seen[name]
            peer = self.peers.get(name)
            if peer is not None and peer.state == "seen":
                handle = self._timers.pop(name, None)
                if handle is not None:
                    handle.cancel()
                self._failures.pop(name, None)
                peer.close("not heard from")

    def _backing_off(self, name: str) -> bool:
        return time.monotonic() < self._failures.get(name, (0, -math.inf))[1]

    def _back_off(self, failed: Peer) -> None:
        """Its set-up failed for want of a network path: try again after RETRY_AFTER_S, twice that after the next
        failure, and so on up to RETRY_MAX_S (each try is a new connection, and a TURN allocation). Meanwhile the
        name stays listed as seen."""
        name = failed.name
        count = self._failures.pop(name, (0, 0.0))[0] + 1
        delay = min(RETRY_AFTER_S * 2 ** (count - 1), RETRY_MAX_S)
        self._failures[name] = (count, time.monotonic() + delay)
        if len(self._failures) > MAX_SEEN_PEERS:
            del self._failures[next(iter(self._failures))]
        self._new_peer(name, failed.dialect, failed.key_string, failed.client_tag)
        self._note_seen(name)
        handle = self._timers.pop(name, None)
        if handle is not None:
            handle.cancel()
        self._timers[name] = self._tasks.later(delay, self._try_again, name)

    def _try_again(self, name: str) -> None:
        self._timers.pop(name, None)
        peer = self.peers.get(name)
        if peer is None or peer.state != "seen" or not self.running or not self.policy.wants(name, peer.dialect):
            return
        if self.should_offer(name):
            self._offer(peer)
        else:
            self.network.answer(name, peer.dialect)  # it offers when it hears us

    def _new_peer(self, name: str, dialect: Dialect, key: str | None, tag: str | None) -> Peer:
        self._seen.pop(name, None)
        return self.sessions.add(name, dialect, key, tag, self._candidates.pop(name, []))

    def _on_closed(self, peer: Peer, reason: str) -> None:
        """A session ended: if it was the name's (not replaced), what we knew of how to reach the name goes; a
        set-up that found no network path is tried again later; else the other side may still be there."""
        name = peer.name
        if name not in self.peers:
            self.network.forget(name)
            self._offered_at.pop(name, None)
        if not self.running or reason == "we left":
            return
        if reason == "left":
            self._failures.pop(name, None)
        elif peer.remote_sdp is not None and not peer.was_open and reason in SETUP_FAILURES and name not in self.peers:
            self._back_off(peer)
        elif peer.remote_sdp is not None and not reason.startswith("replaced") and self.policy.wants(name,
                                                                                                   peer.dialect):
            self.network.answer(name, peer.dialect)  # the other side may still be there: let it offer again


# =============================================================================
# Messages: a chat line and a question as the parts below pass them around,
# with the id that binds a message to its author and words (message_id).
# =============================================================================

FINGERPRINT_RE = re.compile(r"[0-9a-f]{64}")


@dataclasses.dataclass
class Message:
    """A chat line. ts is epoch ms; trust: 'channel-bound', 'legacy', 'relayed', 'unverified' or 'self'.

    sender is the author's wire name; relayed_by names the peer that passed it on (backfill, or live from a member
    we have no path to: see Routes). text is exactly what
    the author sent (clean() it before showing it). id is message_id() of the rest, with salt; sig is the author's
    signature, of the message or (with proof) of the batch it was signed in, kept so the message can be passed on
    unaltered and checked alone. fingerprint is the author's key as checked by us;
    claimed_fingerprint the one an unverified relay named. lookalike: a known name the sender's looks like.
    history: said before we came (kept on disk, or passed on by a peer when we met), not news.
    """
    id: str
    room: str
    sender: str
    text: str
    ts: int
    kind: str = "message"          # "message" or "dm"
    fingerprint: str | None = None
    trust: str = "unverified"
    action: bool = False
    to: str | None = None
    relayed_by: str | None = None
    sig: str | None = None
    history: bool = False
    salt: str | None = None
    claimed_fingerprint: str | None = None
    lookalike: str | None = None
    proof: dict | None = None

    def to_dict(self) -> dict:
        """The --json form."""
        data = {"type": self.kind, "room": self.room, "from": self.sender, "text": self.text, "ts": self.ts,
                "id": self.id, "fingerprint": self.fingerprint, "trust": self.trust, "action": self.action}
        if self.to:
            data["to"] = self.to
        if self.relayed_by:
            data["relayed_by"] = self.relayed_by
        if self.history:
            data["history"] = True
        if self.lookalike:
            data["lookalike"] = self.lookalike
        return data

    def record(self) -> dict:
        """The history form: the --json form plus what checks it later (salt, signature, a claimed key); every
        entry there is history."""
        record = self.to_dict()
        record.pop("history", None)
        for field in ("sig", "salt", "claimed_fingerprint", "proof"):
            if getattr(self, field):
                record[field] = getattr(self, field)
        return record

    def frame(self) -> dict:
        """The frame that carries it to an rtchat.py peer (PROTOCOL.md, Messages)."""
        frame = {"t": "msg", "id": self.id, "ts": self.ts, "text": self.text, "action": self.action}
        if self.salt is not None:  # an outbox entry written by rtchat.py 0.2 has none: it goes as 0.2 sent it
            frame["salt"] = self.salt
        if self.sig is not None:
            frame["sig"] = self.sig
        return frame

    def bound_id(self) -> str:
        """The id this message must have (see message_id)."""
        return message_id(self.sender, self.fingerprint or self.claimed_fingerprint, self.ts, self.text, self.action,
                          self.salt or "")

    def signed_part(self, topic: str) -> bytes:
        return signed_bytes("message", topic, self.sender, self.id, self.ts, self.text, self.action)

    def is_signed_by(self, message_public: str, topic: str, checked: dict | None = None) -> bool:
        """Is sig (with proof: a batch signature) by this message key, over this message as it is? checked: the
        batch signatures checked so far, so that a batch passed on whole is checked once."""
        if not self.sig:
            return False
        signed = self.signed_part(topic)
        if self.proof is None:
            return verify_message(message_public, self.sig, signed)
        fields = batch_proof_fields(self.proof)
        root = batch_root(batch_leaf(signed), *fields) if fields else None
        if root is None:
            return False
        key = (message_public, self.sig, root, fields[1])
        if checked is None or key not in checked:
            genuine = verify_batch(message_public, self.sig, root, fields[1])
            if checked is None:
                return genuine
            checked[key] = genuine
        return checked[key]

    @classmethod
    def from_dict(cls, data: dict) -> Message:
        def text_or_none(key: str) -> str | None:
            return data[key] if isinstance(data.get(key), str) else None
        return cls(id=str(data.get("id", "")), room=str(data.get("room", "")), sender=str(data.get("from", "")),
                   text=str(data.get("text", "")), ts=data["ts"] if valid_ts(data.get("ts")) else 0,
                   kind=str(data.get("type", "message")),
                   fingerprint=data.get("fingerprint"), trust=str(data.get("trust", "unverified")),
                   action=bool(data.get("action")), to=data.get("to"), relayed_by=data.get("relayed_by"),
                   sig=text_or_none("sig"), salt=text_or_none("salt"),
                   claimed_fingerprint=text_or_none("claimed_fingerprint"), lookalike=text_or_none("lookalike"),
                   proof=data["proof"] if isinstance(data.get("proof"), dict) else None)


@dataclasses.dataclass
class Question:
    """What a question handler gets: who asked, the topic (e.g. 'time') and the rest of the question."""
    sender: Peer
    topic: str
    content: Any


def valid_ts(stamp: Any) -> bool:
    """Epoch milliseconds a terminal can show (a peer's 10**23 would crash time.localtime)."""
    return isinstance(stamp, int) and not isinstance(stamp, bool) and 0 <= stamp < 253402300800000  # year 9999


# =============================================================================
# Files: file transfer between rtchat.py peers in one room, both directions, on
# channels of their own. Uses Peer; disk work runs in worker threads. Emits
# "file" and "file-progress"; knows no Room (Room hands it channels and peers).
# =============================================================================

FILE_READ_BYTES = 256 * 1024            # a file being sent is read (and hashed) in a worker thread this much at once
FILE_BACKLOG_BYTES = 64 * 1024 ** 2     # received bytes waiting for the disk; beyond, the disk is too slow: given up


def human_size(size: float) -> str:
    for unit in ("bytes", "KB", "MB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


def safe_file_name(name: Any) -> str:
    """A peer's file name made harmless: no directories, no hidden files, no control characters, and short
    enough (in bytes) for any file system with room for ' (99)' and our '.part' suffix."""
    name = clean(name, 120).replace("/", "_").replace("\\", "_").strip().lstrip(".")
    name = name.encode()[:150].decode(errors="ignore")
    return name or "file"


def unused_path(folder: Path, name: str) -> Path:
    stem, dot, ext = name.rpartition(".") if "." in name else (name, "", "")
    candidates = (folder / (name if n == 0 else f"{stem} ({n}){dot}{ext}") for n in itertools.count())
    return next(p for p in candidates if not os.path.lexists(p))


def _read_hashed(f, size: int, digest) -> bytes:
    """Up to size bytes of f, added to digest (in a worker thread: hashlib lets go of the GIL for big blocks)."""
    block = f.read(size)
    digest.update(block)
    return block


def _write_hashed(fd: int, data: bytes, digest, sync: bool) -> None:
    write_all(fd, data)
    digest.update(data)
    if sync:  # to disk as it comes: the fsync at the end has little left to do
        getattr(os, "fdatasync", os.fsync)(fd)


def _open_part(folder: Path, name: str, size: int, reserved: int) -> tuple[Path, int] | None:
    """A new .part file (0600) for a file of size bytes; None if the disk has no room for it besides the other files
    on their way (reserved) and FILE_DISK_RESERVE."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    if shutil.disk_usage(folder).free < size + reserved + FILE_DISK_RESERVE:
        return None
    part = unused_path(folder, name + f".{new_id()}.part")
    return part, open_own(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL)


def _keep_part(fd: int, part: Path, folder: Path, name: str) -> Path:
    """Sync the .part file, then give it a free name: taken first (O_EXCL), then the file put there, so nothing is
    ever replaced."""
    sync_and_close(fd)
    for _ in range(100):
        path = unused_path(folder, name)
        try:
            os.close(open_own(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            continue
        os.replace(part, path)
        return path
    raise OSError(errno.EEXIST, "no free name")


def _drop_part(fd: int, part: Path | None) -> None:
    if fd >= 0:
        os.close(fd)
    if part is not None:
        with contextlib.suppress(OSError):
            part.unlink()


@dataclasses.dataclass
class ReceivedFile:
    """What the 'file' event carries: a file a peer sent us, checked and saved."""
    room: str
    sender: str
    name: str
    path: Path
    size: int
    sha256: str
    fingerprint: str | None


@dataclasses.dataclass
class Transfer:
    """A file on its way, in or out: what every 'file-progress' event carries, from the offer to the end.

    state: 'offered', 'moving', 'checking' (all bytes sent, the receiver checks them), 'done' or 'failed'
    (error says why). done counts bytes; started is time.monotonic() at the offer, for rates."""
    id: str
    room: str
    peer: str
    name: str
    size: int
    incoming: bool
    done: int = 0
    state: str = "offered"
    error: str | None = None
    started: float = dataclasses.field(default_factory=time.monotonic)
    reported: float = dataclasses.field(default=-math.inf, repr=False)

    @property
    def is_over(self) -> bool:
        return self.state in ("done", "failed")


class IncomingFile:
    """One file arriving on its own channel: a JSON header (name, size), then raw chunks, then its SHA-256
    (or the SHA-256 in the header); we answer go-ahead, then done.

    Its bytes go to a .part file (0600) from a task of its own, in a worker thread (hashed there too, and synced to
    disk as they come); once its SHA-256 matches it is given its name, never over an existing file. It tells its
    Files when it ends; Files alone keeps the table of files under way."""

    def __init__(self, files: Files, peer: Peer, channel, tasks: Tasks) -> None:
        self.files, self.peer, self.channel = files, peer, channel
        self.header: dict | None = None
        self.transfer: Transfer | None = None    # what the room reports, once the header is accepted
        self.got = 0                             # bytes received
        self.mark = 0                            # bytes it had at the last progress check
        self.over = False                        # saved or failed: nothing more is taken
        self._blocks: list[bytes] = []           # received, not yet handed to the disk
        self._queued = 0
        self._wake = asyncio.Event()
        self._tasks = tasks
        self._writing = False                    # its task holds a .part file: it removes it, then says why it ended
        self._failed: tuple[str, bool] | None = None  # why, and whether to tell the sender, once it has
        channel.on("message", self._on_data)
        channel.on("close", lambda: self.fail("the sender went away", tell=False))
        tasks.later(FILE_IDLE_S, self._check_progress)

    @property
    def waiting_bytes(self) -> int:
        """What the disk still has to take for this file (counted against free space for the next one)."""
        return self.header["size"] - self.got + self._queued if self.header else 0

    def _on_data(self, data: Any) -> None:
        if self.over:
            return
        if self.header is None:
            self._start(data)
        elif self.got == self.header["size"] and isinstance(data, str):  # the trailer: its SHA-256
            trailer = small_json(data)
            digest = trailer.get("sha256") if isinstance(trailer, dict) else None
            if not (isinstance(digest, str) and len(digest) == 64) or self.header["sha256"]:
                self.fail("a malformed file trailer")
            else:
                self.header["sha256"] = digest
                self._wake.set()
        elif not isinstance(data, bytes):
            self.fail("its SHA-256 came before the whole file")
        elif self.got + len(data) > self.header["size"]:
            self.fail("more data than announced")
        elif self._queued + len(data) > FILE_BACKLOG_BYTES:
            self.fail("the disk does not keep up")
        else:
            self._blocks.append(data)
            self._queued += len(data)
            self.got += len(data)
            self.transfer.done = self.got
            self.files.report(self.transfer, "moving")
            self._wake.set()

    def _start(self, data: Any) -> None:
        header = small_json(data)
        digest = header.get("sha256") if isinstance(header, dict) else None
        if not (isinstance(header, dict) and isinstance(header.get("size"), int) and not isinstance(
                header["size"], bool) and (digest is None or (isinstance(digest, str) and len(digest) == 64))):
            self.fail("a malformed file header")
            return
        if not 0 <= header["size"] <= MAX_FILE_BYTES:
            self.fail(f"too large (at most {MAX_FILE_BYTES >> 20} MiB)")
            return
        self.header = {"name": safe_file_name(header.get("name")), "size": header["size"], "sha256": digest}
        self.transfer = Transfer(new_id(), self.files.room, self.peer.name, self.header["name"], header["size"], True)
        self._tasks.spawn(self._receive(), f"file-{self.peer.name}")

    async def _receive(self) -> None:
        """The only code that touches the .part file: open it, write what comes, then check and keep it."""
        name, size = self.header["name"], self.header["size"]
        self._writing, part, fd = True, None, -1
        try:
            try:
                opened = await off_loop(_open_part, self.files.folder, name, size, self.files.reserved(self))
            except OSError as exc:
                self.fail(f"cannot write: {exc.strerror}")
                return
            if opened is None:
                self.fail("not enough free space")
                return
            (part, fd), digest, synced = opened, hashlib.sha256(), 0
            if self.over:
                return
            self.files.report(self.transfer)  # the receiver hears of a file when it starts, not when it is complete
            self._reply({"ok": True})
            while not self.over and (self._blocks or self.got < size or not self.header["sha256"]):
                if not self._blocks:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                data, self._blocks = b"".join(self._blocks), []
                sync = self.got - synced >= FILE_SYNC_BYTES
                try:
                    await off_loop(_write_hashed, fd, data, digest, sync)
                except OSError as exc:
                    self.fail(f"cannot write: {exc.strerror}")
                    return
                self._queued -= len(data)
                synced = self.got if sync else synced
            if self.over:
                return
            self.over = True  # all of it is here: what happens now (the sender leaving, say) changes nothing
            if digest.hexdigest() != self.header["sha256"].lower():
                self._failed = ("the SHA-256 does not match", True)
                return
            kept, fd = fd, -1  # _keep_part closes it, whatever happens
            try:
                path = await off_loop(_keep_part, kept, part, self.files.folder, name)
            except (OSError, StateError) as exc:
                self._failed = (f"cannot save: {exc}", True)
                return
            part = None
            self._reply({"ok": True, "saved": path.name})
            self.files.received(self, ReceivedFile(self.files.room, self.peer.name, name, path, size,
                                                   self.header["sha256"], self.peer.fingerprint))
        finally:
            if fd >= 0 or part is not None:
                await off_loop(_drop_part, fd, part)
            self._writing = False
            if self._failed is not None:
                self._end(*self._failed)

    def fail(self, reason: str, tell: bool = True) -> None:
        """Refuse the rest. The .part file, if there is one, is removed before the sender and the room hear of it."""
        if self.over:
            return
        self.over = True
        if self._writing:
            self._failed = (reason, tell)
            self._wake.set()  # the writing task sees it, removes the .part file, then ends
        else:
            self._end(reason, tell)

    def _end(self, reason: str, tell: bool = True) -> None:
        if tell:
            self._reply({"ok": False, "error": reason})
        if self.transfer is not None:
            self.transfer.error = reason
        self.files.ended(self)
        self.channel.close()

    def _reply(self, value: dict) -> None:
        if self.channel.readyState == "open":
            self.channel.send(to_json(value))

    def _check_progress(self) -> None:
        """Every FILE_IDLE_S a transfer must bring FILE_MIN_PROGRESS bytes (or the rest, then its end): a trickle
        must not hold one of the few slots for ever."""
        if self.over:
            return
        wanted = min(FILE_MIN_PROGRESS, self.header["size"] - self.mark) if self.header else 1
        moved, self.mark = self.got - self.mark, self.got
        if self.header is None or moved < wanted or wanted == 0:
            self.fail(f"less than {FILE_MIN_PROGRESS >> 10} KiB came in {FILE_IDLE_S:g} s")
        else:
            self._tasks.later(FILE_IDLE_S, self._check_progress)


class Files:
    """File transfer in one room: files rtchat.py peers offer us (each an IncomingFile, into folder) and files we
    send (send()). The table of files under way is kept here and changed only here."""

    def __init__(self, room: str, folder: Path | None, emit: Callable[..., None]) -> None:
        self.room = room
        self.folder = folder                  # where received files go; None: they are refused
        self._emit = emit
        self._incoming: set[IncomingFile] = set()
        self._tasks = Tasks()

    @property
    def takes_files(self) -> bool:
        return self.folder is not None

    def receiving(self) -> int:
        """Files being received now, each holding one of MAX_INCOMING_FILES slots."""
        return len(self._incoming)

    def offered(self, peer: Peer, channel) -> None:
        """A verified peer opened a channel for a file: taken if there is a slot for it (and for its sender)."""
        if self.folder is None or not (peer.is_verified and peer.can("files")) or \
                len(self._incoming) >= MAX_INCOMING_FILES or not peer.allow("file") or \
                sum(f.peer is peer for f in self._incoming) >= MAX_FILES_PER_PEER:
            channel.close()
            return
        self._incoming.add(IncomingFile(self, peer, channel, self._tasks))

    def reserved(self, but: IncomingFile) -> int:
        """Bytes the other files under way still need on disk."""
        return sum(f.waiting_bytes for f in self._incoming if f is not but)

    def ended(self, incoming: IncomingFile) -> None:
        self._incoming.discard(incoming)
        if incoming.transfer is not None:
            self.report(incoming.transfer, "failed")

    def received(self, incoming: IncomingFile, got: ReceivedFile) -> None:
        self._incoming.discard(incoming)
        self.report(incoming.transfer, "done")
        self._emit("file", got)

    def report(self, transfer: Transfer, state: str | None = None) -> None:
        """A 'file-progress' event: at once for a change of state, at most every FILE_PROGRESS_EVERY_S for bytes."""
        now = time.monotonic()
        if state is None or state == transfer.state:
            if now - transfer.reported < FILE_PROGRESS_EVERY_S:
                return
        transfer.state = state or transfer.state
        transfer.reported = now
        self._emit("file-progress", transfer)

    async def send(self, peer: Peer, path: Path, label: str,
                   progress: Callable[[int, int], Any] | None = None) -> str:
        """Send a file to a verified rtchat.py peer that takes files (label: its name as shown); the name it was
        saved under, once the peer has all of it on disk with the right SHA-256. RtchatError if it refuses or
        fails."""
        try:
            size = (await off_loop(path.stat)).st_size
        except OSError as exc:
            raise UsageError(f"cannot read {path}: {exc.strerror}") from None
        transfer = Transfer(new_id(), self.room, peer.name, path.name, size, incoming=False)
        self.report(transfer)
        channel = None
        try:
            channel = await peer.open_channel(f"file/{transfer.id}")
            replies: asyncio.Queue = asyncio.Queue()
            channel.on("message", replies.put_nowait)
            channel.on("close", lambda: replies.put_nowait(None))
            channel.send(to_json({"name": path.name, "size": size}))
            await self._reply(label, replies)  # the go-ahead
            digest = await self._stream(channel, path, size, replies, transfer, progress)
            if channel.readyState == "open" and replies.empty():
                channel.send(to_json({"sha256": digest}))  # hashed on the way: the file is read once
            self.report(transfer, "checking")
            saved = clean((await self._reply(label, replies)).get("saved"), 255)
            self.report(transfer, "done")
            return saved
        except OSError as exc:
            transfer.error = f"cannot read {path}: {exc.strerror}"
            raise RtchatError(transfer.error) from None
        except BaseException as exc:
            transfer.error = str(exc) if isinstance(exc, RtchatError) else type(exc).__name__
            raise
        finally:
            if transfer.error is not None:
                self.report(transfer, "failed")
            if channel is not None:
                channel.close()

    @staticmethod
    async def _reply(label: str, replies: asyncio.Queue) -> dict:
        try:
            data = await asyncio.wait_for(replies.get(), FILE_IDLE_S)
        except asyncio.TimeoutError:
            raise RtchatError(f"{label} did not answer about the file within {FILE_IDLE_S:g} s") from None
        reply = small_json(data)
        if not isinstance(reply, dict):
            raise RtchatError(f"{label} closed the transfer")
        if reply.get("ok") is not True:
            raise RtchatError(f"{label} refused the file: {clean(reply.get('error'), 200)}")
        return reply

    async def _stream(self, channel, path: Path, size: int, replies: asyncio.Queue, transfer: Transfer,
                      progress: Callable[[int, int], Any] | None) -> str:
        """Chunks as fast as the channel drains them, read and hashed in a worker thread a block at a time (the
        SHA-256 is returned); stops early if the receiver speaks up (it gave up)."""
        digest = hashlib.sha256()
        low, high = FILE_BUFFER_BYTES
        f = await off_loop(path.open, "rb")
        try:
            left = size
            while left > 0 and replies.empty():
                block = await off_loop(_read_hashed, f, min(FILE_READ_BYTES, left), digest)
                if not block:
                    raise RtchatError(f"{path} got shorter while it was being sent")
                for start in range(0, len(block), FILE_CHUNK_BYTES):
                    if not replies.empty():
                        break  # the receiver gave up: its reason follows
                    if channel.bufferedAmount > high and not await channel_drained(channel, low, FILE_IDLE_S):
                        if channel.readyState == "open":
                            raise RtchatError(f"the transfer stalled for {FILE_IDLE_S:g} s")
                        raise RtchatError("the connection closed during the transfer")
                    if channel.readyState != "open":
                        raise RtchatError("the connection closed during the transfer")
                    chunk = block[start:start + FILE_CHUNK_BYTES]
                    channel.send(chunk)
                    left -= len(chunk)
                    transfer.done = size - left
                    self.report(transfer, "moving")
                    if progress is not None:
                        progress(size - left, size)
        finally:
            await off_loop(f.close)
        return digest.hexdigest()

    async def close(self) -> None:
        """Files on their way in are given up (their .part files removed); then every task has ended."""
        for incoming in list(self._incoming):
            incoming.fail("we left", tell=False)
        await self._tasks.close()


# =============================================================================
# Ledger: chat and direct messages once a session is verified. What is taken
# (live, or passed on as history), written to disk and acknowledged; signatures
# (one per batch of our messages); hello, sync and backfill; the outbox; members
# reached through others (Routes). Owns the history log. Uses Peer's send and
# Trust; emits typed events; knows no Room.
# =============================================================================

@dataclasses.dataclass(frozen=True)
class Scope:
    """What the ledger's parts know of the room they serve: its name and topic, who we are, whom we trust."""
    room: str
    topic: str
    me: str
    identity: Identity
    store: Store
    trust: Trust

    def author(self, fp: str | None) -> dict | None:
        """What a third party needs to check a message by fp: identity key, message key, certificate."""
        if fp == self.identity.fingerprint:
            return {"key": self.identity.public_key_string, "mkey": self.identity.message_public,
                    "mcert": self.identity.message_cert}
        return self.store.data["authors"].get(fp)


class Journal:
    """The room's history as written: the log, the ids in it or on their way there, and the writes. What comes
    within COMMIT_GATHER_S (no more often than every COMMIT_EVERY_S while messages keep coming) is written at once,
    fsynced in a worker thread, and only then acknowledged. Our messages sent ahead of their signature are signed
    here, one signature per batch. While the disk refuses (full, say) what came is kept (up to MAX_PENDING_WRITES)
    and tried again every DISK_RETRY_S: one disk-error event, no acks, then disk-ok and the acks once written."""

    def __init__(self, scope: Scope, log: HistoryLog, emit: Callable[..., None], tasks: Tasks, done: Pulse) -> None:
        self.scope, self.log, self._emit, self._tasks = scope, log, emit, tasks
        self.pending: set[str] = set()           # ids on their way to disk: not acknowledged yet
        self.done = done                         # fired after each write, and when writing stops
        self.stopped = False                     # the room is left: a refusing disk is not tried again
        self._known: dict[str, None] = {}        # ids in the log or on their way there (the newest MAX_KNOWN_IDS)
        self._queue: list[tuple[dict, Peer | None, str, str]] = []  # entry, ack to, on label, as id
        self._own: list[tuple[Message, dict, list[tuple[Peer, str]]]] = []  # ours, sent ahead of their signature
        self._disk_error: str | None = None
        self._compaction_failed = False
        self._writing: asyncio.Task | None = None
        self._last = 0.0

    async def open(self) -> list[dict]:
        """Read the log (in a worker thread): its entries, whose ids are known from now on."""
        entries = await off_loop(self.log.entries)
        self._known = dict.fromkeys(e["id"] for e in entries)
        return entries

    @property
    def idle(self) -> bool:
        return self._writing is None

    def knows(self, msg_id: str) -> bool:
        return msg_id in self._known

    @property
    def known_count(self) -> int:
        """How many ids are remembered (at most MAX_KNOWN_IDS)."""
        return len(self._known)

    def remember(self, msg_id: str) -> None:
        self._known[msg_id] = None
        if len(self._known) > MAX_KNOWN_IDS:
            del self._known[next(iter(self._known))]

    def add(self, entry: dict, ack_to: Peer | None = None, ack_label: str = "chat", ack_id: str | None = None) -> None:
        """An entry to write; with ack_to, that rtchat.py peer is told (as ack_id) once it is on disk."""
        self.remember(entry["id"])
        self.pending.add(entry["id"])
        self._queue.append((entry, ack_to, ack_label, ack_id or entry["id"]))
        if self._writing is None:
            self._writing = self._tasks.spawn(self._write(), f"commit-{self.scope.room}")

    def add_own(self, msg: Message, sent: list[tuple[Peer, str]]) -> None:
        """Our message, sent (to these peers, on these channels): unless it went out signed, it is signed with the
        next write, and those peers are sent what checks it."""
        entry = msg.record()
        if msg.sig is None:
            self._own.append((msg, entry, sent))
        self.add(entry)

    async def _write(self) -> None:
        try:
            while self._queue and not (self.stopped and self._disk_error):
                pace = DISK_RETRY_S if self._disk_error else COMMIT_EVERY_S
                await asyncio.sleep(max(COMMIT_GATHER_S, self._last + pace - time.monotonic()))
                self._last = time.monotonic()
                batch, self._queue = self._queue, []
                own, self._own = self._own, []
                await self._sign(own)
                entries, lines = [item[0] for item in batch], []
                for start in range(0, len(batch), COMMIT_SLICE):  # a long batch in slices, for messages arriving
                    lines += map(HistoryLog.encode, entries[start:start + COMMIT_SLICE])
                    await asyncio.sleep(0)
                try:
                    # Only what we acknowledge must be on disk first; what we sent is safe with whoever acked it.
                    written = await off_loop(self._store, entries, lines, any(item[1] for item in batch))
                except StateError as exc:
                    self._keep_for_retry(batch, str(exc))
                    continue
                if self._disk_error is not None:
                    self._disk_error = None
                    self._emit("disk-ok", str(self.log.path))
                self.pending.difference_update(item[0]["id"] for item in batch)
                done = {id(entry) for entry in written}
                self._send_acks([item for item in batch if id(item[0]) in done])
                self.done.fire()
                if self.log.needs_compaction:
                    try:
                        await off_loop(self.log.compact)
                        self._compaction_failed = False
                    except StateError as exc:
                        if not self._compaction_failed:  # said once, until a compaction works again
                            self._emit("compaction-failed", str(self.log.path), str(exc))
                        self._compaction_failed = True
        finally:
            self._writing = None
            self.done.fire()

    def _store(self, entries: list[dict], lines: list[bytes | None], sync: bool) -> list[dict]:
        """In a worker thread: the entries (as encoded) into the log, and with sync onto the disk."""
        written = self.log.write(entries, lines)
        if sync:
            self.log.sync()
        return written

    def _keep_for_retry(self, batch: list[tuple[dict, Peer | None, str, str]], reason: str) -> None:
        self._queue[:0] = batch
        for entry, *_ in self._queue[:-MAX_PENDING_WRITES]:  # given up: never acked, so a resend is taken anew
            self.pending.discard(entry["id"])
            self._known.pop(entry["id"], None)
        del self._queue[:-MAX_PENDING_WRITES]
        if self._disk_error is None:
            self._disk_error = reason
            self._emit("disk-error", str(self.log.path), reason)

    async def _sign(self, own: list[tuple[Message, dict, list[tuple[Peer, str]]]]) -> None:
        """One signature per batch of our messages (MAX_BATCH at most) instead of one each: every message keeps it
        with its proof, and every peer that got messages of the batch gets one frame, after them, that checks
        them (PROTOCOL.md, Signatures per batch)."""
        for start in range(0, len(own), MAX_BATCH):
            part = own[start:start + MAX_BATCH]
            leaves = [batch_leaf(msg.signed_part(self.scope.topic)) for msg, _, _ in part]
            tree = batch_tree(leaves)
            sig = self.scope.identity.sign_batch(tree[-1][0], len(leaves))
            frames: dict[tuple[Peer, str], list[str | None]] = {}
            for at, (msg, entry, sent) in enumerate(part):
                msg.sig, msg.proof = sig, batch_proof(at, len(leaves), batch_path(tree, at))
                entry.update(sig=msg.sig, proof=msg.proof)
                for peer, label in sent:
                    frames.setdefault((peer, label), [None] * len(leaves))[at] = msg.id
            hashes = encode_hashes(leaves)
            for (peer, label), ids in frames.items():
                peer.send_paced(label, {"t": "batch", "sig": sig, "leaves": hashes, "ids": ids})
            await asyncio.sleep(0)

    @staticmethod
    def _send_acks(batch: list[tuple[dict, Peer | None, str, str]]) -> None:
        acks: dict[tuple[Peer, str], list[str]] = {}
        for _, peer, label, ack_id in batch:
            if peer is not None:
                acks.setdefault((peer, label), []).append(ack_id)
        for (peer, label), ids in acks.items():
            for start in range(0, len(ids), 1000):  # a receiver reads 1000 ids a frame
                peer.send(label, {"t": "ack", "ids": ids[start:start + 1000]})


class Relays:
    """History passed on between rtchat.py peers (PROTOCOL.md, History passed on). Out: the answer to a peer's sync,
    what it lacks, once what we took before it asked is written (so signed, and with what checks it). In: what a
    peer passes us in answer to ours, each record checked against its id and its author's signature; it counts as
    checked only by a key we verified for that author ourselves (an author being connected at that moment is
    waited for, briefly). Keys unverified history named for a name are remembered: an author who turns up with
    another has been forged (history-conflict)."""

    def __init__(self, scope: Scope, journal: Journal, accept: Callable[[Message], None],
                 is_connecting: Callable[[str], bool], lookalike_of: Callable[[str], str | None],
                 emit: Callable[..., None], tasks: Tasks, on_its_way: Callable[[str, str], bool]) -> None:
        self.scope, self.journal, self._accept, self._emit, self._tasks = scope, journal, accept, emit, tasks
        self._is_connecting, self._lookalike_of, self._on_its_way = is_connecting, lookalike_of, on_its_way
        self._waiting: list[tuple[Message, dict | None]] = []  # relayed messages waiting for their authors
        self._judge_timer: asyncio.TimerHandle | None = None
        self.hold_fresh: Callable[[], bool] = lambda: False  # a large room: what was just said may come as news too
        self._claims: dict[str, set[str]] = {}  # name never verified -> keys unverified relays said it signed with
        self._allowance: dict[Peer, int] = {}   # relayed messages we still take from a peer (in answer to our sync)

    def asked(self, peer: Peer) -> None:
        """We sent peer our sync: it may pass us BACKFILL_MAX records in answer."""
        self._allowance[peer] = BACKFILL_MAX

    def peer_gone(self, peer: Peer) -> None:
        self._allowance.pop(peer, None)
        if self._waiting:
            self.judge()

    # -- out: what a peer missed ----------------------------------------------------------------
    def on_sync(self, peer: Peer, value: dict, batches: bool) -> None:
        """Pass on what the peer missed (rtchat.py asks once a session): room messages it does not list, the newest
        BACKFILL_MAX, oldest first, as fast as its channel takes them. batches: it can check batch signatures."""
        theirs = value.get("ids")
        if isinstance(theirs, list) and peer.allow("sync"):
            theirs = set(i for i in theirs[:2 * HISTORY_PER_ROOM] if isinstance(i, str))
            self._tasks.spawn(self._backfill(peer, theirs, batches), f"backfill-{peer.name}")

    async def _backfill(self, peer: Peer, theirs: set[str], batches: bool) -> None:
        # What we took before it asked may be on its way to disk (not sent to it live: it was not verified yet).
        held = set(self.journal.pending)
        await self.journal.done.until(lambda: not held & self.journal.pending, SIGNATURE_WAIT_S + 1)
        entries = await off_loop(self.journal.log.entries)
        # Ours that went to it live since it asked are on their way (not acknowledged yet): not history to it.
        missing = [e for e in entries if e.get("type") == "message" and e["id"] not in theirs
                   and e.get("from") != peer.name and not self._on_its_way(peer.name, e["id"])][-BACKFILL_MAX:]
        batch, authors, size, checked = [], {}, 0, {}
        for entry in missing:
            record, credentials = self._relay_record(entry, batches, checked)
            if credentials:
                authors[record["fingerprint"]] = credentials
            batch.append(record)
            size += len(entry.get("text", "")) + 200 + len(to_json(record.get("proof")))
            if size > BACKFILL_FRAME_CHARS or entry is missing[-1]:
                if not await peer.writable("chat", REPLY_BUFFER_BYTES, FILE_IDLE_S):
                    return
                peer.send("chat", {"t": "backfill", "authors": authors, "msgs": batch})
                batch, authors, size = [], {}, 0
            await asyncio.sleep(0)

    def _relay_record(self, entry: dict, batches: bool, checked: dict) -> tuple[dict, dict | None]:
        """A history entry as passed on, and the author's credentials when its signature goes with it. Only a
        signature we have checked against a key we know goes on (a batch signature only to a peer that can check
        one: for one that cannot, our own messages are signed alone); an unverified message goes unsigned.
        checked: signatures checked so far, shared by a batch."""
        record = {k: entry.get(k) for k in ("id", "from", "text", "ts", "action", "fingerprint", "sig", "salt",
                                            "relayed_by")}
        fp, proof = entry.get("fingerprint"), entry.get("proof")
        if proof is not None and batches:
            record["proof"] = proof
        if entry.get("trust") == "unverified":
            record.update(fingerprint=entry.get("claimed_fingerprint"), sig=None)
            record.pop("proof", None)
            return record, None
        if fp == self.scope.identity.fingerprint and proof is not None and not batches:
            record["sig"] = self.scope.identity.sign_message(Message.from_dict(entry).signed_part(self.scope.topic))
            return record, self.scope.author(fp)
        credentials = self.scope.author(fp) if entry.get("sig") and (batches or proof is None) else None
        # A message that came live was not checked when it came (the channel vouched for it): it is now, before we
        # pass it on as the author's.
        if credentials and (fp == self.scope.identity.fingerprint or entry.get("trust") == "relayed" or
                            Message.from_dict(entry).is_signed_by(credentials["mkey"], self.scope.topic, checked)):
            return record, credentials
        record["sig"] = None
        record.pop("proof", None)
        return record, None

    # -- in: what we missed ---------------------------------------------------------------------
    def on_backfill(self, peer: Peer, value: dict) -> None:
        """Messages we missed, passed on by a peer in answer to our sync (BACKFILL_MAX at most): each must be what
        its id was made for, and the author's signature decides what it is worth. They are history, never news,
        even from their author (who passes on what it said before we met)."""
        authors, records = value.get("authors"), value.get("msgs")
        if not isinstance(authors, dict) or not isinstance(records, list):
            return
        left = self._allowance.get(peer, 0)
        records = records[:left]
        self._allowance[peer] = left - len(records)
        checked: dict = {}
        for record in records:
            relayed = self._relayed(peer, authors, record, checked) if isinstance(record, dict) else None
            if relayed is not None and not self.journal.knows(relayed[0].id):
                self._waiting.append(relayed)
        if self._waiting and self._judge_timer is None:
            self._judge_timer = self._tasks.later(VERIFY_TIMEOUT_S, self.judge, True)
        self.judge(len(self._waiting) > 4 * BACKFILL_MAX)

    def judge(self, now: bool = False) -> None:
        """Relayed messages are shown in order once no author of theirs is still connecting (at most
        VERIFY_TIMEOUT_S): a signature counts as checked only by a key we verified for its author ourselves, and
        an author met at the same moment as the peer passing its words on is usually verified a moment later."""
        if not now and any(author is not None and self._is_connecting(msg.sender) for msg, author in self._waiting):
            return
        if self._judge_timer is not None:
            self._judge_timer.cancel()
            self._judge_timer = None
        fresh_since = now_ms() - FRESH_BACKFILL_MS if self.hold_fresh() else math.inf
        waiting = sorted((r for r in self._waiting if r[0].ts <= fresh_since), key=lambda relayed: relayed[0].ts)
        self._waiting = [r for r in self._waiting if r[0].ts > fresh_since]
        if self._waiting:  # said a moment ago: it may still be on its way to us as news (a large room's gossip)
            due = min(r[0].ts for r in self._waiting) - fresh_since
            self._judge_timer = self._tasks.later(max(0.05, due / 1000), self.judge, True)
        for msg, author in waiting:
            if self.journal.knows(msg.id):
                continue
            if author is not None and msg.claimed_fingerprint in self.scope.trust.pins_for(bare_name(msg.sender)):
                self._checked(msg, author)
            self._accept(msg)
            self.note_claim(msg)

    def _checked(self, msg: Message, author: dict) -> None:
        """A relayed message whose signature is by the key pinned for its author: its words, checked."""
        fp = msg.claimed_fingerprint
        msg.trust, msg.fingerprint, msg.claimed_fingerprint = "relayed", fp, None
        if fp not in self.scope.store.data["authors"]:
            self.scope.store.defer(lambda d: d["authors"].__setitem__(fp, author))

    def _relayed(self, peer: Peer, authors: dict, record: dict, checked: dict) -> tuple[Message, dict | None] | None:
        """A relayed record as a Message, or None if it is malformed, not what its id was made for, or signed by
        a key other than the one pinned for its author. It counts as checked ('relayed') only if its signature is
        by a key we have verified for that name ourselves; else it is kept 'unverified', with the key it claims.
        With it, the author's credentials if the signature is genuine but the author not (yet) verified by us."""
        fp, sig, salt, proof = record.get("fingerprint"), record.get("sig"), record.get("salt"), record.get("proof")
        if not (is_message_id(record.get("id")) and is_wire_name(record.get("from"))
                and is_message_text(record.get("text")) and valid_ts(record.get("ts"))
                and isinstance(salt, str) and SALT_RE.fullmatch(salt)
                and (fp is None or (isinstance(fp, str) and FINGERPRINT_RE.fullmatch(fp)))
                and (proof is None or batch_proof_fields(proof) is not None)):
            return None
        msg = Message(id=record["id"], room=self.scope.room, sender=record["from"], text=record["text"],
                      ts=record["ts"], action=record.get("action") is True, relayed_by=peer.name, history=True,
                      salt=salt, claimed_fingerprint=fp)
        if msg.sender == self.scope.me or msg.bound_id() != msg.id:
            return None  # ours, or other words than its id was made for
        pins = self.scope.trust.pins_for(bare_name(msg.sender))
        if pins and fp not in pins:
            log.info("dropped a relayed message in %s's name from %s: not their key", msg.sender, peer.name)
            return None
        author = authors.get(fp) if fp else None
        if isinstance(sig, str) and isinstance(author, dict):
            msg.sig, msg.proof = sig, proof
            key = author.get("key")
            try:
                genuine = (isinstance(key, str) and fingerprint(key) == fp
                           and verify_message_key(key, author.get("mkey"), author.get("mcert"))
                           and msg.is_signed_by(author["mkey"], self.scope.topic, checked))
            except ValueError:
                genuine = False
            if not genuine:
                log.info("dropped a relayed message in %s's name from %s: bad signature", msg.sender, peer.name)
                return None
            if pins:  # an author we have verified ourselves
                self._checked(msg, author)
        msg.lookalike = self._lookalike_of(msg.sender)
        return msg, (author if msg.sig and msg.trust == "unverified" else None)

    # -- keys history named -----------------------------------------------------------------------
    def note_claim(self, msg: Message) -> None:
        """Remember which key an unverified relay said an author we never met signed with: if the author turns up
        with another key, that history was forged, and we say so (history-conflict)."""
        name = bare_name(msg.sender)
        if msg.trust != "unverified" or not msg.claimed_fingerprint or self.scope.trust.pins_for(name):
            return
        if len(self._claims) >= 1024 and name not in self._claims:
            del self._claims[next(iter(self._claims))]
        claims = self._claims.setdefault(name, set())
        if len(claims) < 16:
            claims.add(msg.claimed_fingerprint)

    def first_contact(self, peer: Peer) -> None:
        """A name verified for the first time (before its key is pinned): did unverified relays say it signed with
        another key? Then that history was forged."""
        bare = bare_name(peer.name)
        for msg, _ in self._waiting:
            if bare_name(msg.sender) == bare:
                self.note_claim(msg)
        claimed = self._claims.pop(bare, set()) - {peer.fingerprint}
        if claimed:
            self._emit("history-conflict", peer, sorted(claimed))


def check_own_text(text: str) -> None:
    """UsageError for what we cannot send."""
    if not text:
        raise UsageError("nothing to send")
    if len(text) > MAX_TEXT_CHARS:
        raise UsageError(f"a message has at most {MAX_TEXT_CHARS} characters")
    if not is_encodable(text):
        raise UsageError("a message must be valid Unicode text (it has a lone surrogate)")


def own_message(scope: Scope, text: str, kind: str = "message", action: bool = False, to: str | None = None
                ) -> Message:
    """Something we say, with its id; UsageError for what cannot be sent."""
    check_own_text(text)
    msg = Message(id="", room=scope.room, sender=scope.me, text=text, ts=now_ms(), kind=kind,
                  fingerprint=scope.identity.fingerprint, trust="self", action=action, to=to, salt=new_id())
    msg.id = msg.bound_id()
    return msg


def kept_messages(log: HistoryLog, count: int) -> list[Message]:
    """The last count messages of a history log, oldest first, marked as history."""
    entries = log.entries()[-count:] if count > 0 else []
    return [dataclasses.replace(Message.from_dict(e), history=True) for e in entries]


@dataclasses.dataclass(eq=False)
class Remote:
    """A member we have no session with but reach through others (PROTOCOL.md, Relaying through members). The
    ledger takes it where it takes a Peer: a name, a key (as the members that reach it told it, checked against
    the key pinned for the name), acks sent to it (through a member, signed). via: the members that reach it and
    relay, best first."""
    name: str
    author: dict                     # its key, message key and certificate (the certificate checked)
    fingerprint: str
    trust: str                       # "relayed": the key pinned for its name; "unverified": no key pinned yet
    via: list[Peer]
    routes: Routes | Overlay         # what its acks and direct messages go through
    lookalike: str | None = None
    channel_bound = False
    client_tag = None
    last_via: Peer | None = None     # the member its last frame came through

    def can(self, capability: str) -> bool:
        return capability in ("acks", "dm")

    def send(self, label: str, value: Any) -> bool:
        """The ledger's acks, through a member, signed by us."""
        ids = value.get("ids") if isinstance(value, dict) and value.get("t") == "ack" else None
        return bool(ids) and self.routes.send_ack(self, ids)


class Routes:
    """Members we reach through others, and others' messages we pass on (PROTOCOL.md, Relaying through members).
    Each rtchat.py peer tells its verified peers whom it reaches (reach); a member we have no session with but a
    relaying peer reaches is a Remote, and what we say to it goes through such a peer, end to end: messages signed
    by us as history passed on is, direct messages also sealed to its key, acks signed; a message not acknowledged
    in time goes again through another member. As a relay we pass on what a verified peer asks, to our verified
    peers only, within a budget per peer; a refusal is said (relay-refused). Emits "relayed" (name, via name or
    None) when a member becomes, stays (through another) or stops being reached so, and "relay-refused" (peer,
    why)."""

    def __init__(self, scope: Scope, present: dict[str, Peer], emit: Callable[..., None], tasks: Tasks, *,
                 relay: bool, check: Callable, take: Callable, acked: Callable, route_up: Callable,
                 changed: Callable[[], None], trying: Callable[[str], bool]) -> None:
        self.scope, self.relay, self._present, self._emit, self._tasks = scope, relay, present, emit, tasks
        self.covered: Callable[[str], bool] = lambda name: False  # reached by a large room's gossip instead
        self._check, self._take, self._acked, self._route_up, self._changed = check, take, acked, route_up, changed
        self._trying = trying
        self.remotes: dict[str, Remote] = {}
        self._told: dict[Peer, tuple[bool, dict[str, dict]]] = {}  # per peer: does it relay, whom it reaches
        self._keys: dict[tuple, str | None] = {}   # (key, mkey, mcert) -> fingerprint if the certificate holds
        self._authors: dict[str, dict] = {}        # fingerprint -> key, mkey, mcert, as told in a reach (checked)
        self._sent: dict[Peer, set[str]] = {}      # per peer: fingerprints whose keys we told it already
        self._last: dict[Peer, tuple] = {}         # per peer: whom we told it we reach, last time
        self._pending: dict[tuple[str, str], list] = {}  # (id, name) -> [inner, first sent, due, via name, record]
        self._avoid: dict[str, set[str]] = {}     # name -> members that lost or refused our frames for it
        self._hinted: dict[tuple[Peer, str], float] = {}  # refusals said, when
        self._gone: dict[str, float] = {}          # names whose session with us ended lately, when
        self._telling: asyncio.TimerHandle | None = None
        self._retrying: asyncio.Task | None = None

    def sizes(self) -> dict[str, int]:
        """How big each table is (every one is bounded, whatever peers send)."""
        return {"remotes": len(self.remotes), "pending": len(self._pending), "keys": len(self._keys),
                "authors": len(self._authors), "sent": sum(len(fps) for fps in self._sent.values()),
                "told": sum(len(reached) for _, reached in self._told.values()), "hinted": len(self._hinted)}

    # -- whom we reach, and through whom ----------------------------------------------------------
    def changed(self) -> None:
        """Whom we reach directly changed (a peer's hello, a peer gone): told to everyone, together, soon."""
        if self._telling is None:
            self._telling = self._tasks.later(REACH_GATHER_S, self._tell)
        self._recompute()

    def _tell(self) -> None:
        """Whom we reach, to each peer whose view of it changed: a member's keys the first time, its fingerprint
        after."""
        self._telling = None
        peers = [p for p in self._present.values() if p.message_key is not None and p.author]
        for peer in peers:
            told = (self.relay, *(p.name for p in peers if p is not peer))
            if self._last.get(peer) == told:
                continue
            self._last[peer] = told
            sent = self._sent.setdefault(peer, set())
            if len(sent) > 4 * MAX_REACH:
                sent.clear()
            reached = {}
            for other in itertools.islice((p for p in peers if p is not peer), MAX_REACH):
                reached[other.name] = {"fp": other.fingerprint} if other.fingerprint in sent else other.author
                sent.add(other.fingerprint)
            peer.send("chat", {"t": "reach", "relay": self.relay, "peers": reached})

    def on_reach(self, peer: Peer, value: dict) -> None:
        """Whom a verified peer reaches, and whether it relays. A name's key must be the one pinned for it."""
        peers = value.get("peers")
        if not isinstance(peers, dict) or not peer.allow("reach"):
            return
        reached = {}
        for name, told in itertools.islice(peers.items(), MAX_REACH):
            fp, author = self.told_author(told)
            if not is_wire_name(name) or name in (self.scope.me, peer.name) or fp is None:
                continue
            pins = self.scope.trust.pins_for(bare_name(name))
            if pins and fp not in pins:
                log.info("%s says it reaches %s with a key not pinned for it: not through %s", peer.name, name,
                         peer.name)
                continue
            reached[name] = author
        self._told[peer] = (value.get("relay") is True, reached)
        self._recompute()
        self._changed()

    def told_author(self, told: Any) -> tuple[str | None, dict | None]:
        """(fingerprint, {key, mkey, mcert}) of a member as a reach names it: with its keys (the certificate of its
        message key must hold), or by a fingerprint whose keys were told before (or that we met); (None, None)
        otherwise."""
        if isinstance(told, dict) and set(told) == {"fp"}:
            fp = told["fp"]
            author = self._authors.get(fp) if isinstance(fp, str) else None
            author = author or (self.scope.author(fp) if isinstance(fp, str) else None)
            return (fp, author) if isinstance(author, dict) and all(
                isinstance(author.get(k), str) for k in ("key", "mkey", "mcert")) else (None, None)
        if not isinstance(told, dict):
            return None, None
        fields = tuple(told.get(k) for k in ("key", "mkey", "mcert"))
        if not all(isinstance(f, str) and len(f) <= MAX_KEY_CHARS for f in fields):
            return None, None
        if fields not in self._keys:
            if len(self._keys) > 4 * MAX_REACH:
                self._keys.clear()
            try:
                self._keys[fields] = fingerprint(fields[0]) if verify_message_key(*fields) else None
            except ValueError:
                self._keys[fields] = None
        fp = self._keys[fields]
        if fp is None:
            return None, None
        author = dict(zip(("key", "mkey", "mcert"), fields, strict=True))
        self._authors.pop(fp, None)
        self._authors[fp] = author
        if len(self._authors) > 8 * MAX_REACH:
            del self._authors[next(iter(self._authors))]
        return fp, author

    def _recompute(self) -> None:
        """Remotes: names a relaying peer reaches that we have no verified session with (nor one being set up that
        may still find a path), through every relaying peer that names the same key for them (the first one told
        wins a disagreement)."""
        found: dict[str, tuple[dict, list[Peer]]] = {}
        now = time.monotonic()
        while self._gone and now - next(iter(self._gone.values())) > GONE_GRACE_S:
            del self._gone[next(iter(self._gone))]
        for peer, (relays, reached) in self._told.items():
            if not relays or self._present.get(peer.name) is not peer:
                continue
            for name, author in reached.items():
                if name in self._present or name in self._gone or self._trying(name) or self.covered(name):
                    continue
                first = found.setdefault(name, (author, []))
                if first[0]["key"] == author["key"]:
                    first[1].append(peer)
        for name in [n for n in self.remotes if n not in found]:
            del self.remotes[name]
            if name not in self._present and not self.covered(name):
                self._emit("relayed", name, None)
        for name, (author, via) in found.items():
            via.sort(key=lambda p: (p.rtt_ms if p.rtt_ms is not None else math.inf, collation_key(p.name)))
            remote = self.remotes.get(name)
            if remote is None or remote.author["key"] != author["key"]:
                fp = fingerprint(author["key"])
                pinned = fp in self.scope.trust.pins_for(bare_name(name))
                remote = self.remotes[name] = Remote(name, author, fp, "relayed" if pinned else "unverified", via,
                                                     self)
                self._emit("relayed", name, via[0].name)
                self._route_up(remote)
            elif remote.via and remote.via[0] in via:  # the member it goes through stays first while it can
                via.remove(remote.via[0])
                via.insert(0, remote.via[0])
            else:
                self._emit("relayed", name, via[0].name)
            remote.via = via
        self._resend_due()

    def refresh(self) -> None:
        """A session ended (it may have found no path): who is reached through others, again."""
        self._recompute()

    def peer_gone(self, peer: Peer) -> None:
        """A member gone: what went through it and is not acknowledged goes through another one now."""
        self._told.pop(peer, None)
        self._sent.pop(peer, None)
        self._last.pop(peer, None)
        self._gone.pop(peer.name, None)
        self._gone[peer.name] = time.monotonic()
        if len(self._gone) > MAX_SEEN_PEERS:
            del self._gone[next(iter(self._gone))]
        self._tasks.later(GONE_GRACE_S, self._recompute)
        for key in [k for k in self._hinted if k[0] is peer]:
            del self._hinted[key]
        for item in self._pending.values():
            if item[3] == peer.name:
                item[2] = 0.0
        self.changed()

    # -- out: through a member ----------------------------------------------------------------------
    def _pick(self, remote: Remote) -> Peer | None:
        """The member to go through: the one its last frame came through, else the best one that has not lost or
        refused a frame for it."""
        avoid = self._avoid.get(remote.name, set())
        live = [p for p in remote.via if self._present.get(p.name) is p and p.is_verified]
        if remote.last_via in live and remote.last_via.name not in avoid:
            return remote.last_via
        live.sort(key=lambda p: p.name in avoid)
        return live[0] if live else None

    def send(self, remotes: list[Remote], inner: dict, msg_id: str | None = None, record: dict | None = None) -> None:
        """inner to these members, each through a member that reaches it (those sharing one in one frame); with
        msg_id, sent again until each acknowledges it (record: the message, should a direct session come first)."""
        by_via: dict[Peer, list[str]] = {}
        for remote in remotes:
            via = self._pick(remote)
            if via is not None:
                by_via.setdefault(via, []).append(remote.name)
            if msg_id is not None:
                self._await_ack(msg_id, remote.name, inner, via, record)
        for via, names in by_via.items():
            via.send_paced("chat", {"t": "relay", "to": names, "d": inner})

    def _await_ack(self, msg_id: str, name: str, inner: dict, via: Peer | None, record: dict | None) -> None:
        now = time.monotonic()
        since = self._pending.pop((msg_id, name), [None, now])[1]
        self._pending[(msg_id, name)] = [inner, since, now + RELAY_ACK_WAIT_S, via.name if via else None, record]
        if len(self._pending) > MAX_RELAYED_PENDING:
            del self._pending[next(iter(self._pending))]
        if self._retrying is None:
            self._retrying = self._tasks.spawn(self._retry(), f"relay-retry-{self.scope.room}")

    def send_ack(self, remote: Remote, ids: list[str]) -> bool:
        """Our acks to a remote member, signed with our message key: a relay cannot make them up."""
        sig = self.scope.identity.sign_message(signed_bytes("relay-ack", self.scope.topic, self.scope.me,
                                                            remote.name, ids))
        via = self._pick(remote)
        return via is not None and via.send("chat", {"t": "relay", "to": [remote.name],
                                                     "d": {"t": "ack", "ids": ids, "sig": sig}})

    async def _retry(self) -> None:
        try:
            while self._pending:
                await asyncio.sleep(RELAY_ACK_WAIT_S / 4)
                self._resend_due()
        finally:
            self._retrying = None

    def _resend_due(self) -> None:
        """What is not acknowledged in time goes again, through another member if there is one (the one it went
        through is avoided for that name from now on); given up RELAY_GIVE_UP_S after it was first sent."""
        now = time.monotonic()
        for (msg_id, name), (inner, since, due, via, record) in list(self._pending.items()):
            remote = self.remotes.get(name)
            if now - since > RELAY_GIVE_UP_S:
                del self._pending[(msg_id, name)]
                continue
            if due > now or remote is None:
                continue
            if via is not None:
                avoid = self._avoid.setdefault(name, set())
                avoid.add(via)
                if len(avoid) >= len(remote.via):  # every one failed once: start again
                    avoid.clear()
                if len(self._avoid) > 4 * MAX_REACH:
                    self._avoid.pop(next(iter(self._avoid)))
                if remote.last_via is not None and remote.last_via.name == via:
                    remote.last_via = None
            self.send([remote], inner, msg_id, record)

    def forget(self, msg_id: str, name: str) -> None:
        self._pending.pop((msg_id, name), None)

    def hand_over(self, name: str) -> list[dict]:
        """What awaits name's ack through a member, now that we have a session of our own with it: those records,
        no longer sent through members (the caller sends them on that session)."""
        keys = [key for key in self._pending if key[1] == name]
        return [record for key in keys if (record := self._pending.pop(key)[4]) is not None]

    # -- as a relay -----------------------------------------------------------------------------------
    def on_relay(self, peer: Peer, value: dict) -> None:
        """A verified peer asks us to pass inner on to some of our verified peers: within its budgets, and only
        if we relay; what we cannot pass on is refused, with the reason (at most once a second per reason)."""
        to, inner = value.get("to"), value.get("d")
        if not isinstance(to, list) or not isinstance(inner, dict):
            return
        to = [name for name in to[:MAX_REACH] if isinstance(name, str)]
        if not self.relay:
            self._refuse(peer, to, "off")
            return
        size = len(to_json(inner))
        if size > RELAY_MAX_CHARS or not (peer.allow("relay", len(to)) and peer.allow("relay-bytes", size * len(to))):
            self._refuse(peer, to, "busy")
            return
        unreachable = []
        for name in to:
            target = self._present.get(name)
            if target is None or target is peer or target.message_key is None or \
                    not target.send_reply("chat", {"t": "relayed", "from": peer.name, "d": inner}):
                unreachable.append(name)
        if unreachable:
            self._refuse(peer, unreachable, "unreachable")

    def _refuse(self, peer: Peer, names: list[str], why: str) -> None:
        now = time.monotonic()
        if now - self._hinted.get((peer, why), -math.inf) >= 1.0:
            self._hinted[(peer, why)] = now
            peer.send("chat", {"t": "relay-refused", "to": names, "why": why})

    def on_refused(self, peer: Peer, value: dict) -> None:
        """A member refuses to pass our frames on: 'off' (it does not relay), 'busy' (over its budget for us),
        'unreachable' (it no longer reaches them). What awaits an ack goes through another member now."""
        why, names = value.get("why"), value.get("to")
        if why not in ("off", "busy", "unreachable") or not isinstance(names, list):
            return
        if why == "off" and peer in self._told:
            self._told[peer] = (False, self._told[peer][1])
        for name in (n for n in names[:MAX_REACH] if isinstance(n, str) and n in self.remotes):
            self._avoid.setdefault(name, set()).add(peer.name)
            for (_, pending), item in self._pending.items():
                if pending == name and item[3] == peer.name:
                    item[2] = 0.0
        self._emit("relay-refused", peer, why)
        self._recompute()

    # -- in: through a member -------------------------------------------------------------------------
    def on_relayed(self, peer: Peer, value: dict) -> None:
        """Something a member passed on from another, checked end to end: a message (its id and its author's
        signature, as history passed on), a sealed direct message, or an ack (signed by whoever acks)."""
        sender, inner = value.get("from"), value.get("d")
        if not (is_wire_name(sender) and isinstance(inner, dict)) or sender in (self.scope.me, peer.name):
            return
        author = self._told.get(peer, (False, {}))[1].get(sender)
        if author is None or not peer.allow("chat"):
            return  # it does not say it reaches the author: nothing to check it by
        remote = self.remotes.get(sender) or Remote(sender, author, fingerprint(author["key"]), "unverified", [],
                                                    self)
        remote.last_via = peer
        if inner.get("t") == "ack":
            self._on_ack(remote, author, inner)
        else:
            self.take(peer, remote, author, inner)

    def take(self, peer: Peer, remote: Remote, author: dict, inner: dict, checked: Message | None = None) -> None:
        """A message ('msg') or a sealed direct message ('box') from remote that peer passed on: taken as news if its
        author signed it (its id bound to its words), and acked to it (directly if we have a session with it).
        checked: the message, if the caller has checked the record already."""
        kind, sender = inner.get("t"), remote.name
        record = inner.get("m") if kind == "msg" else self._open(peer, sender, inner) if kind == "box" else None
        if not isinstance(record, dict) or record.get("from") != sender or record.get("fingerprint") != \
                remote.fingerprint or not is_signature_text(record.get("sig")):
            return
        if checked is None:
            found = self._check(peer, {remote.fingerprint: author}, record, {})
            checked = found[0] if found is not None else None
        if checked is None or not checked.sig:  # live words count only signed by their author
            return
        msg = checked
        msg.history = False
        if kind == "box":
            msg.kind, msg.to = "dm", self.scope.me
        self._take(msg, self._present.get(sender) or remote, "chat" if kind == "msg" else "dm")

    def _open(self, peer: Peer, sender: str, box: dict) -> dict | None:
        if not peer.allow("box"):
            return None
        opened = self.scope.identity.open_box(box, signed_bytes("relay-box", self.scope.topic, sender,
                                                                self.scope.me))
        try:
            return parse_json(opened) if opened is not None else None
        except ValueError:
            return None

    def _on_ack(self, remote: Remote, author: dict, inner: dict) -> None:
        ids, sig = inner.get("ids"), inner.get("sig")
        if not (isinstance(ids, list) and len(ids) <= 1000 and all(is_message_id(i) for i in ids)):
            return
        if not verify_message(author["mkey"], sig, signed_bytes("relay-ack", self.scope.topic, remote.name,
                                                                 self.scope.me, ids)):
            log.info("an ack in %s's name through %s that %s did not sign: dropped", remote.name,
                     remote.last_via.name if remote.last_via else "?", remote.name)
            return
        for msg_id in ids:
            self.forget(msg_id, remote.name)
        self._acked(remote, ids)

    def seal(self, remote: Remote, record: dict) -> dict:
        """A direct message's record, sealed to the remote member's key: the members passing it on read nothing."""
        context = signed_bytes("relay-box", self.scope.topic, self.scope.me, remote.name)
        return {"t": "box", **seal_box(remote.author["key"], canonical_json(record), context)}


class Ledger:
    """Messages in and out of one room once a session is verified. Inputs are calls from the room: a verified peer
    came or went, a chat or dm frame came from one, the user said something. Outputs are frames handed to peers'
    send and events: message, dm and history (what was taken), delivered and queued (our direct messages),
    disk-error, disk-ok and compaction-failed (the history file), history-conflict (history forged)."""

    def __init__(self, scope: Scope, log: HistoryLog, emit: Callable[..., None], *, takes_files: bool = False,
                 is_connecting: Callable[[str], bool] = lambda name: False,
                 lookalike_of: Callable[[str], str | None] = lambda name: None,
                 on_hello: Callable[[Peer], None] = lambda peer: None, relay: bool = True,
                 on_route: Callable[[], None] = lambda: None,
                 trying: Callable[[str], bool] = lambda name: False) -> None:
        self.scope, self.log, self._emit, self.takes_files, self._on_hello_heard = scope, log, emit, takes_files, \
            on_hello
        self._tasks = Tasks()
        self.changed = Pulse()                  # fires when something is written, an ack comes or a peer goes
        self.journal = Journal(scope, log, emit, self._tasks, self.changed)
        self.relays = Relays(scope, self.journal, self._accept_relayed, is_connecting, lookalike_of, emit,
                             self._tasks, lambda name, msg_id: name in self._unacked.get(msg_id, ()))
        self._present: dict[str, Peer] = {}     # verified peers, by name
        self.routes = Routes(scope, self._present, emit, self._tasks, relay=relay, check=self.relays._relayed,
                             take=self.take_relayed, acked=self.acked, route_up=self.send_outbox,
                             changed=on_route, trying=trying)
        self._unacked: dict[str, set[str]] = {}  # our messages -> rtchat.py peers that have not acked them yet
        self._dm_ids: dict[str, str] = {}       # our DMs awaiting an ack: id -> recipient
        self._unsigned: dict[tuple[str, str], tuple[dict, Peer, str, float]] = {}  # theirs, waiting for signatures
        self._unsigned_bytes: dict[Peer, int] = {}  # per peer: text waiting for its signatures
        self._sweep: asyncio.TimerHandle | None = None
        self.members: Callable[[], list[str]] = lambda: []  # a large room's members reached by gossip
        self.syncs: Callable[[Peer], bool] = lambda peer: True  # compare history with this peer (a large room: few)

    async def open(self) -> None:
        for entry in await self.journal.open():
            self.relays.note_claim(Message.from_dict(entry))

    async def written(self, timeout: float = math.inf) -> bool:
        """Until everything taken is written (messages still waiting for their signatures are written without
        them now); False at timeout."""
        self._write_unsigned(math.inf)
        return await self.journal.done.until(lambda: self.journal.idle, timeout)

    def stop(self) -> None:
        """The room is being left: a disk that refuses writes is not tried again."""
        self.journal.stopped = True

    async def close(self) -> None:
        """Everything taken is written, then every task of the ledger has ended."""
        self.stop()
        await self.written()
        await self._tasks.close()

    # -- from the user --------------------------------------------------------------------------
    def send(self, text: str, action: bool, peers: list[Peer]) -> Message:
        """Say something to these (verified) peers, and, through backfill, to who comes later."""
        msg = self._own_message(text, "message", action)
        remotes = list(self.routes.remotes.values())
        self._sign_now_if_wanted(msg, peers, relayed=bool(remotes))
        self.journal.add_own(msg, [(peer, "chat") for peer in peers if self._send_text(peer, "chat", msg)])
        if remotes:
            self._relay(msg, remotes)
        return msg

    def spread(self, text: str, action: bool, peers: list[Peer], overlay: Overlay) -> Message:
        """In a large room: our message, signed, to every member by gossip, and directly to the verified peers that
        do not gossip (browsers); each member known is awaited as an ack."""
        msg = self._own_message(text, "message", action)
        msg.sig = self.scope.identity.sign_message(msg.signed_part(self.scope.topic))
        direct = [peer for peer in peers if not overlay.gossips_with(peer)]
        self.journal.add_own(msg, [(peer, "chat") for peer in direct if self._send_text(peer, "chat", msg)])
        names = overlay.member_names()
        if names:
            self._unacked.setdefault(msg.id, set()).update(names)
        overlay.spread_message(self.relays._relay_record(msg.record(), False, {})[0])
        return msg

    def check_relayed(self, peer: Peer, authors: dict, record: dict) -> tuple[Message, dict | None] | None:
        """A record a peer passed on as a Message, checked (see Relays._relayed)."""
        return self.relays._relayed(peer, authors, record, {})

    def dm(self, peer: Peer | Remote | None, target: str, text: str) -> Message:
        """A direct message to a verified peer, or sealed to a member reached through others; to a known name with
        neither (target, a bare name) it waits in the outbox, kept across restarts, and a 'queued' event says so."""
        if isinstance(peer, Remote):
            msg = self._own_message(text, "dm", to=peer.name)
            self._sign_now_if_wanted(msg, [], relayed=True)
            self._relay(msg, [peer])
            self._dm_ids[msg.id] = peer.name
            self.journal.add_own(msg, [])
            return msg
        if peer is not None:
            msg = self._own_message(text, "dm", to=peer.name)
            self._sign_now_if_wanted(msg, [peer])
            if self._send_text(peer, "dm", msg):  # browsers do not acknowledge
                self._dm_ids[msg.id] = peer.name
            self.journal.add_own(msg, [(peer, "dm")])
            return msg
        msg = self._own_message(text, "dm", to=target)
        msg.sig = self.scope.identity.sign_message(msg.signed_part(self.scope.topic))
        self.scope.store.update(lambda d: d["outbox"].append(msg.record()))
        self._emit("queued", msg)
        self.journal.add(msg.record())
        return msg

    def outbox(self) -> list[Message]:
        """Our direct messages in this room still waiting for their recipients."""
        return [Message.from_dict(e) for e in self.scope.store.data["outbox"] if e.get("room") == self.scope.room]

    def history(self, count: int = 20) -> list[Message]:
        """The last count messages of this room, oldest first (kept on disk, also across restarts)."""
        return kept_messages(self.log, count)

    def unacknowledged(self) -> set[str]:
        """Wire names of rtchat.py peers that have not acknowledged every message we sent them."""
        return set().union(*self._unacked.values())

    def awaiting(self, msg_id: str) -> set[str]:
        """Wire names of rtchat.py peers that have not acknowledged this message of ours yet."""
        return set(self._unacked.get(msg_id, ()))

    async def flush(self, timeout: float) -> bool:
        """Until every message taken is written and every rtchat.py recipient acknowledged what we sent it. False
        at timeout, or as soon as only recipients that left are missing (see unacknowledged)."""
        def settled() -> bool:
            missing = self.unacknowledged()
            here = set(self._present) | set(self.routes.remotes) | set(self.members())
            return not missing & here if missing else self.journal.idle
        return await self.changed.until(settled, timeout) and not self.unacknowledged()

    def _own_message(self, text: str, kind: str, action: bool = False, to: str | None = None) -> Message:
        return own_message(self.scope, text, kind, action, to)

    def _sign_now_if_wanted(self, msg: Message, peers: list[Peer], relayed: bool = False) -> None:
        """An rtchat.py peer that does not take batch signatures later (0.2, or one whose hello has not come) gets
        the message's own signature inline, and then so does everyone; so does a message going through members
        (relayed), which must be checkable alone, at once."""
        if relayed or any(p.can("signatures") and not p.late_signatures for p in peers):
            msg.sig = self.scope.identity.sign_message(msg.signed_part(self.scope.topic))

    def _relay(self, msg: Message, remotes: list[Remote]) -> None:
        """Our message (signed) to members reached through others, as history is passed on; a direct message
        sealed to its recipient's key. Each is awaited as an ack, as from a peer."""
        record = self.relays._relay_record(msg.record(), False, {})[0]
        for remote in remotes:
            self._unacked.setdefault(msg.id, set()).add(remote.name)
        if msg.kind == "dm":
            for remote in remotes:  # through a member, or by a large room's gossip (remote.routes)
                remote.routes.send([remote], remote.routes.seal(remote, record), msg.id, {**record, "type": "dm"})
        else:
            self.routes.send(remotes, {"t": "msg", "m": record}, msg.id, {**record, "type": "message"})

    def take_relayed(self, msg: Message, ack_to: Peer | Remote, label: str) -> None:
        """A message through a member, checked end to end: taken as from its author, acked to it."""
        self._accept(msg, ack_to, label, ack_id=msg.id)
        self.relays.note_claim(msg)

    def acked(self, remote: Peer | Remote, ids: list[str]) -> None:
        self._on_ack(remote, "chat", {"ids": ids})

    # -- peers ----------------------------------------------------------------------------------
    def first_contact(self, peer: Peer) -> None:
        """A name verified for the first time, before its key is pinned (see Relays.first_contact)."""
        self.relays.first_contact(peer)

    def peer_verified(self, peer: Peer) -> None:
        """A verified session: an rtchat.py peer bound to its key hears our message key (and then we compare notes);
        direct messages waiting for it go out; history waiting for its author is judged."""
        self._present[peer.name] = peer
        if peer.can("signatures") and peer.channel_bound:
            peer.send("chat", {"t": "hello", "mkey": self.scope.identity.message_public,
                               "mcert": self.scope.identity.message_cert, "late_sigs": True, "batches": True,
                               "files": self.takes_files, "reach": True})
        self.send_outbox(peer)
        for record in self.routes.hand_over(peer.name):  # it went through a member, and is not acked yet
            self._send_text(peer, "dm" if record["type"] == "dm" else "chat", Message.from_dict(record))
        self.relays.judge()
        self.routes.changed()

    def peer_gone(self, peer: Peer) -> None:
        if self._present.get(peer.name) is peer:
            del self._present[peer.name]
        self._unsigned_bytes.pop(peer, None)
        self.relays.peer_gone(peer)
        self.routes.peer_gone(peer)
        self.changed.fire()

    # -- frames from verified peers -------------------------------------------------------------
    def on_frame(self, peer: Peer, label: str, value: Any) -> None:
        """A frame on the chat or dm channel of a verified peer."""
        kind = "message" if label == "chat" else "dm"
        if isinstance(value, dict) and peer.can("acks"):
            handler = self._FRAMES.get(value.get("t"))
            if handler is not None:
                handler(self, peer, kind, value)
            return
        text = value if isinstance(value, str) else to_json(value)
        if not (peer.allow("chat") and is_message_text(text)):
            return
        msg = Message(id="", room=self.scope.room, sender=peer.name, text=text, ts=now_ms(), kind=kind,
                      fingerprint=peer.fingerprint, trust="legacy", to=self.scope.me if kind == "dm" else None,
                      salt=new_id(), lookalike=peer.lookalike)
        msg.id = msg.bound_id()  # browsers send plain text: the id is made here
        self._accept(msg, peer, label)

    def _send_text(self, peer: Peer, label: str, msg: Message) -> bool:
        """Our message to one peer: plain text to a browser, a frame to an rtchat.py peer. True if it went to an
        rtchat.py peer, which will acknowledge it. (With on_frame, all the ledger knows of the two dialects.)"""
        if not peer.can("acks"):
            peer.send_paced(label, f"* {self.scope.me} {msg.text}" if msg.action else msg.text)
            return False
        if not peer.send_paced(label, msg.frame()):
            return False
        self._unacked.setdefault(msg.id, set()).add(peer.name)
        if len(self._unacked) > 10000:  # a long-lived room: forget the oldest never acknowledged
            del self._unacked[next(iter(self._unacked))]
        return True

    def _on_signed_text(self, peer: Peer, kind: str, value: dict) -> None:
        """A message from an rtchat.py peer, kept exactly as sent. Its id must be bound to its words; one from
        rtchat.py 0.2 (no salt: an id of its choosing) is kept under an id made here from it, and acked as sent."""
        msg_id, text, stamp, salt, sig = (value.get(k) for k in ("id", "text", "ts", "salt", "sig"))
        if not (peer.allow("chat") and is_message_id(msg_id) and is_message_text(text) and valid_ts(stamp)):
            return
        msg = Message(id=msg_id, room=self.scope.room, sender=peer.name, text=text, ts=stamp, kind=kind,
                      fingerprint=peer.fingerprint, trust="channel-bound" if peer.channel_bound else "legacy",
                      action=value.get("action") is True, to=self.scope.me if kind == "dm" else None,
                      salt=salt if salt is not None else msg_id, lookalike=peer.lookalike)
        if not (isinstance(msg.salt, str) and SALT_RE.fullmatch(msg.salt)):
            return
        follows = False
        if salt is None:  # 0.2: its signature covers its own id, so it cannot be passed on under ours
            msg.id = msg.bound_id()
        elif msg.bound_id() != msg_id:
            log.debug("%r: a message whose id does not fit its words, dropped", peer)
            return
        elif peer.message_key is not None:  # the signature lets us pass it on; it needs the peer's hello
            msg.sig = sig if is_signature_text(sig) else None
            follows = sig is None and self._unsigned_bytes.get(peer, 0) + len(text) <= MAX_UNSIGNED_BYTES
        self._accept(msg, peer, "chat" if kind == "message" else "dm", signature_follows=follows, ack_id=msg_id)

    def _on_signatures(self, peer: Peer, kind: str, value: dict) -> None:
        """Signatures of messages an rtchat.py 0.2 peer sent ahead of them, one each: now they are written."""
        sigs = value.get("sigs")
        if not isinstance(sigs, dict):
            return
        for msg_id, sig in itertools.islice(sigs.items(), 1000):
            waiting = self._take_unsigned((peer.name, msg_id))
            if waiting is not None:
                entry, sender, label, _ = waiting
                if is_signature_text(sig):
                    entry["sig"] = sig
                self.journal.add(entry, sender, label)

    def _on_batch(self, peer: Peer, kind: str, value: dict) -> None:
        """One signature over a batch of the peer's messages sent ahead of it: each message it names here keeps
        the signature and its proof (built from the batch's leaves), so that it can be passed on and checked
        alone; one whose leaf is not the one named is written without. Then they are written and acked."""
        sig, ids = value.get("sig"), value.get("ids")
        hashes = decode_hashes(value.get("leaves"), MAX_BATCH)
        if not (is_signature_text(sig) and isinstance(ids, list) and hashes and len(hashes) == len(ids)):
            return
        tree = None
        for at, msg_id in enumerate(ids):
            waiting = self._take_unsigned((peer.name, msg_id)) if isinstance(msg_id, str) else None
            if waiting is None:
                continue
            entry, sender, label, _ = waiting
            signed = signed_bytes("message", self.scope.topic, entry["from"], entry["id"], entry["ts"], entry["text"],
                                  entry["action"])
            if batch_leaf(signed) == hashes[at]:
                tree = tree or batch_tree(hashes)
                entry.update(sig=sig, proof=batch_proof(at, len(hashes), batch_path(tree, at)))
            self.journal.add(entry, sender, label)

    def _take_unsigned(self, key: tuple[str, str]) -> tuple[dict, Peer, str, float] | None:
        waiting = self._unsigned.pop(key, None)
        if waiting is not None and waiting[1] in self._unsigned_bytes:
            self._unsigned_bytes[waiting[1]] -= len(waiting[0]["text"])
        return waiting

    def _write_unsigned(self, now: float | None = None) -> None:
        """Messages whose signature did not come by their deadline are written (and acked) without one."""
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        now = time.monotonic() if now is None else now
        for key, (entry, peer, label, deadline) in list(self._unsigned.items()):
            if deadline <= now:
                self._take_unsigned(key)
                self.journal.add(entry, peer, label)
        if self._unsigned:
            due = min(deadline for _, _, _, deadline in self._unsigned.values())
            self._sweep = self._tasks.later(max(0.0, due - time.monotonic()), self._write_unsigned)

    def _accept(self, msg: Message, peer: Peer | None, ack_label: str, signature_follows: bool = False,
                ack_id: str | None = None) -> None:
        """A message we did not have: shown now, written to disk, and acknowledged (as ack_id, the id it came
        with) once it is on disk. One whose signature follows waits for it (or SIGNATURE_WAIT_S) before it is
        written."""
        if self.journal.knows(msg.id):
            if peer is not None and peer.can("acks") and msg.id not in self.journal.pending:
                peer.send(ack_label, {"t": "ack", "ids": [ack_id or msg.id]})  # a resend: we have it already
            return
        entry = msg.record()
        if signature_follows:
            self.journal.remember(msg.id)
            self.journal.pending.add(msg.id)
            self._unsigned[(peer.name, msg.id)] = (entry, peer, ack_label, time.monotonic() + SIGNATURE_WAIT_S)
            self._unsigned_bytes[peer] = self._unsigned_bytes.get(peer, 0) + len(msg.text)
            if len(self._unsigned) > MAX_UNSIGNED:  # a peer that never signs: the oldest is written as it is
                self.journal.add(*self._take_unsigned(next(iter(self._unsigned)))[:3])
            if self._sweep is None:
                self._write_unsigned()
        else:
            self.journal.add(entry, peer if peer is not None and peer.can("acks") else None, ack_label, ack_id)
        self._emit("history" if msg.history else msg.kind, msg)

    def _accept_relayed(self, msg: Message) -> None:
        self._accept(msg, None, "chat")

    def _on_ack(self, peer: Peer, kind: str, value: dict) -> None:
        ids = value.get("ids")
        if not isinstance(ids, list):
            return
        delivered = []
        for msg_id in (i for i in ids[:1000] if isinstance(i, str)):
            self.routes.forget(msg_id, peer.name)
            if msg_id in self._unacked:
                self._unacked[msg_id].discard(peer.name)
                if not self._unacked[msg_id]:
                    del self._unacked[msg_id]
            if self._dm_ids.get(msg_id) == peer.name:
                del self._dm_ids[msg_id]
                delivered.append(msg_id)
                self._emit("delivered", msg_id, peer)
        self.changed.fire()
        if delivered:
            done = set(delivered) & {e.get("id") for e in self.scope.store.data["outbox"]}
            if done:
                self.scope.store.update(lambda d: d.update(outbox=[e for e in d["outbox"] if e.get("id") not in done]))

    def _on_hello(self, peer: Peer, kind: str, value: dict) -> None:
        """An rtchat.py peer's message key, certified by the identity key we verified: then we compare notes."""
        if not verify_message_key(peer.key_string, value.get("mkey"), value.get("mcert")):
            log.info("%s sent a message key its identity did not certify", peer.name)
            return
        peer.message_key = value["mkey"]
        peer.late_signatures = value.get("late_sigs") is True and value.get("batches") is True
        peer.takes_files = value.get("files") is True
        author = {"key": peer.key_string, "mkey": value["mkey"], "mcert": value["mcert"]}
        if self.scope.store.data["authors"].get(peer.fingerprint) != author:
            self.scope.store.defer(lambda d: d["authors"].__setitem__(peer.fingerprint, author))
        self._on_hello_heard(peer)
        if self.syncs(peer):
            self._tasks.spawn(self._sync(peer), f"sync-{peer.name}")
        self.routes.changed()

    async def _sync(self, peer: Peer) -> None:
        """Tell a peer which messages we have: it answers with what we lack."""
        entries = await off_loop(self.log.entries)
        self.relays.asked(peer)  # what we take from it in answer
        peer.send("chat", {"t": "sync", "ids": [e["id"] for e in entries[-HISTORY_PER_ROOM:]]})

    def _on_sync(self, peer: Peer, kind: str, value: dict) -> None:
        self.relays.on_sync(peer, value, batches=peer.late_signatures)

    def _on_backfill(self, peer: Peer, kind: str, value: dict) -> None:
        self.relays.on_backfill(peer, value)

    def send_outbox(self, peer: Peer | Remote) -> None:
        """Direct messages that waited for this peer (or member reached through others) go out now; an ack takes
        them out of the outbox."""
        waiting = [e for e in self.scope.store.data["outbox"]
                   if e.get("room") == self.scope.room and e.get("to") == bare_name(peer.name)]
        for entry in waiting:
            msg = Message.from_dict(entry)
            if isinstance(peer, Remote):
                if msg.salt is not None and msg.sig is not None:  # (one written by rtchat.py 0.2 waits on)
                    self._relay(msg, [peer])
                    self._dm_ids[msg.id] = peer.name
            elif self._send_text(peer, "dm", msg):
                self._dm_ids[msg.id] = peer.name
        if waiting and not peer.can("acks"):  # browsers do not acknowledge: sent is all we can know
            ids = {e["id"] for e in waiting}
            self.scope.store.update(lambda d: d.update(outbox=[e for e in d["outbox"] if e.get("id") not in ids]))

    # what rtchat.py peers send each other on chat and dm, besides plain text (browsers' frames)
    def _on_reach(self, peer: Peer, kind: str, value: dict) -> None:
        self.routes.on_reach(peer, value)

    def _on_relay(self, peer: Peer, kind: str, value: dict) -> None:
        self.routes.on_relay(peer, value)

    def _on_relayed(self, peer: Peer, kind: str, value: dict) -> None:
        self.routes.on_relayed(peer, value)

    def _on_relay_refused(self, peer: Peer, kind: str, value: dict) -> None:
        self.routes.on_refused(peer, value)

    _FRAMES = {"msg": _on_signed_text, "sigs": _on_signatures, "batch": _on_batch, "ack": _on_ack,
               "hello": _on_hello, "sync": _on_sync, "backfill": _on_backfill, "reach": _on_reach,
               "relay": _on_relay, "relayed": _on_relayed, "relay-refused": _on_relay_refused}


# =============================================================================
# Large rooms: past LARGE_ROOM_FACTOR times D rtchat.py members a room runs on
# gossip (the Gossip section's core) instead of a full mesh. Each member keeps
# at most D sessions with other rtchat.py members, the ones Membership chooses;
# what is said goes along the BroadcastTree signed by its author (a direct
# message also sealed to its recipient), and acks come back the way each
# message came, signed by whoever acks; who is in the room is known from signed
# presence. Browsers keep their direct sessions. Uses Negotiation (which
# sessions to set up) and the Ledger (what is taken, and checked as it is).
# =============================================================================

LARGE_ROOM_FACTOR = 2        # a room is large once it has more than this many times D rtchat.py members
MIN_PEERS, MAX_PEERS_LIMIT = 3, 64  # the D --max-peers takes (with 2 the overlay is rings, easily cut in two)
JOIN_CONTACTS = 3            # members of a large room that answer one newcomer's announcement, on average
PRESENCE_EVERY_S = 30.0      # each member of a large room says it is here this often (signed, by gossip) ...
MEMBER_EXPIRE_S = 100.0      # ... and is forgotten when not heard from for this long (a member killed, not left)
PRESENCE_FRESH_MS = 45_000   # a member whose presence is older than this is not heard by gossip (split, or gone)
MAX_MEMBERS = 2000           # members of a large room known at once
MEMBERS_PER_FRAME = 32       # presence records in one frame to a new neighbour
LINK_GRACE_S = 10.0          # a session with an rtchat.py member that is no neighbour of ours is closed after this
MAX_QUEUED_GOSSIP = 16       # frames waiting for the session with the member they go to
ROOM_NEIGHBOR_WAIT_S = 10.0  # a join or neighbour request in a room: a session is set up first (3 s is too short
#                              on a loaded machine: each try given up set up another session elsewhere)
MERGE_EVERY_S = 30.0         # a member asks a member of another part of a split overlay at most this often
ORDER_WAIT_S = 1.0           # a message ahead of its turn waits this long for those before it
MAX_HELD_PER_AUTHOR = 64     # ... and at most this many wait at once
SYNC_PEERS = 2               # members of a large room a member compares history with (when it joins)
ACK_GATHER_S = 0.01          # acks going to one neighbour are gathered this long into one frame ...
ACKS_PER_FRAME = 64          # ... of at most this many
ACK_WANDER_HOPS = 8          # an ack whose way back is broken goes on to a random neighbour at most this often
ACK_PATHS = 10_000           # our neighbours that brought us messages, remembered to send acks back the same way
MAX_GOSSIP_CHARS = RELAY_MAX_CHARS  # a sealed direct message passed on by gossip
OVERLAY_FRAMES = ("g", "gack", "members")  # the `t` of what members of a large room send each other on chat


def presence_id(topic: str, name: str, ts: int, kind: str) -> str:
    """A presence record's gossip id, bound to what it says: nobody can take the id of another's record."""
    return "p" + hashlib.sha256(signed_bytes("presence", topic, name, ts, kind)).hexdigest()[:40]


@dataclasses.dataclass(slots=True)
class Ordering:
    """One author's messages in a large room, in the order it numbered them: one that comes ahead of its turn (the
    tree is being repaired) is held until those before it come, or for ORDER_WAIT_S at most."""
    epoch: str
    last: int                                   # the number of the last message taken
    held: dict[int, Callable[[], None]] = dataclasses.field(default_factory=dict)
    timer: asyncio.TimerHandle | None = None

    def came(self, number: int, take: Callable[[], None]) -> None:
        if number <= self.last:
            take()  # one we gave up waiting for: late, but not lost
        elif number == self.last + 1 or len(self.held) >= MAX_HELD_PER_AUTHOR:
            self.last = number
            take()
            self._release()
        else:
            self.held[number] = take

    def _release(self) -> None:
        while self.last + 1 in self.held:
            self.last += 1
            self.held.pop(self.last)()

    def give_up(self) -> None:
        """Those before did not come in time: what is held is taken, in order."""
        self.timer = None
        for number in sorted(self.held):
            self.last = max(self.last, number)
            self.held.pop(number)()


class Overlay(SessionPolicy):
    """A large room's overlay, for one member (see the section's banner). Negotiation asks it which sessions to
    set up (wants, answers, announces) and tells it who announced (heard); the room hands it its gossip frames
    and sessions; the ledger sends through it (spread, send) and it hands the ledger what it delivers, checked.

    max_peers: D (0: never large, a full mesh whatever the room's size). present=False: we do not say we are here
    (a pipe: nobody should wait to hear from it, or send it acks it will not stay for). Members are Remotes whose
    routes is this overlay (acks to them go back by gossip paths). Emits nothing: what is taken is the ledger's to
    say."""

    def __init__(self, scope: Scope, sessions: Sessions, negotiation: Negotiation, network: RoomSignaling,
                 ledger: Ledger, *, max_peers: int, present: bool = True, rng: random.Random | None = None) -> None:
        self.scope, self.sessions, self.negotiation, self.network, self.ledger = scope, sessions, negotiation, \
            network, ledger
        self.max_peers, self.present = max_peers, present
        self.rng = rng or random.Random()
        self.gossip: Gossip | None = None       # made when the room becomes large
        self.members: dict[str, tuple[Remote, dict, float]] = {}  # name -> member, its presence record, heard when
        self._speakers: dict[str, None] = {}    # rtchat.py members that announced they gossip (bounded)
        self._queued: dict[str, list[dict]] = {}  # frames for members whose session is being set up
        self._paths: dict[str, str] = {}        # message id -> the neighbour it came from (acks go back that way)
        self._checked: dict[str, tuple] = {}    # gossip id -> what checking its payload found, until delivered
        self._grace: dict[str, asyncio.TimerHandle] = {}  # sessions that are no neighbour's, closed unless wanted
        self._epoch, self._said = secrets.token_hex(4), 0  # our messages are numbered from 1 in this epoch
        self._order: dict[str, Ordering] = {}   # per author: what came ahead of its turn, held briefly
        self._acks_out: dict[Peer, list[dict]] = {}  # acks gathered per neighbour, sent together
        self._acks_due: asyncio.TimerHandle | None = None
        self._last_merge = -math.inf            # when we last asked a member of another part
        self._synced = 0                        # members we compared history with since the room became large
        self._left: dict[str, dict] = {}        # members that said they left -> that record (older ones not taken)
        self._tasks = Tasks()
        if max_peers:
            network.user_info["gossip"] = network.compact_info["gossip"] = max_peers

    @property
    def large(self) -> bool:
        return self.gossip is not None

    async def close(self) -> None:
        """We leave: neighbours are told (so they repair at once), and so is the room."""
        if self.gossip is not None:
            self._spread_presence("bye")
            self._run(self.gossip.handle(Leave(), time.monotonic()))
        await self._tasks.close()

    # -- asked by Negotiation ------------------------------------------------------------------------
    def heard(self, name: str, data: Any, dialect: Dialect) -> None:
        """An rtchat.py member announced itself: one more that gossips, perhaps the member that makes the room large
        (or its announcement says the room is); in a large room our contact if we have no neighbour, or a member
        of another part of a split overlay."""
        if not self.offered(name, data, dialect) or self.gossip is None:
            return
        membership = self.gossip.membership
        if not membership.active and not membership.pending:
            self._handle(Join(name))  # our way in (a member that has one lets newcomers find their own)
        elif data.get("large") is True and self._split_from(name):
            self._last_merge = time.monotonic()
            self._handle(Merge(name))  # a member of the room we do not hear: the overlay is split

    def offered(self, name: str, data: Any, dialect: Dialect) -> bool:
        """A member's userInfo (announced or with an offer): whether it gossips. One that says the room is
        large, or one too many, makes it large."""
        if not (self.max_peers and dialect.compact and isinstance(data, dict) and data.get("gossip")):
            return False
        new = self._note_speaker(name)
        if self.gossip is None and (data.get("large") is True or new and self._here() >= LARGE_ROOM_FACTOR *
                                    self.max_peers):
            self._become_large()
        return True

    def _here(self) -> int:
        """Members that gossip and are here: announced lately, or in a session with us. (Counted as announced, not
        once verified: processes started together would otherwise each set up sessions with all the others
        before any is verified. Made-up names can make a room large; it then runs on gossip, nothing is lost.)"""
        return sum(1 for name in self._speakers if (peer := self.sessions.peers.get(name)) is not None
                   and peer.state != "closed")

    def _note_speaker(self, name: str) -> bool:
        """Whether name is new among the members that gossip."""
        new = self._speakers.pop(name, False) is False
        self._speakers[name] = None
        if len(self._speakers) > MAX_MEMBERS:
            del self._speakers[next(iter(self._speakers))]
        return new

    def covers(self, name: str) -> bool:
        """Whether a member is reached by gossip (so not through a member that says it reaches it)."""
        return self.gossip is not None and name in self._speakers

    def syncs(self, peer: Peer) -> bool:
        """Whether to compare history with a peer whose session just began: in a large room with the first
        SYNC_PEERS members only (sessions come and go there, and one history is the room's history), so that what
        a member passes on when it joins is bounded, not one backfill per session."""
        if self.gossip is None or peer.name not in self._speakers:
            return True
        self._synced += 1
        return self._synced <= SYNC_PEERS

    def gossips_with(self, peer: Peer) -> bool:
        """Whether what we say reaches this verified peer by gossip (in a large room, a member that gossips)."""
        return self.covers(peer.name)

    def wants(self, name: str, dialect: Dialect) -> bool:
        """A session with this member now: in a full mesh with everyone; in a large room with browsers, members
        that do not gossip, and neighbours (or members asked to be one)."""
        if self.gossip is None or not dialect.compact or name not in self._speakers:
            return True
        membership = self.gossip.membership
        return name in membership.active or name in membership.pending

    def _split_from(self, name: str) -> bool:
        """Whether a member of the large room that announced itself seems to be in another part of a split overlay
        (its presence does not reach us), and we should ask it (a few members do, at most once per MERGE_EVERY_S
        each, and only members settled in their own part: a room forming is not a split room)."""
        settled = 2 * len(self.gossip.membership.up_neighbors()) >= self.max_peers
        return settled and not self._hears(name) and time.monotonic() - self._last_merge > MERGE_EVERY_S and \
            self.rng.random() < JOIN_CONTACTS / max(1, len(self.members))

    def _hears(self, name: str) -> bool:
        """Whether a member's presence reached us lately (by gossip, or from a neighbour that heard it)."""
        known = self.members.get(name)
        return known is not None and now_ms() - known[1]["ts"] < PRESENCE_FRESH_MS

    def answers(self, name: str, data: Any) -> bool:
        """Whether to answer a newcomer we do not want a session with: in a large room only a few members do
        (about JOIN_CONTACTS), so that a join costs the broker a few deliveries, not one per member; a member
        short of neighbours always does. A member of the large room (its announcement says so) needs no answer."""
        if self.gossip is None:
            return True
        if isinstance(data, dict) and data.get("large") is True:
            return False
        short = 2 * len(self.gossip.membership.active) < self.max_peers
        return short or self.rng.random() < JOIN_CONTACTS / max(1, len(self.members))

    def announces(self, due: bool) -> bool:
        """Whether to announce on schedule: in a large room while short of neighbours, and the member that sorts
        first among those whose presence reaches it (one per part of the overlay: should it be split, each part
        hears the other's, and they merge)."""
        if self.gossip is None:
            return due
        first = all(collation_key(self.scope.me) < collation_key(name) for name in self.members if self._hears(name))
        return first or 2 * len(self.gossip.membership.up_neighbors()) < self.max_peers

    # -- becoming large ------------------------------------------------------------------------------------
    def _become_large(self) -> None:
        """The room is large: from now on, at most D sessions with members that gossip. Those we have are the
        first contacts; the ones Membership does not keep are closed after LINK_GRACE_S."""
        self.gossip = Gossip(self.scope.me, self.rng, max_neighbors=self.max_peers, neighbor_wait=ROOM_NEIGHBOR_WAIT_S)
        self.network.user_info["large"] = self.network.compact_info["large"] = True
        log.info("#%s is large: gossip with at most %d neighbours", self.scope.room, self.max_peers)
        self._tasks.later(0, self._spread_presence, "here")
        for peer in self.sessions.verified():
            if peer.name in self._speakers:
                self._handle(Join(peer.name))
                self._on_probation(peer)
                self._tell_members(peer)

    # -- sessions -------------------------------------------------------------------------------------------
    def peer_verified(self, peer: Peer) -> None:
        if self.gossip is None or peer.name not in self._speakers:
            return
        self._tell_members(peer)
        membership = self.gossip.membership
        if peer.name in membership.active:
            self._handle(NeighborUp(peer.name))
        else:
            self._on_probation(peer)
        for frame in self._queued.pop(peer.name, []):
            peer.send_paced("chat", {"t": "g", "g": frame})

    def peer_gone(self, peer: Peer) -> None:
        self._queued.pop(peer.name, None)
        handle = self._grace.pop(peer.name, None)
        if handle is not None:
            handle.cancel()
        if self.gossip is not None and peer.name in self.gossip.membership.active:
            self._handle(NeighborDown(peer.name))

    def _on_probation(self, peer: Peer) -> None:
        """A session with a member that is no neighbour (yet): it may be asking to be one; if it is not one by
        LINK_GRACE_S, it is closed."""
        if peer.name not in self._grace:
            self._grace[peer.name] = self._tasks.later(LINK_GRACE_S, self._end_probation, peer)

    def _end_probation(self, peer: Peer) -> None:
        self._grace.pop(peer.name, None)
        if self.sessions.peers.get(peer.name) is peer and not self.wants(peer.name, peer.dialect):
            peer.close("not a neighbour in a large room")

    # -- the core, run ------------------------------------------------------------------------------------------
    def _handle(self, event: Any) -> None:
        if self.gossip is not None:
            self._run(self.gossip.handle(event, time.monotonic()))

    def _run(self, actions: list) -> None:
        for action in actions:
            kind = type(action)
            if kind is SendMessage:
                self._send(action.peer, action.msg)
            elif kind is Deliver:
                self._deliver(action)
            elif kind is ScheduleTimer:
                self._tasks.later(action.delay, self._handle, TimerExpired(action.timer))
            elif kind is Connect:
                peer = self.sessions.peers.get(action.peer)
                if peer is not None and peer.is_verified:
                    self._tasks.later(0, self._handle, NeighborUp(action.peer))
                else:
                    self.negotiation.open(action.peer)
            elif kind is Disconnect:
                peer = self.sessions.peers.get(action.peer)
                if peer is not None and peer.is_verified:
                    self._on_probation(peer)  # what we said last (why we drop it) goes out first
                elif peer is not None and peer.state != "closed" and not self.wants(peer.name, peer.dialect):
                    peer.close("no longer a neighbour")
            elif kind is FindContact:
                self.network.announce()

    def _send(self, name: str, frame: dict) -> None:
        """A frame of the core to a member: on our session with it; one that asks to be a neighbour (join, nbr)
        sets up a session first; others to a member we have no session with are dropped (a shuffle's answer, a
        goodbye: the core does without them)."""
        peer = self.sessions.peers.get(name)
        if peer is not None and peer.is_verified:
            peer.send_paced("chat", {"t": "g", "g": frame})
        elif frame.get("t") in ("join", "nbr") or (peer is not None and peer.state in ("connecting", "open")):
            queue = self._queued.setdefault(name, [])
            if len(queue) < MAX_QUEUED_GOSSIP:
                queue.append(frame)
            self.negotiation.open(name)

    def on_frame(self, peer: Peer, value: dict) -> None:
        """A frame from a verified session: gossip ('g', which makes the room large if it was not), an ack going
        back ('gack') or who is here ('members')."""
        if not (self.max_peers and peer.is_rtchat_py and peer.allow("gossip")):
            return
        self._note_speaker(peer.name)
        if value.get("t") == "gack":
            self._on_acks(peer, value)
            return
        if value.get("t") == "members":
            self._on_members(peer, value.get("ms"))
            return
        frame = value.get("g")
        if not isinstance(frame, dict):
            return
        if self.gossip is None:
            self._become_large()
        if frame.get("t") == "gossip" and not self._precheck(peer, frame):
            return
        self._handle(RecvMessage(peer.name, frame))

    # -- what goes round ------------------------------------------------------------------------------------
    def spread(self, payload: dict, msg_id: str, whole: bool = False) -> None:
        """Our own message (or presence) to the whole room, by the tree (whole: to every neighbour at once)."""
        if self.gossip is not None:
            self._handle(Broadcast(msg_id, payload, whole))

    def spread_message(self, record: dict) -> None:
        """Our chat message (its record, signed) to the whole room, numbered so that each member shows our
        messages in the order we said them."""
        self._said += 1
        self.spread({"t": "msg", "m": record, "a": self.scope.author(self.scope.identity.fingerprint),
                     "e": self._epoch, "n": self._said}, record["id"])

    def send(self, remotes: list[Remote], inner: dict, msg_id: str | None = None, record: dict | None = None
             ) -> None:
        """A direct message, sealed to its recipient (inner, see Routes.seal), to the whole room by the tree:
        only its recipient can open it. (Routes' interface: the ledger sends through either.)"""
        for remote in remotes:
            self.spread({"t": "dm", "to": remote.name, "from": self.scope.me, "a": self.scope.author(
                self.scope.identity.fingerprint), "box": inner}, msg_id or new_id())

    def seal(self, remote: Remote, record: dict) -> dict:
        return self.ledger.routes.seal(remote, record)

    def _precheck(self, peer: Peer, frame: dict) -> bool:
        """A gossip frame's payload is checked before it is passed on: a forged one stops at the first member. What
        was found waits for the delivery."""
        msg_id, payload = frame.get("id"), frame.get("d")
        if not isinstance(msg_id, str) or self.gossip.tree.has_seen(msg_id):
            return True  # a duplicate: the core prunes the link
        if not isinstance(payload, dict):
            return False
        kind = payload.get("t")
        author = self._author(payload.get("a"))
        if author is None:
            return False
        if kind == "msg":
            record = payload.get("m")
            if not isinstance(record, dict) or record.get("id") != msg_id or \
                    record.get("fingerprint") != author[0]:
                return False
            checked = self.ledger.check_relayed(peer, {author[0]: author[1]}, record)
            if checked is None or not checked[0].sig:
                return False
            found = (checked[0],)
        elif kind in ("here", "bye"):
            presence = self._check_presence(payload, msg_id)
            if presence is None:
                return False
            found = (presence[0],)
        elif kind == "dm":
            sender = payload.get("from")
            box = payload.get("box")
            if not (is_wire_name(sender) and is_wire_name(payload.get("to")) and isinstance(box, dict)
                    and len(to_json(box)) <= MAX_GOSSIP_CHARS):
                return False
            found = (sender,)
        else:
            return False
        if not self._pinned_ok(found[0] if kind != "msg" else found[0].sender, author[0]):
            return False
        self._checked[msg_id] = (kind, author, *found)
        if len(self._checked) > MAX_CACHED:
            del self._checked[next(iter(self._checked))]
        return True

    def _author(self, told: Any) -> tuple[str, dict] | None:
        """(fingerprint, credentials) from a payload's author field, if its certificate holds (see Routes)."""
        fp, author = self.ledger.routes.told_author(told)
        return (fp, author) if fp is not None else None

    def _pinned_ok(self, name: str, fp: str) -> bool:
        pins = self.scope.trust.pins_for(bare_name(name))
        if pins and fp not in pins:
            log.info("gossip in %s's name signed by a key not pinned for it: dropped", name)
            return False
        return True

    def _deliver(self, delivered: Deliver) -> None:
        found = self._checked.pop(delivered.id, None)
        via = self.sessions.peers.get(delivered.via)
        if found is None or via is None:
            return
        kind, (fp, author) = found[0], found[1]
        if kind in ("here", "bye"):
            self._presence(found[2], fp, author, kind, delivered.payload)
            return
        sender = found[2].sender if kind == "msg" else found[2]
        if kind == "dm" and delivered.payload.get("to") != self.scope.me:
            return  # passed on by the tree; only its recipient can open it
        self._paths[delivered.id] = delivered.via
        if len(self._paths) > ACK_PATHS:
            del self._paths[next(iter(self._paths))]
        remote = self._member(sender, fp, author)
        if kind == "dm":
            self.ledger.routes.take(via, remote, author, delivered.payload["box"])
            return
        epoch, number = delivered.payload.get("e"), _count_field(delivered.payload.get("n"), 2 ** 53)
        take = functools.partial(self.ledger.routes.take, via, remote, author,
                                 {"t": "msg", "m": delivered.payload["m"]}, found[2])
        if not (isinstance(epoch, str) and len(epoch) <= 16 and number):
            take()
            return
        order = self._order.pop(sender, None)
        if order is None or order.epoch != epoch:
            order = Ordering(epoch, number - 1)
        self._order[sender] = order  # most recent last: the table is bounded oldest first
        if len(self._order) > MAX_MEMBERS:
            del self._order[next(iter(self._order))]
        order.came(number, take)
        if order.held and order.timer is None:
            order.timer = self._tasks.later(ORDER_WAIT_S, order.give_up)

    def _member(self, name: str, fp: str, author: dict) -> Remote:
        known = self.members.get(name)
        if known is not None and known[0].fingerprint == fp:
            return known[0]
        pinned = fp in self.scope.trust.pins_for(bare_name(name))
        return Remote(name, author, fp, "relayed" if pinned else "unverified", [], self)

    # -- who is here ----------------------------------------------------------------------------------------
    def _spread_presence(self, kind: str) -> None:
        """That we are here (again, every PRESENCE_EVERY_S) or leaving, signed, to the whole room."""
        if self.gossip is None or not self.present:
            return
        record = self._own_presence(kind)
        self.spread(record, presence_id(self.scope.topic, self.scope.me, record["ts"], kind), whole=kind == "bye")
        if kind == "here":
            self._expire_members()
            self._tasks.later(PRESENCE_EVERY_S * self.rng.uniform(0.9, 1.1), self._spread_presence, "here")

    def _own_presence(self, kind: str) -> dict:
        ts, me = now_ms(), self.scope.me
        sig = self.scope.identity.sign_message(signed_bytes("presence", self.scope.topic, me, ts, kind))
        return {"t": kind, "n": me, "ts": ts, "sig": sig, "a": self.scope.author(self.scope.identity.fingerprint)}

    def _tell_members(self, peer: Peer) -> None:
        """Who is here, as each member said it (signed), to a member we have a session with: a newcomer knows the
        room at once, not at the next round of presence."""
        records = [self._own_presence("here")] if self.present else []
        records += [record for _, record, _ in self.members.values()] + list(self._left.values())
        for start in range(0, len(records), MEMBERS_PER_FRAME):
            peer.send_paced("chat", {"t": "members", "ms": records[start:start + MEMBERS_PER_FRAME]})

    def _on_members(self, peer: Peer, records: Any) -> None:
        """Who is here, from a member: each record checked as if it came by gossip."""
        if not isinstance(records, list) or len(records) > MEMBERS_PER_FRAME:
            return
        for record in records:
            found = self._check_presence(record) if isinstance(record, dict) else None
            if found is not None:
                self._presence(found[0], found[1], found[2], record["t"], record, by_gossip=False)

    def _check_presence(self, payload: dict, msg_id: str | None = None) -> tuple[str, str, dict] | None:
        """(name, fingerprint, credentials) of a signed presence record (with msg_id: its gossip id), or None."""
        kind, name, ts, sig = (payload.get(k) for k in ("t", "n", "ts", "sig"))
        author = self._author(payload.get("a"))
        if not (kind in ("here", "bye") and author is not None and is_wire_name(name) and valid_ts(ts)
                and msg_id in (None, presence_id(self.scope.topic, name, ts, kind))
                and self._pinned_ok(name, author[0])
                and verify_message(author[1]["mkey"], sig, signed_bytes("presence", self.scope.topic, name, ts,
                                                                        kind))):
            return None
        return name, *author

    def _presence(self, name: str, fp: str, author: dict, kind: str, record: dict, by_gossip: bool = True) -> None:
        """A presence record: by gossip it is news from its author; from a neighbour's list (by_gossip False) it
        counts as heard when it was said, so a member killed long ago is not kept alive by lists passed around."""
        if name == self.scope.me:
            return
        known = self.members.get(name)
        if (known is not None and known[1]["ts"] >= record["ts"]) or \
                self._left.get(name, {}).get("ts", -1) >= record["ts"]:
            return  # not newer than what we know, or said before it left
        if kind == "bye":
            self.members.pop(name, None)
            self._left.pop(name, None)
            self._left[name] = record
            if len(self._left) > MAX_MEMBERS:
                del self._left[next(iter(self._left))]
            self.ledger.changed.fire()
            return
        heard = time.monotonic() - (0.0 if by_gossip else max(0.0, (now_ms() - record["ts"]) / 1000))
        self.members.pop(name, None)
        self.members[name] = (self._member(name, fp, author), record, heard)
        if len(self.members) > MAX_MEMBERS:
            del self.members[next(iter(self.members))]
        if known is None:
            self.negotiation.note_activity()
            if not (name in self.sessions.peers and self.sessions.peers[name].is_verified):
                self.ledger.send_outbox(self.members[name][0])  # direct messages that waited for it

    def _expire_members(self) -> None:
        now = time.monotonic()
        for name in [n for n, (_, _, heard) in self.members.items() if now - heard > MEMBER_EXPIRE_S]:
            del self.members[name]

    def member_names(self) -> list[str]:
        """Every member of a large room known to be here (not us), for the ledger to await acks from."""
        return list(self.members)

    # -- acks, back the way each message came -----------------------------------------------------------------
    def send_ack(self, remote: Remote, ids: list[str]) -> bool:
        """Our acks to a member, signed with our message key, to the neighbour each message came from (on the
        way back to its author)."""
        sig = self.scope.identity.sign_message(signed_bytes("relay-ack", self.scope.topic, self.scope.me,
                                                            remote.name, ids))
        ways: dict[str, list[str]] = {}
        for msg_id in ids:
            ways.setdefault(self._paths.get(msg_id, remote.name), []).append(msg_id)
        sent = False
        for via in ways:
            peer = self.sessions.peers.get(via)
            if peer is not None and peer.is_verified:
                self._ack_to(peer, {"to": remote.name, "from": self.scope.me, "ids": ids, "sig": sig})
                sent = True
        return sent

    def _ack_to(self, peer: Peer, entry: dict) -> None:
        """An ack to a neighbour, gathered for ACK_GATHER_S with the others going its way: acks converge on their
        authors along the tree, and one frame carries many."""
        queue = self._acks_out.setdefault(peer, [])
        queue.append(entry)
        if len(queue) >= ACKS_PER_FRAME:
            self._flush_acks(peer)
        elif self._acks_due is None:
            self._acks_due = self._tasks.later(ACK_GATHER_S, self._flush_all_acks)

    def _flush_all_acks(self) -> None:
        self._acks_due = None
        for peer in list(self._acks_out):
            self._flush_acks(peer)

    def _flush_acks(self, peer: Peer) -> None:
        entries = self._acks_out.pop(peer, None)
        if entries and peer.is_verified:
            peer.send("chat", {"t": "gack", "acks": entries})

    def _pass_ack(self, peer: Peer, to: str, value: dict) -> None:
        """Acks on their way to another member: the way the message came, else straight to the author if we have a
        session with it, else to another neighbour (a few hops at most: a path broken by churn, mended)."""
        via = self.sessions.peers.get(self._paths.get(value["ids"][0], to))
        if via is None or via is peer or not via.is_verified:
            hops = _count_field(value.get("h", ACK_WANDER_HOPS), ACK_WANDER_HOPS)
            others = [n for n in self.neighbors() if n != peer.name]
            if not hops or not others:
                return
            value = {**value, "h": hops - 1}
            via = self.sessions.peers.get(self.rng.choice(others))
        if via is not None and via.is_verified:
            self._ack_to(via, value)

    def _on_acks(self, peer: Peer, value: dict) -> None:
        entries = value.get("acks")
        if isinstance(entries, list) and len(entries) <= ACKS_PER_FRAME:
            for entry in entries:
                if isinstance(entry, dict):
                    self._on_ack(peer, entry)

    def _on_ack(self, peer: Peer, value: dict) -> None:
        """An ack for a member's messages: ours are checked and taken; others go on the way their messages came."""
        to, sender, ids, sig = (value.get(k) for k in ("to", "from", "ids", "sig"))
        if not (is_wire_name(to) and is_wire_name(sender) and isinstance(ids, list) and 0 < len(ids) <= 1000
                and all(is_message_id(i) for i in ids)):
            return
        if to != self.scope.me:
            self._pass_ack(peer, to, value)
            return
        member = self.members.get(sender)
        present = self.sessions.peers.get(sender)
        mkey = member[0].author["mkey"] if member else present.message_key if present else None
        if mkey is None or not verify_message(mkey, sig, signed_bytes("relay-ack", self.scope.topic, sender,
                                                                       self.scope.me, ids)):
            log.info("an ack in %s's name through %s that %s did not sign: dropped", sender, peer.name, sender)
            return
        self.ledger.acked(member[0] if member else present, ids)

    # -- what the room shows ------------------------------------------------------------------------------------
    def neighbors(self) -> list[str]:
        return self.gossip.membership.up_neighbors() if self.gossip is not None else []


# =============================================================================
# PeerJS place: the chat on a PeerJS mesh as a front end sees a room, a thin
# adapter over PeerJSMesh: say a line, the members with their state and round
# trip, events (message, join, leave, key-changed, verify-failed, mitm-detected,
# disk-error...). Its lines are kept in a history of their own. Uses PeerJS
# mesh, Messages, the Ledger's Journal, Admission; knows no Room.
# =============================================================================

PEERJS_ROOM = "peerjs"  # the "room" of what --json prints from the PeerJS network (a mesh has no name)
UNVERIFIED_JOIN = "joined (unverified: peerjs-multichat has no identities)"
UNVERIFIED_PINNED_JOIN = "joined, UNVERIFIED: it proved no key, yet a key is pinned for that name (someone else " \
    "under the name, or a server that hid rtchat.py's fields): do not trust what it says as that person's"
UNVERIFIED_MARK = "?"   # after a name nothing proved (the page's users): 'bob?'; PeerJS names cannot hold it
PEERJS_LACKS = {   # what the PeerJS network cannot do, by command
    "msg": "peerjs-multichat has no direct messages: on PeerJS every line goes to everyone you are connected to",
    "ask": "peerjs-multichat has no questions (/ask): nobody on PeerJS can answer one",
    "send": "peerjs-multichat has no file transfer",
    "rooms": "peerjs-multichat has no rooms: you chat with everyone you are connected to (/connect NAME dials a "
             "user, /peers lists them)",
}


class PeerJSPageDialect(Dialect):
    """The peerjs-multichat page, as /peers and /whois name it: no keys, no direct messages, questions or files."""
    name = "peerjs-multichat"
    capabilities = frozenset()


PEERJS_PAGE = PeerJSPageDialect()


def peerjs_message(chat: PeerJSChat) -> Message:
    """A chat line on PeerJS as a Message. A page's is unverified (the page has no identities), at our clock if its
    own is junk, under an id made here; an rtchat.py peer's that proved its key is channel-bound, as it came."""
    if chat.proof is not None:
        return Message(id=chat.msg_id, room=PEERJS_ROOM, sender=chat.sender, text=chat.text, ts=chat.timestamp,
                       fingerprint=fingerprint(chat.proof.key), trust="channel-bound", action=chat.action,
                       salt=chat.salt, sig=chat.sig)
    ts = chat.timestamp if valid_ts(chat.timestamp) else now_ms()
    salt = new_id()
    return Message(id=message_id(chat.sender, None, ts, chat.text, False, salt), room=PEERJS_ROOM,
                   sender=chat.sender, text=chat.text, ts=ts, salt=salt)


def peerjs_history_key(server: PeerJSServer, name: str) -> str:
    """What a PeerJS chat's history is kept under: the server and our name there (a mesh has no name of its own:
    it is whoever we are connected to, and on another server or under another name it is another network)."""
    return f"peerjs {server} {name}"


@dataclasses.dataclass
class MeshMember:
    """Someone in the mesh, with the fields of a Peer that /peers, /whois and the chat's lines read."""
    name: str
    state: str                          # connecting, unverified (nothing proven: the page), verified
    dialect: Dialect = PEERJS_PAGE
    key_string: str | None = None
    rtt_ms: float | None = None
    path: str | None = None             # direct, relay (through TURN)
    client_tag: str | None = None       # what its OFFER or ANSWER said it runs (unchecked)
    lookalike: str | None = None
    pinned: bool = False                # a key is pinned for the name, though this one proved none

    @property
    def fingerprint(self) -> str | None:
        return fingerprint(self.key_string) if self.key_string else None

    @property
    def is_verified(self) -> bool:
        return self.state == "verified"

    @property
    def is_open(self) -> bool:
        return self.state in ("unverified", "verified")

    @property
    def channel_bound(self) -> bool:
        return self.is_verified


class PeerJSPlace(Emitter):
    """Us on a PeerJS mesh, for the chat and its commands: what they use of a Room (name, me, peers, label, find,
    send, history, events), over a PeerJSMesh. The page's users are unverified; an rtchat.py peer that proved its
    key on its connection is verified, its key pinned as in rooms (the same pins: a name is one person on both
    networks), and its lines are taken only with an id bound to them and its signature. Create with
    Client.join_peerjs()."""

    network_name = "peerjs"
    seal = None                 # no sealed meshes
    large = False               # a mesh is whom you connect to

    def __init__(self, name: str, *, server: str | None, ice: RTCConfiguration, identity: Identity, store: Store,
                 trust: Trust) -> None:
        super().__init__()
        self.name = PEERJS_ROOM
        self.me = name
        self.trust = trust
        self.admission = Admission(trust, name)
        self.admission.on("key-changed", functools.partial(self.emit, "key-changed"))
        self.mesh = PeerJSMesh(name, server=server, ice=ice, identity=identity, admits=self.admission.admits)
        self.server = self.mesh.signaling.server
        self.scope = Scope(PEERJS_ROOM, PEERJS_TOPIC, name, identity, store, trust)
        self._tasks = Tasks()
        self.journal = Journal(self.scope, HistoryLog(store.history_path(peerjs_history_key(self.server, name))),
                               self.emit, self._tasks, Pulse())
        self._present: dict[str, MeshMember] = {}   # who joined, as they were then (for their leave)
        for event, handler in (("join", self._on_join), ("leave", self._on_leave), ("chat", self._on_chat),
                               ("verify-failed", self._on_verify_failed)):
            self.mesh.on(event, handler)

    def __repr__(self) -> str:
        return f"PeerJSPlace({self.me!r} on {self.server})"

    @property
    def server_connected(self) -> bool:
        return self.mesh.signaling.is_connected

    @property
    def refused(self) -> dict[str, str]:
        """Name -> the last key refused for it (what /trust NAME accepts)."""
        return self.admission.refused

    async def join(self) -> None:
        """Log in (NameTaken, PeerServerRefused, PeerServerUnreachable) with the history read."""
        await self.journal.open()
        await self.mesh.start()

    async def connect(self, name: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
        """Dial a user (PeerUnavailable: not on the server; NoPeers: no connection in time)."""
        await self.mesh.connect(name, timeout)

    def retry(self, name: str) -> None:
        """Dial NAME again in the background (after /trust NAME)."""
        self._tasks.spawn(self._dial_quietly(name), f"retry-{name}")

    async def _dial_quietly(self, name: str) -> None:
        with contextlib.suppress(RtchatError):
            await self.mesh.connect(name)

    async def leave(self) -> None:
        """Leave the mesh, with what came written to the history first."""
        await self.mesh.close()
        self.journal.stopped = True
        await self.journal.done.until(lambda: self.journal.idle, COMMIT_EVERY_S * 20)
        await self._tasks.close()

    @property
    def peers(self) -> dict[str, MeshMember]:
        """Everyone connected or being connected, by name."""
        members = {name: self._member(name) for name in self.mesh.peers()}
        return members | {name: MeshMember(name, "connecting") for name in self.mesh.pending() if name not in members}

    def verified_peers(self) -> list[MeshMember]:
        return [member for member in self.peers.values() if member.is_verified]

    def relayed_peers(self) -> list[Remote]:
        """Nobody: on PeerJS the mesh itself passes lines on (a Room's members reached through others)."""
        return []

    def label(self, member_or_name: MeshMember | str) -> str:
        """A member's name for display, marked if nothing proved it: 'bob?'."""
        member = self.peers.get(member_or_name) if isinstance(member_or_name, str) else member_or_name
        if member is None:
            return clean(member_or_name, MAX_NAME_CHARS)
        return clean(member.name, MAX_NAME_CHARS) + ("" if member.is_verified else UNVERIFIED_MARK)

    def find(self, name: str) -> MeshMember:
        wanted = name.lstrip("@").rstrip(":,").removesuffix(UNVERIFIED_MARK)
        member = self.peers.get(wanted)
        if member is None:
            raise UsageError(f"nobody called {clean(wanted, MAX_NAME_CHARS)!r} is connected (see /peers; "
                             f"/connect NAME dials a user)")
        return member

    def send(self, text: str, action: bool = False) -> Message:
        """Say something to everyone in the mesh: signed to rtchat.py peers that proved their key, in the page's
        format to the others; kept in the history."""
        check_own_text(text)
        chat, _ = self.mesh.send_chat(text, action)
        msg = Message(id=chat.msg_id, room=PEERJS_ROOM, sender=self.me, text=text, ts=chat.timestamp,
                      fingerprint=self.scope.identity.fingerprint, trust="self", action=action, salt=chat.salt,
                      sig=chat.sig)
        self.journal.add(msg.record())
        return msg

    def dm(self, name: str, text: str) -> Message:
        raise UsageError(PEERJS_LACKS["msg"])

    async def ask(self, name: str, topic: str, content: Any = None, timeout: float = ASK_TIMEOUT_S) -> Any:
        raise UsageError(PEERJS_LACKS["ask"])

    async def send_file(self, name: str, path: str | os.PathLike, **options: Any) -> str:
        raise UsageError(PEERJS_LACKS["send"])

    def history(self, count: int = 20) -> list[Message]:
        """The last count lines of this network and name, oldest first (also across restarts)."""
        return kept_messages(self.journal.log, count)

    # -- from the mesh --------------------------------------------------------------------------
    def _member(self, name: str) -> MeshMember:
        connection = self.mesh.connection_to(name)
        if connection is None:
            return MeshMember(name, "connecting")
        proof = connection.proof
        said = RTCHAT_PY if proof or dialect_for(connection.client) is RTCHAT_PY else PEERJS_PAGE  # unless proven:
        #                                                                                    what it says it runs
        return MeshMember(name, "verified" if proof else "unverified", said,
                          proof.key if proof else None, connection.rtt_ms,
                          IcePath(connection.pc, self.mesh.ice).kind, connection.client or None,
                          pinned=proof is None and bool(self.trust.pins_for(name)))

    def _on_join(self, name: str) -> None:
        member = self._present[name] = self._member(name)
        if member.is_verified:
            self._pin(member)
        self.emit("join", member)

    def _pin(self, member: MeshMember) -> None:
        """A key proven on a connection is pinned for the name, as in a room (see Sessions._verified)."""
        with contextlib.suppress(RtchatError, ValueError):
            verdict = self.trust.verdict(member.name, member.key_string)
            accepted = verdict == "changed" and self.trust.is_accepting(member.name)
            if verdict != "changed" or accepted:
                author = self.mesh.connection_to(member.name).proof.author
                self.trust.pin(member.name, member.key_string, signs=True, author=author, replace=accepted)
            if accepted:
                self.emit("key-accepted", member)

    def _on_leave(self, name: str, reason: str) -> None:
        member = self._present.pop(name, None) or MeshMember(name, "unverified")
        self.emit("leave", member, reason)

    def _on_verify_failed(self, name: str, reason: str, claimed: str | None) -> None:
        member = MeshMember(name, "connecting", RTCHAT_PY)
        if reason == "mitm":
            self.emit("mitm-detected", member, claimed)
        elif reason != "key-refused":  # Admission has said why
            self.emit("verify-failed", member, reason)

    def _on_chat(self, chat: PeerJSChat) -> None:
        msg = peerjs_message(chat)
        if not self.journal.knows(msg.id):  # a signed line sent again (a replay) is taken once
            self.journal.add(msg.record())
            self.emit("message", msg)


# =============================================================================
# Room itself: the coordinator. Wires the parts above: signaling through the
# gate to Negotiation, which begins sessions, and Sessions, which verifies them;
# verified peers and their chat frames to the Ledger, file channels to Files.
# =============================================================================

class Room(Emitter):
    """One room: its parts wired together, and the API a bot, a plugin or a front end uses. Create with
    Client.join(). The parts are public: gate (signaling checked), network (the room on the broker), admission
    (which keys may connect), sessions (the peers and their sessions), negotiation (how sessions begin), assisted
    (signaling through members), ledger (messages and history), files. relay=False: pass on nothing for others."""

    network_name = "mqtt"  # where it is (a PeerJSPlace is on "peerjs")

    def __init__(self, name: str, *, me: str, identity: Identity, signaling: Signaling, trust: Trust,
                 store: Store, ice: RTCConfiguration, questions: dict[str, Callable],
                 seal: Seal | None = None, history: HistoryLog | None = None, files: Path | None = None,
                 relay: bool = True, max_peers: int = MAX_NEIGHBORS, present: bool = True) -> None:
        super().__init__()
        self.name = name
        self.files = Files(name, files, self.emit)  # file transfer, both ways (files: where received ones go)
        self.me = me
        self.identity = identity
        self.signaling = signaling
        self.trust = trust
        self.store = store
        self.ice = ice
        self.questions = questions
        self.seal = seal
        self.topic = seal.topic if seal else topic_for(name)
        self.gate = SignalingGate(me, self.topic, lambda sender: self.sessions.key_facts(sender), seal)
        self.network = RoomSignaling(signaling, self.gate, me=me, topic=self.topic, identity=identity, seal=seal)
        self.admission = Admission(trust, me)
        self.sessions = Sessions(self.admission, me=me, topic=self.topic, identity=identity, trust=trust, store=store,
                                 ice=ice)
        self.negotiation = Negotiation(self.network, self.admission, self.sessions, trust)
        self.assisted = AssistedSignaling(self.network, self.sessions, relay)
        scope = Scope(name, self.topic, me, identity, store, trust)
        self.ledger = Ledger(scope, history or HistoryLog(store.history_path(name)), self.emit,
                             takes_files=self.files.takes_files, is_connecting=self._is_connecting,
                             lookalike_of=self.lookalike_of, on_hello=lambda peer: self.sessions.changes.fire(),
                             relay=relay, on_route=self.sessions.changes.fire, trying=self.negotiation.trying)
        self.negotiation.reached = lambda name: name in self.ledger.routes.remotes or self.overlay.covers(name)
        self.overlay = Overlay(scope, self.sessions, self.negotiation, self.network, self.ledger, max_peers=max_peers,
                               present=present)
        self.negotiation.policy = self.overlay
        self.ledger.members = self.overlay.member_names
        self.ledger.routes.covered = self.overlay.covers
        self.ledger.relays.hold_fresh = lambda: self.overlay.large
        self.ledger.syncs = self.overlay.syncs
        for part, events in ((self.network, ("key-changed",)), (self.admission, ("key-changed", "key-refused")),
                             (self.sessions, ("key-accepted", "no-route", "mitm-detected", "verify-failed"))):
            for event in events:
                part.on(event, functools.partial(self.emit, event))
        self.sessions.on("leave", lambda peer, reason: None if self.overlay.gossips_with(peer) else
                         self.emit("leave", peer, reason))
        self.sessions.on("first-contact", self.ledger.first_contact)  # before the pin: what history named for it
        self.sessions.on("verified", self._on_verified)
        self.sessions.on("frame", self._on_frame)
        self.sessions.on("file-channel", self.files.offered)
        self.sessions.on("closed", self._on_session_closed)
        self._tasks = Tasks()
        self.joined = False

    def __repr__(self) -> str:
        return f"Room({self.name!r}, {len(self.verified_peers())} verified)"

    @property
    def peers(self) -> dict[str, Peer]:
        """Everyone heard of in the room, by wire name: announced, connecting, open or verified."""
        return self.sessions.peers

    @property
    def dropped(self) -> int:
        """Signaling messages refused (malformed, forged, replayed, over a rate; by reason in gate.drops)."""
        return self.gate.dropped

    @property
    def unreadable(self) -> int:
        """Of those, sealed payloads this room's secret could not open."""
        return self.gate.unreadable

    @property
    def inbox(self) -> str:
        """Our subtopic, where rtchat.py peers send us their offers and answers."""
        return self.network.inbox

    @property
    def refused(self) -> dict[str, str]:
        """Bare name -> the last key refused for it (what /trust NAME accepts)."""
        return self.admission.refused

    # -- public API ---------------------------------------------------------------------------
    async def join(self) -> None:
        await self.ledger.open()
        self.network.start()
        self.joined = True
        self.negotiation.start()
        self.store.defer(lambda d: (d["rooms"].setdefault(self.name, {}).update(last_joined=now_ms()),
                                    d.update(last_room=self.name)))

    async def leave(self) -> None:
        if not self.joined:
            return
        self.joined = False
        self.ledger.stop()
        await self.ledger.written(COMMIT_EVERY_S * 20)  # what came is written and acknowledged (while peers talk on)
        await self.overlay.close()  # a large room's neighbours are told, and the room
        await self._drain(LEAVE_DRAIN_S)  # and the acks have arrived: our unload must not overtake them
        self.network.say_goodbye()
        await self.network.close()  # nothing more from the broker: our goodbye's echo, offers from who comes now
        await self.negotiation.close()
        await self.sessions.close()
        await self._tasks.close()
        await self.ledger.close()  # and what came while we were leaving
        await self.files.close()

    def announce(self) -> None:
        """Tell the room we are here (a peer that should offer to us, offers)."""
        self.network.announce()

    def retry(self, name: str) -> None:
        """Start again with a bare name, after /trust NAME (see Negotiation.retry)."""
        self.negotiation.retry(name)

    async def _drain(self, timeout: float) -> None:
        """Until every open session has delivered what we sent on it (the remote SCTP acknowledged it): closing
        a connection aborts it, and what is still queued is lost."""
        await asyncio.gather(*(peer.delivered(timeout) for peer in list(self.peers.values())))

    def verified_peers(self) -> list[Peer]:
        return self.sessions.verified()

    @property
    def large(self) -> bool:
        """Whether the room runs on gossip (see Overlay): sessions with at most max_peers of its rtchat.py
        members, the others reached by gossip."""
        return self.overlay.large

    def relayed_peers(self) -> list[Remote]:
        """Members we have no session with but reach through others: through one member (see Routes; remote.via[0]
        is the member), or in a large room by gossip (remote.via is empty)."""
        remotes = dict(self.ledger.routes.remotes)
        for name, (remote, _, _) in self.overlay.members.items():
            if name not in remotes and not (name in self.peers and self.peers[name].is_verified):
                remotes[name] = remote
        return list(remotes.values())

    def reachable_peers(self) -> list[Peer | Remote]:
        """Whom what we say reaches: verified peers, and members reached through them."""
        return self.verified_peers() + self.relayed_peers()

    def label(self, peer_or_name: Peer | str) -> str:
        """A peer's name for display: 'alice', or 'alice#3f2a' while two keys share that name, or while it looks
        like another known or present name (see lookalike_of)."""
        peer = self.peers.get(peer_or_name) if isinstance(peer_or_name, str) else peer_or_name
        if peer is None:
            return clean(peer_or_name, MAX_NAME_CHARS + 8)
        name = clean(peer.name, MAX_NAME_CHARS + 8)
        twins = {p.fingerprint for p in self.peers.values() if bare_name(p.name) == bare_name(peer.name)}
        marked = len(twins) > 1 or peer.lookalike is not None
        return f"{name}#{peer.fingerprint[:4]}" if marked and peer.fingerprint else name

    def lookalike_of(self, name: str) -> str | None:
        """A pinned or present name, not this one, that this one looks like (see Sessions.lookalike_of)."""
        return self.sessions.lookalike_of(name)

    def find(self, name: str) -> Peer:
        """A connected peer by wire name, bare name or label; UsageError if unknown or ambiguous."""
        name = name.lstrip("@").rstrip(":,")
        if name in self.peers and self.peers[name].state != "closed":
            return self.peers[name]
        matches = [p for p in self.peers.values() if p.state != "closed" and
                   (self.label(p) == name or bare_name(p.name) == name or (p.fingerprint or "").startswith(name))]
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise UsageError(f"{name!r} could be {', '.join(self.label(p) for p in matches)}; say which")
        raise UsageError(f"no peer called {name!r} in #{self.name} (see /peers)")

    def send(self, text: str, action: bool = False) -> Message:
        """Say something to everyone verified in the room (in a large room, to every member by gossip), and,
        through backfill, to who comes later."""
        if self.overlay.large:
            return self.ledger.spread(text, action, self.verified_peers(), self.overlay)
        return self.ledger.send(text, action, self.verified_peers())

    def dm(self, name: str, text: str) -> Message:
        """A direct message. To a known peer who is away it waits in the outbox (kept across restarts)."""
        try:
            peer = self.find(name)
            target = bare_name(peer.name)
        except UsageError:
            peer, target = None, bare_name(name.lstrip("@"))
            if not self.trust.pins_for(target) and not self._remote(name):
                raise
        if peer is None or not peer.is_verified:
            remote = self._remote(peer.name if peer is not None else name)
            return self.ledger.dm(remote, bare_name(remote.name) if remote else target, text)
        return self.ledger.dm(peer, target, text)

    def _remote(self, name: str) -> Remote | None:
        """A member reached through others, by wire name or (if only one fits) bare name."""
        routes = {r.name: r for r in self.relayed_peers()}
        name = name.lstrip("@").rstrip(":,")
        fits = [r for r in routes.values() if name in (r.name, bare_name(r.name))]
        return routes.get(name) or (fits[0] if len(fits) == 1 else None)

    def outbox(self) -> list[Message]:
        """Our direct messages in this room still waiting for their recipients."""
        return self.ledger.outbox()

    async def ask(self, name: str, topic: str, content: Any = None, timeout: float = ASK_TIMEOUT_S) -> Any:
        """Ask one peer a question (RTChat's question/answer RPC). Raises AskError with no answer.
        A peer still being verified is waited for (up to VERIFY_TIMEOUT_S)."""
        peer = await self._verified_peer(name)
        return await peer.ask(topic, content, timeout)

    async def send_file(self, name: str, path: str | os.PathLike, *,
                        progress: Callable[[int, int], Any] | None = None) -> str:
        """Send a file to one rtchat.py peer on a channel of its own; returns the name it was saved under,
        once the peer has all of it on disk with the right SHA-256. Raises RtchatError if it refuses or fails.
        A peer still being verified is waited for (up to VERIFY_TIMEOUT_S). progress(sent, size) is called as
        chunks go out."""
        path = Path(path).expanduser()
        if not await off_loop(path.is_file):
            raise UsageError(f"{path} is not a file")
        peer = await self._verified_peer(name)
        if not peer.takes_files:
            raise UsageError(f"{self.label(peer)} does not take files (a browser, or started without --files DIR)")
        return await self.files.send(peer, path, self.label(peer), progress)

    async def wait_for_peers(self, count: int = 1, timeout: float = 30.0) -> list[Peer | Remote]:
        """Until count peers are verified or reached through a verified one; NoPeers after timeout."""
        if not await self.sessions.until(lambda: len(self.reachable_peers()) >= count, timeout):
            raise NoPeers(f"no peer in #{self.name} within {timeout:g} s "
                          f"({len(self.reachable_peers())} of {count} verified){self._seal_hint()}")
        return self.reachable_peers()

    async def wait_for_peer(self, name: str, timeout: float = 30.0) -> Peer:
        """Until the peer called name (wire name, bare name or label) is verified, and has said what it takes
        (files, late signatures) if it is an rtchat.py peer; NoPeers after timeout, UsageError if the name fits
        more than one verified peer."""
        wanted = name.lstrip("@").rstrip(":,")

        def matches() -> list[Peer]:
            return [p for p in self.verified_peers() if wanted in (p.name, bare_name(p.name), self.label(p))
                    and not (p.can("signatures") and p.channel_bound and p.message_key is None)]  # its hello follows
        if not await self.sessions.until(lambda: bool(matches()), timeout):
            raise NoPeers(f"{clean(wanted, MAX_NAME_CHARS)} was not verified in #{self.name} within {timeout:g} s")
        if len(matches()) > 1:
            raise UsageError(f"{wanted!r} could be {', '.join(self.label(p) for p in matches())}; say which")
        return matches()[0]

    async def _verified_peer(self, name: str) -> Peer:
        """A connected peer by name, once verified: one still proving its key is waited for, briefly."""
        peer = self.find(name)
        try:
            return await self.wait_for_peer(peer.name, VERIFY_TIMEOUT_S)
        except NoPeers:
            raise UsageError(f"{self.label(peer)} is connected but not verified (within {VERIFY_TIMEOUT_S:g} s)"
                             ) from None

    async def wait_for_room(self, count: int = 1, timeout: float = 30.0, settle: float = SETTLE_S
                            ) -> list[Peer | Remote]:
        """Until at least count peers are verified (or reached through a verified one), then until every session
        being set up with a peer that took part in it is verified or has failed (a name only announced may be made
        up: see Negotiation.in_setup), and none began for `settle` seconds: what is sent then reaches everyone
        here. NoPeers if fewer than count are reached by timeout; at timeout it returns the ones reached (see
        unverified_peers for the others)."""
        deadline = time.monotonic() + timeout
        await self.wait_for_peers(count, timeout)
        await self.negotiation.settle(deadline - time.monotonic(), settle)
        return self.reachable_peers()

    def unverified_peers(self) -> list[Peer]:
        """Peers here that are not verified: in session set-up with us (they took part in it), or whose sessions
        found no network path."""
        return self.negotiation.unreached()

    def unacknowledged(self) -> set[str]:
        """Wire names of rtchat.py peers that have not acknowledged every message we sent them."""
        return self.ledger.unacknowledged()

    def _seal_hint(self) -> str:
        """Why a sealed room may look empty. Peers with another secret meet on another topic (the topic comes from
        the secret too), so they cannot be seen without telling the broker which room this is; what can be told is
        what came on this room's topic and could not be opened with this secret."""
        if self.seal is None or self.verified_peers():
            return ""
        if self.unreadable:
            return (f"; {self.unreadable} message(s) on this sealed room's topic could not be opened with this "
                    f"secret: the senders use another one")
        return "; in a sealed room a wrong --secret looks like an empty room: check that everyone uses the same one"

    async def flush(self, timeout: float = 10.0) -> bool:
        """Until every message sent is acknowledged by rtchat.py peers and acked by browsers' SCTP.
        False after timeout, or as soon as only recipients that left are missing (see unacknowledged)."""
        deadline = time.monotonic() + timeout
        if not await self.ledger.flush(timeout):
            return False
        browsers = [p for p in self.peers.values() if not p.can("acks")]
        return all(await asyncio.gather(*(p.delivered(deadline - time.monotonic()) for p in browsers)))

    def history(self, count: int = 20) -> list[Message]:
        """The last count messages of this room, oldest first (kept on disk, also across restarts)."""
        return self.ledger.history(count)

    # -- from the sessions ----------------------------------------------------------------------
    def _on_verified(self, peer: Peer) -> None:
        self.emit("verified", peer)
        if not self.overlay.gossips_with(peer):  # in a large room sessions with members come and go: see /who
            self.emit("join", peer)
        self.ledger.peer_verified(peer)
        self.overlay.peer_verified(peer)

    def _on_session_closed(self, peer: Peer, reason: str) -> None:
        self.overlay.peer_gone(peer)
        if peer.verified_at is not None:
            self.ledger.peer_gone(peer)
        else:
            self.ledger.routes.refresh()  # it may have found no path: now reached through others

    def _is_connecting(self, name: str) -> bool:
        peer = self.peers.get(name)
        return peer is not None and peer.state in ("seen", "connecting", "open")

    # -- frames from verified peers -------------------------------------------------------------
    def _on_frame(self, peer: Peer, label: str, value: Any) -> None:
        if isinstance(value, dict) and value.get("t") == SIGNAL_FRAME:
            self.assisted.on_frame(peer, label, value)
        elif isinstance(value, dict) and value.get("t") in OVERLAY_FRAMES and label == "chat":
            self.overlay.on_frame(peer, value)
        elif label != "question":
            self.ledger.on_frame(peer, label, value)
        elif peer.questions_open < MAX_QUESTIONS_AT_ONCE:  # an asker waits for answers; a flood does not
            self._tasks.spawn(self._answer_question(peer, value), f"question-{peer.name}")
        else:
            peer.over_budget["question"] = peer.over_budget.get("question", 0) + 1

    async def _answer_question(self, peer: Peer, value: Any) -> None:
        peer.questions_open += 1
        try:
            await self._run_question(peer, value)
        finally:
            peer.questions_open -= 1

    async def _run_question(self, peer: Peer, value: Any) -> None:
        question = value.get("question") if isinstance(value, dict) else None
        if not isinstance(question, dict) or not isinstance(question.get("topic"), str):
            return
        topic = question["topic"][:64]
        handler = self.questions.get(topic)
        if handler is None:
            peer.reply(value.get("n"), question, error=f"no answer for {topic!r} here")
            return
        asked = Question(peer, topic, question.get("content"))
        try:
            answer = handler(asked)
            if asyncio.iscoroutine(answer):
                answer = await asyncio.wait_for(answer, ANSWER_TIMEOUT_S)
        except Exception as exc:  # whatever a handler raises: the asker hears at once, the user gets an event
            log.debug("question %r from %s failed", topic, peer.name, exc_info=True)
            failure = "no answer in time" if isinstance(exc, asyncio.TimeoutError) else type(exc).__name__
            peer.reply(value.get("n"), question, error=f"{topic} failed: {failure}")
            self.emit("question-failed", asked, exc)
            return
        try:
            to_json(answer)
        except (TypeError, ValueError):
            answer = str(answer)
        peer.reply(value.get("n"), question, answer)


def default_state_path() -> Path:
    return Path(os.environ.get("RTCHAT_STATE") or "~/.rtchat.json").expanduser()


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def list_option(values: list[str] | str | None) -> list[str]:
    """'a,b' or ['a', 'b,c'] -> the non-empty items."""
    values = [values] if isinstance(values, str) else values or ()
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


def ice_option(value: str | None) -> list[str] | None:
    """--ice / RTCHAT_ICE: None for the default servers, [] for 'none', else the URLs."""
    return None if not value else [] if value.strip().lower() == "none" else list_option(value)


class Client(Emitter):
    """The library's entry point: owns the state file, the identity and the broker; joins Rooms.
    What is not given comes from the environment the command line reads (RTCHAT_BROKER, RTCHAT_STATE,
    RTCHAT_ICE, RTCHAT_ICE_HOST), else the defaults.

        async with rtchat.Client("bot", broker="mqtt://127.0.0.1") as client:
            room = await client.join("ops")
            await room.wait_for_peers()
            room.send("deploy finished")
    """

    def __init__(self, name: str, *, broker: str | None = None, state: str | os.PathLike | None = None,
                 ice: list[str] | None = None, ice_hosts: list[str] | None = None, trust: str = "new",
                 passphrase: str | None = None, files: str | os.PathLike | None = None, relay: bool = True,
                 max_peers: int = MAX_NEIGHBORS, present: bool = True) -> None:
        super().__init__()
        self.relay = relay  # pass on what members send each other (False: --no-relay)
        if max_peers and not MIN_PEERS <= max_peers <= MAX_PEERS_LIMIT:
            raise UsageError(f"max_peers is 0 (always a full mesh) or {MIN_PEERS} to {MAX_PEERS_LIMIT}")
        self.max_peers = max_peers  # sessions with rtchat.py members in a large room (0: always a full mesh)
        self.present = present      # False: in a large room, not listed as a member (a pipe that sends and goes)
        self.files = Path(files).expanduser() if files else None  # where files peers send go; None: refused
        require_packages()
        self.name = check_display_name(name)
        self.store = Store(state or default_state_path())
        self.signaling = Signaling(broker or os.environ.get("RTCHAT_BROKER") or DEFAULT_BROKER)
        self.trust = Trust(self.store, trust)
        ice = ice_option(os.environ.get("RTCHAT_ICE")) if ice is None else ice
        self.ice_servers = [IceServer.parse(url) for url in (DEFAULT_ICE if ice is None else ice)]
        self.ice = ice_configuration(self.ice_servers)
        ice_hosts = list_option(os.environ.get("RTCHAT_ICE_HOST")) if ice_hosts is None else ice_hosts
        self.ice_hosts = ice_hosts
        if ice_hosts:
            restrict_ice_hosts(ice_hosts)
        self.network: NetReport | None = None  # the last netcheck()
        self.passphrase = passphrase
        self.questions: dict[str, Callable[[Question], Any]] = {}
        self.rooms: dict[str, Room] = {}
        self.peerjs: PeerJSPlace | None = None  # our place on the PeerJS network, if we are on it
        self.identity: Identity | None = None
        self.me = self.name
        self._instance: int | None = None

    async def start(self, broker: bool = True) -> Client:
        """Load the state and connect to the broker (broker=False: not, for the PeerJS network alone)."""
        self.store.load()
        self.identity = self.store.identity(self.passphrase)
        self._instance = self.store.update(self._claim_instance)
        self.me = self.name if self._instance == 0 else f"{self.name}({self._instance})"
        self.store.defer(lambda d: d.update(name=self.name))
        if broker:
            await self.signaling.connect()
        return self

    async def join_peerjs(self, server: str | None = None) -> PeerJSPlace:
        """Log in on a PeerServer (None: the page's own) under our name, with our key for rtchat.py peers there.
        Raises NameTaken, PeerServerRefused, PeerServerUnreachable."""
        if self.peerjs is None:
            place = PeerJSPlace(self.name, server=server, ice=self.ice, identity=self.identity, store=self.store,
                                trust=self.trust)
            await place.join()
            self.peerjs = place
        return self.peerjs

    def _claim_instance(self, data: dict) -> int:
        """RTChat-style suffixes: the first alice is 'alice', a second one on this state file 'alice(1)'."""
        taken = data["instances"].setdefault(self.name, {})
        for number, pid in list(taken.items()):
            if not _pid_alive(pid):
                del taken[number]
        number = 0
        while str(number) in taken:
            number += 1
        taken[str(number)] = os.getpid()
        return number

    async def join(self, room: str, secret: str | None = None) -> Room:
        """Join a room (sealed when a secret is given: only peers with the same secret find it)."""
        name = check_room_name(room)
        if name in self.rooms:
            return self.rooms[name]
        seal = await asyncio.get_running_loop().run_in_executor(None, Seal, name, secret) if secret else None
        joined = Room(name, me=self.me, identity=self.identity, signaling=self.signaling, trust=self.trust,
                      store=self.store, ice=self.ice, questions=self.questions, seal=seal, files=self.files,
                      relay=self.relay, max_peers=self.max_peers, present=self.present)
        self.rooms[name] = joined
        await joined.join()
        return joined

    async def netcheck(self) -> NetReport:
        """Probe the network towards the configured STUN/TURN servers (see NetCheck); kept as self.network."""
        self.network = await NetCheck(self.ice_servers, self.ice_hosts).run()
        return self.network

    async def leave(self, room: Room) -> None:
        self.rooms.pop(room.name, None)
        await room.leave()

    async def close(self) -> None:
        for room in list(self.rooms.values()):
            await self.leave(room)
        if self.peerjs is not None:
            place, self.peerjs = self.peerjs, None
            await place.leave()
        await self.signaling.close()
        if self._instance is not None:
            number, self._instance = str(self._instance), None
            self.store.defer(lambda d: d["instances"].get(self.name, {}).pop(number, None))
        self.store.flush()

    async def __aenter__(self) -> Client:
        return await self.start()

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()


# =============================================================================
# Commands: one registry for slash commands, question handlers and event hooks,
# and the Session they act in (each front end implements it). Built-ins are
# plugins too: ctx and ctx.session only. handle_line() serves every UI.
# =============================================================================

def _tag(kind: str, name: str, **options: Any) -> Callable:
    """Decorators only tag a function; the loader collects tags, so importing a plugin changes nothing."""
    def tag(func: Callable) -> Callable:
        func.__dict__.setdefault("_rtchat_hooks", []).append((kind, name, options))
        return func
    return tag


def command(name: str, *aliases: str, help: str = "", usage: str = "", example: str = "",
            not_on: dict[str, str] | None = None) -> Callable:
    """A slash command: `async def f(ctx, args: str)`. help is the /help line, the docstring the detail. not_on:
    the networks it does not apply to ("mqtt", "peerjs"), each with why, said instead of running it there."""
    return _tag("command", name, aliases=aliases, help=help, usage=usage, example=example, not_on=not_on or {})


def question(topic: str) -> Callable:
    """Answer `/ask NAME topic ...` from verified peers: `def f(ctx, q: Question)`; it returns the answer."""
    return _tag("question", topic)


def on(event: str) -> Callable:
    """Run on a room event (one of EVENTS): `def f(ctx, value)`."""
    return _tag("on", event)


@dataclasses.dataclass
class CommandSpec:
    name: str
    func: Callable
    origin: str
    aliases: tuple = ()
    help: str = ""
    usage: str = ""
    example: str = ""
    not_on: dict = dataclasses.field(default_factory=dict)


class Registry:
    """Commands, questions and hooks from the built-ins and every plugin."""

    def __init__(self) -> None:
        self.commands: dict[str, CommandSpec] = {}
        self.questions: dict[str, tuple[Callable, str]] = {}
        self.hooks: dict[str, list[tuple[Callable, str]]] = {}

    def collect(self, namespace: Any, origin: str) -> int:
        """Register every tagged function in a module or dict; ValueError for a bad tag (nothing is added)."""
        items = namespace.items() if isinstance(namespace, dict) else vars(namespace).items()
        found = [(kind, name, opts, func) for _, func in items if callable(func)
                 for kind, name, opts in getattr(func, "__dict__", {}).get("_rtchat_hooks", ())]
        for kind, name, _opts, _func in found:
            if kind == "on" and name not in EVENTS:
                raise ValueError(f"@on({name!r}): events are {', '.join(EVENTS)}")
            if kind == "command" and not re.fullmatch(r"[a-z][a-z0-9_-]*", name):
                raise ValueError(f"@command({name!r}): use lower-case letters, digits, - and _")
        for kind, name, opts, func in found:
            if kind == "command":
                spec = CommandSpec(name, func, origin, **opts)
                for key in (name, *opts["aliases"]):
                    if key in self.commands and self.commands[key].origin != origin:
                        log.warning("/%s from %s replaces the one from %s", key, origin, self.commands[key].origin)
                    self.commands[key] = spec
            elif kind == "question":
                self.questions[name] = (func, origin)
            else:
                self.hooks.setdefault(name, []).append((func, origin))
        return len(found)

    def unique_commands(self) -> list[CommandSpec]:
        return sorted({id(s): s for s in self.commands.values()}.values(), key=lambda s: s.name)


class Context:
    """What a command, question handler or hook can do. ctx.room is the room the user is in (for a hook, the room
    its event came from); ctx.session is the front end it runs in."""

    def __init__(self, session: Session, origin: str, room: Room | None = None) -> None:
        self.session = session
        self.origin = origin
        self.log = logging.getLogger(f"rtchat.plugin.{origin}")
        self.state: dict = session.client.store.data["plugins"].setdefault(origin, {})
        self._room = room

    @property
    def client(self) -> Client:
        return self.session.client

    @property
    def room(self) -> Room:
        room = self._room if self._room is not None else self.session.room
        if room is None:
            raise UsageError("you are in no room: /join ROOM")
        return room

    @property
    def me(self) -> str:
        return self.session.client.me

    async def say(self, text: str, action: bool = False) -> Message:
        self._check_may_send()
        msg = self.room.send(text, action=action)
        self.session.show(msg)
        return msg

    async def dm(self, name: str, text: str) -> Message:
        self._check_may_send()
        msg = self.room.dm(name, text)
        self.session.show(msg)
        return msg

    def _check_may_send(self) -> None:
        if not self.session.may_send:
            raise UsageError("nothing is sent in this mode (a listener sends nothing, a pipe only its lines)")

    def echo(self, text: str) -> None:
        """Show a line to the local user only; nothing is sent."""
        self.session.echo(text)

    def save(self) -> None:
        """Write ctx.state to the state file (also done after every call)."""
        state = dict(self.state)
        self.session.client.store.defer(lambda d: d["plugins"].__setitem__(self.origin, state))


async def call_hook(func: Callable, *args: Any) -> Any:
    result = func(*args)
    return await result if asyncio.iscoroutine(result) else result


class Session:
    """What commands and plugins may do beyond a room: which rooms are joined and which is current, join, part and
    switch, show a message, echo a line, clear, quit. Each front end implements it (the chat, and the pipe,
    listener and sender modes); as it is, it is a bot's, with no screen: echo() logs, show() does nothing.

    It also puts the registry to work, the same way in every mode: @question handlers answer the client's peers,
    and @on hooks hear the rooms attached (switch_room attaches the rooms it joins), each with its plugin's
    Context. close() (or leaving `async with`) stops the hooks: those running get ANSWER_TIMEOUT_S to finish."""

    may_send = True  # ctx.say() and ctx.dm() send for plugins (the script modes send only what they are given)

    def __init__(self, client: Client, registry: Registry | None = None) -> None:
        self.client = client
        self.registry = registry if registry is not None else Registry()
        self.room: Room | None = None        # the current room: where typed lines and ctx.say() go
        self.no_route: dict[tuple[str, str], float] = {}  # (room, peer) -> when a try last found no network path
        self.done = asyncio.Event()          # quit() sets it
        self._hooked: dict[str, tuple[Room, list[tuple[str, Callable]]]] = {}
        self._hooks_running: set[asyncio.Task] = set()
        self._contexts: dict[tuple[str, Room | None], Context] = {}
        self.answer_questions()

    @property
    def rooms(self) -> list[Room]:
        """The rooms joined, in the order they were joined (Alt-1 is the first)."""
        return list(self.client.rooms.values())

    def unread_count(self, room: Room) -> int:
        """Lines that came in that room while another one was current."""
        return 0

    async def switch_room(self, name: str) -> Room:
        """Make ROOM the current room, joining it first if need be; the other rooms stay joined. A bad name is a
        UsageError before anything changes."""
        name = check_room_name(name)
        if name not in self._hooked:
            self.attach(await self.client.join(name))
        return self.select_room(name)

    def select_room(self, name: str) -> Room:
        """Make a joined room the current one."""
        room = self.client.rooms.get(name.lstrip("#"))
        if room is None:
            raise UsageError(f"you are not in #{clean(name.lstrip('#'), 200)} (/join it first)")
        self.room = room
        return room

    async def part_room(self, name: str | None = None) -> Room | None:
        """Leave a room (the current one by default); returns the room you are in after it, if any."""
        room = self.room if name is None else self.client.rooms.get(name.lstrip("#"))
        if room is None:
            raise UsageError("you are in no room" if name is None else f"you are not in #{clean(name, 200)}")
        self.detach(room)
        await self.client.leave(room)
        if self.room is room:
            self.room = None
            if self.rooms:
                self.select_room(self.rooms[-1].name)
        return self.room

    def show(self, msg: Message, from_history: bool = False) -> None:
        """Show a message to the local user (one just sent, or from the history)."""

    def echo(self, text: str) -> None:
        """Show a line to the local user only."""
        log.info("%s", text)

    def clear(self) -> None:
        """Clear the screen."""

    def quit(self) -> None:
        self.done.set()

    def failed(self, what: str, exc: BaseException) -> None:
        """A command or handler broke: one line; the traceback only at debug level."""
        log.debug("%s failed", what, exc_info=exc)
        log.warning("%s failed: %s: %s", what, type(exc).__name__, clean(exc, 300))

    # -- plugins at work ----------------------------------------------------------------------
    def context(self, origin: str, room: Room | None = None) -> Context:
        """The Context of a plugin (origin), bound to a room (a hook's) or following the current one."""
        if (origin, room) not in self._contexts:
            self._contexts[origin, room] = Context(self, origin, room)
        return self._contexts[origin, room]

    def answer_questions(self) -> None:
        """Let the registry's @question handlers answer the client's peers, as handler(ctx, q)."""
        for topic, (func, origin) in self.registry.questions.items():
            self.client.questions[topic] = functools.partial(self._answer, func, origin)

    def _answer(self, func: Callable, origin: str, asked: Question) -> Any:
        return func(self.context(origin), asked)

    def attach(self, room: Room) -> Room:
        """Let the registry's @on hooks hear this room's events (each event looks the hooks up when it comes).
        The first room attached is the current one until another is selected."""
        self.room = self.room if self.room is not None else room
        if room.name not in self._hooked:
            self._hooked[room.name] = (room, [(event, room.on(event, functools.partial(self._hear, room, event)))
                                              for event in EVENTS])
        return room

    def detach(self, room: Room) -> None:
        _, listeners = self._hooked.pop(room.name, (room, ()))
        for event, listener in listeners:
            room.off(event, listener)
        for key in [key for key in self._contexts if key[1] is room]:
            del self._contexts[key]

    def _hear(self, room: Room, event: str, *args: Any) -> None:
        for func, origin in self.registry.hooks.get(event, ()):
            task = _spawn(self._run_hook(func, origin, room, event, args), f"hook-{origin}-{event}")
            self._hooks_running.add(task)
            task.add_done_callback(self._hooks_running.discard)

    async def _run_hook(self, func: Callable, origin: str, room: Room, event: str, args: tuple) -> None:
        try:
            await call_hook(func, self.context(origin, room), *args)
        except Exception as exc:
            self.failed(f"@on({event!r}) in {origin}", exc)

    async def close(self, timeout: float = ANSWER_TIMEOUT_S) -> None:
        """Hear no more events; the hooks still running get timeout seconds to finish, then they are cancelled."""
        for room, _ in list(self._hooked.values()):
            self.detach(room)
        running = set(self._hooks_running)
        if running and timeout > 0:
            _, running = await asyncio.wait(running, timeout=timeout)
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()


async def handle_line(session: Session, line: str) -> None:
    """One line typed by the user: a /command, //text (a literal slash), or a message."""
    line = line.rstrip("\r\n")
    if not line.strip():
        return
    if line.startswith("//") or not line.startswith("/"):
        await session.context("core").say(line[1:] if line.startswith("//") else line)
        return
    name, _, args = line[1:].partition(" ")
    spec = session.registry.commands.get(name.lower())
    if spec is None:
        raise UsageError(f"unknown command /{name} (see /help); nothing was sent")
    why = spec.not_on.get(session.room.network_name if session.room else "mqtt")
    if why:
        raise UsageError(f"/{name.lower()}: {why}")
    ctx = session.context(spec.origin)
    try:
        await call_hook(spec.func, ctx, args.strip())
    finally:
        if spec.origin != "core":
            ctx.save()


def _split_first(args: str, usage: str) -> tuple[str, str]:
    first, _, rest = args.strip().partition(" ")
    if not first:
        raise UsageError(f"usage: {usage}")
    return first, rest.strip()


@command("help", "h", help="list commands, or explain one", usage="/help [command]")
async def _help(ctx: Context, args: str) -> None:
    """Without an argument, one line per command of the network you are on; with one, its usage, aliases and
    details."""
    registry = ctx.session.registry
    if args:
        spec = registry.commands.get(args.lstrip("/").lower())
        if spec is None:
            raise UsageError(f"no command /{args.lstrip('/')}")
        ctx.echo(f"{spec.usage or '/' + spec.name} - {spec.help}")
        if spec.aliases:
            ctx.echo("aliases: " + ", ".join("/" + a for a in spec.aliases))
        if spec.func.__doc__:
            ctx.echo(" ".join(spec.func.__doc__.split()))
        if spec.example:
            ctx.echo(f"example: {spec.example}")
        return
    here = ctx.session.room.network_name if ctx.session.room else "mqtt"
    for spec in registry.unique_commands():
        if here not in spec.not_on:  # those for the other network are left out
            ctx.echo(f"{(spec.usage or '/' + spec.name):<28} {spec.help}")
    ctx.echo("Lines not starting with / are sent to the room; //text sends a line starting with /.")


@command("join", "j", help="join a room too, and go there", usage="/join ROOM", example="/join #ops",
         not_on={"peerjs": PEERJS_LACKS["rooms"]})
async def _join(ctx: Context, args: str) -> None:
    """The rooms you were in stay joined (see /rooms, /switch); a leading # is accepted. They are joined again
    when you next start rtchat.py."""
    words = args.split()
    if len(words) != 1:
        raise UsageError("usage: /join ROOM (one word, e.g. /join ops); you stay where you are")
    await ctx.session.switch_room(words[0])


@command("part", "leave", help="leave a room (this one by default)", usage="/part [ROOM]",
         not_on={"peerjs": PEERJS_LACKS["rooms"]})
async def _part(ctx: Context, args: str) -> None:
    left = args.strip().lstrip("#") or (ctx.session.room.name if ctx.session.room else None)
    now = await ctx.session.part_room(args.strip() or None)
    ctx.echo(f"-!- left #{clean(left, 200)}; " + (f"now in #{now.name}" if now else "you are in no room: /join ROOM"))


@command("switch", "s", "window", help="go to another room you are in (also Alt-1..9, Ctrl-N, Ctrl-P)",
         usage="/switch ROOM", not_on={"peerjs": PEERJS_LACKS["rooms"]})
async def _switch(ctx: Context, args: str) -> None:
    room, _ = _split_first(args, "/switch ROOM")
    ctx.session.select_room(room)


@command("connect", help="dial a user by name on the PeerJS network; your meshes merge", usage="/connect NAME",
         example="/connect bob", not_on={"mqtt": "it is for the PeerJS network (rtchat.py NAME --peerjs [URL])"})
async def _connect(ctx: Context, args: str) -> None:
    """Everyone NAME is connected to is dialled too, and they see you, as the peerjs-multichat page does it."""
    name, _ = _split_first(args, "/connect NAME")
    member = ctx.room.peers.get(name)
    if member is not None and member.is_open:
        ctx.echo(f"-!- you are connected to {ctx.room.label(member)} already")
        return
    ctx.echo(f"-!- connecting to {clean(name, MAX_NAME_CHARS)}")
    await ctx.room.connect(name)


@command("peers", help="who is seen, connected, verified, with round trip (in a large room: your sessions)",
         usage="/peers")
async def _peers(ctx: Context, args: str) -> None:
    room = ctx.room
    peers = sorted((p for p in room.peers.values() if not (room.large and p.state == "seen")),
                   key=lambda p: collation_key(p.name))
    no_route = {name: when for (where, name), when in ctx.session.no_route.items()
                if where == room.name and time.monotonic() - when < SEEN_EXPIRE_S}
    if not peers and not no_route:
        ctx.echo("nobody connected yet (/connect NAME)" if room.network_name == "peerjs" else
                 f"nobody else in #{room.name} yet")
    relayed = {remote.name: remote for remote in room.relayed_peers() if remote.via}
    for peer in peers:
        kind = peer.dialect.name
        trust = ("verified, channel-bound" if peer.channel_bound else "verified (legacy, not channel-bound)") \
            if peer.is_verified else peer.state
        if peer.name in no_route and not peer.is_open:  # a room tries again now and then
            trust = _no_route_words(no_route[peer.name])
        if peer.name in relayed and not peer.is_verified:
            trust = _relayed_words(room, relayed.pop(peer.name))
        rtt = f", {peer.rtt_ms:.1f} ms" if peer.rtt_ms is not None else ""
        path = {"relay": ", through a TURN relay", "direct": ", direct"}.get(peer.path if peer.is_open else None, "")
        ctx.echo(f"{room.label(peer):<24} {trust}{rtt}{path}  [{kind}]")
    for name in sorted(set(no_route) - set(room.peers) - set(relayed), key=collation_key):  # between two tries
        ctx.echo(f"{room.label(name):<24} {_no_route_words(no_route[name])}")
    for name, remote in sorted(relayed.items(), key=lambda item: collation_key(item[0])):  # never heard directly
        ctx.echo(f"{room.label(name):<24} {_relayed_words(room, remote)}")
    if room.large:
        gossip = sum(1 for remote in room.relayed_peers() if not remote.via)
        ctx.echo(f"#{room.name} is a large room: {len(room.verified_peers())} verified directly, {len(relayed)} "
                 f"through a member, {gossip} reached by gossip (/who lists everyone)")


@command("who", "names", help="everyone in the room you reach: directly, through a member, by gossip", usage="/who")
async def _who(ctx: Context, args: str) -> None:
    room = ctx.room
    groups: dict[str, list[str]] = {"directly": [], "through a member": [], "by gossip": []}
    for peer in room.verified_peers():
        groups["directly"].append(room.label(peer))
    for remote in room.relayed_peers():
        groups["through a member" if remote.via else "by gossip"].append(room.label(remote.name))
    counts = ", ".join(f"{len(names)} {how}" for how, names in groups.items() if names)
    ctx.echo(f"{1 + sum(map(len, groups.values()))} in #{room.name}: you ({room.label(room.me)})"
             + (f", {counts}" if counts else ""))
    for how, names in groups.items():
        if names:
            ctx.echo(f"{how}: {', '.join(sorted(names, key=collation_key))}")


def _relayed_words(room: Room, remote: Remote) -> str:
    unpinned = "" if remote.trust == "relayed" else " (its key as that member told it: not verified by you)"
    return f"relayed via {room.label(remote.via[0])}{unpinned}"


def _no_route_words(when: float) -> str:
    return f"no network path (last try {time.monotonic() - when:.0f} s ago; trying again; see /netcheck)"


MAPPING_WORDS = {
    "none": "no (no NAT: your address is public)",
    "endpoint-independent": "no (one public address for every destination: peers reach you directly, unless "
                            "they sit behind a symmetric NAT)",
    "endpoint-dependent": "yes (a symmetric NAT: peers behind most other NATs reach you only through TURN)",
    "unknown": "unknown (it takes two STUN servers to tell)",
    None: "unknown (no STUN answer)",
}


def netcheck_lines(report: NetReport) -> list[str]:
    """A NetReport in words, one fact a line."""
    if not report.answers:
        return ["no STUN or TURN server to ask (--ice)"]
    udp = {True: "yes", False: "no STUN server answered: UDP is blocked, or the servers are down",
           None: "not checked (no STUN server)"}[report.udp]
    lines = [f"UDP: {udp}"]
    if report.public:
        lines.append(f"public address: {', '.join(report.public)}")
    lines.append(f"mapping varies by destination: {MAPPING_WORDS[report.mapping]}")
    lines.append("servers:")
    for answer in report.answers:
        if answer.relay:
            said = f"relay {_address(answer.relay)}, {answer.ms:.1f} ms"
        elif answer.answered:
            said = f"saw you as {_address(answer.mapped)}, {answer.ms:.1f} ms"
        else:
            said = answer.error or "no answer"
        lines.append(f"  {answer.server.url:<36} {said}")
    return lines


@command("netcheck", help="what your network lets through: NAT, UDP, STUN/TURN servers", usage="/netcheck")
async def _netcheck(ctx: Context, args: str) -> None:
    """Asks every --ice server: STUN servers for the address they see (from one socket: if they see different
    ones, the NAT maps by destination and peers behind another NAT need TURN), TURN servers for a relay."""
    for line in netcheck_lines(await ctx.client.netcheck()):
        ctx.echo(line)


@command("whois", help="a peer's key fingerprint and your safety number", usage="/whois NAME")
async def _whois(ctx: Context, args: str) -> None:
    """Compare the safety number by voice with that person: if it matches, nobody is in the middle."""
    name, _ = _split_first(args, "/whois NAME")
    peer = ctx.room.find(name)
    ctx.echo(f"{ctx.room.label(peer)}: {peer.dialect.name}, {peer.state}")
    if ctx.client.trust.is_accepting(bare_name(peer.name)):
        ctx.echo("  /trust is waiting: the next key it proves is pinned")
    if not peer.is_verified:
        announced = f": it announced {show_fingerprint(peer.fingerprint)}, unproven" if peer.fingerprint else ""
        ctx.echo(f"  NOT VERIFIED{announced}; no safety number until it proves its key")
    elif peer.fingerprint:
        pinned = ctx.client.trust.verdict(bare_name(peer.name), peer.key_string)
        ctx.echo(f"  key fingerprint {show_fingerprint(peer.fingerprint)} ({pinned})")
        ctx.echo(f"  safety number   {safety_number(ctx.client.identity.fingerprint, peer.fingerprint)}")


@command("msg", "query", "m", help="direct message to one peer", usage="/msg NAME TEXT",
         not_on={"peerjs": PEERJS_LACKS["msg"]})
async def _msg(ctx: Context, args: str) -> None:
    name, text = _split_first(args, "/msg NAME TEXT")
    if not text:
        raise UsageError("usage: /msg NAME TEXT")
    await ctx.dm(name, text)


@command("send", "file", help="send a file to one rtchat.py peer", usage="/send NAME PATH",
         example="/send bob report.pdf", not_on={"peerjs": PEERJS_LACKS["send"]})
async def _send(ctx: Context, args: str) -> None:
    name, path = _split_first(args, "/send NAME PATH")
    if not path:
        raise UsageError("usage: /send NAME PATH")
    room, full = ctx.room, os.path.expanduser(path)
    if not os.path.isfile(full):
        raise UsageError(f"{path} is not a file")
    room.find(name)  # an unknown name is a usage error now, not later
    size = os.path.getsize(full)
    ctx.echo(f"-!- sending {path} ({human_size(size)}) to {name}; you can go on chatting")

    async def transfer() -> None:  # in the background: the prompt stays free
        started = time.monotonic()
        try:
            saved = await room.send_file(name, path)
        except Exception as exc:  # in the background: every failure is told, none is a traceback
            ctx.echo(f"-!- {path} was not sent to {name}: {exc if isinstance(exc, RtchatError) else repr(exc)}")
            return
        took = max(time.monotonic() - started, 1e-3)
        ctx.echo(f"-!- {name} has {path} as {saved} ({human_size(size)} in {took:.1f} s, checked)")
    _spawn(transfer(), f"send-file-{name}")


@command("me", help="say what you are doing", usage="/me ACTION", example="/me waves")
async def _me(ctx: Context, args: str) -> None:
    if not args:
        raise UsageError("usage: /me ACTION")
    await ctx.say(args, action=True)


@command("say", help="send a line as it is (even one starting with /)", usage="/say TEXT")
async def _say(ctx: Context, args: str) -> None:
    if not args:
        raise UsageError("usage: /say TEXT")
    await ctx.say(args)


@command("ask", help="ask a peer a question and wait for the answer", usage="/ask NAME TOPIC [TEXT]",
         example="/ask bob time", not_on={"peerjs": PEERJS_LACKS["ask"]})
async def _ask(ctx: Context, args: str) -> None:
    """TOPIC picks the handler on the other side (e.g. time, ping); TEXT goes with it."""
    name, rest = _split_first(args, "/ask NAME TOPIC [TEXT]")
    topic, content = _split_first(rest, "/ask NAME TOPIC [TEXT]")
    room = ctx.room
    peer = room.find(name)
    ctx.echo(f"asking {room.label(peer)}: {topic} {content}".rstrip())
    try:
        answer = await room.ask(peer.name, topic, content or None)
    except AskError as exc:
        ctx.echo(f"no answer: {exc}")
        return
    shown = answer if isinstance(answer, str) else to_json(answer)
    ctx.echo(f"{room.label(peer)} answers: {clean(shown, keep_newlines=True)}")


@command("trust", help="pin a peer's key; for a changed key, the one it proves next", usage="/trust NAME")
async def _trust(ctx: Context, args: str) -> None:
    """A verified peer's key, or a browser's refused key, is pinned at once. Otherwise (an rtchat.py peer that
    changed keys) the next key NAME proves in a channel, within 10 minutes, is pinned in place of the old one."""
    name, _ = _split_first(args, "/trust NAME")
    room, bare = ctx.room, bare_name(name)
    peer = room.peers.get(name) or next((p for p in room.peers.values() if bare_name(p.name) == bare), None)
    key = peer.key_string if peer and peer.is_verified else room.refused.get(bare)
    if key:
        ctx.client.trust.pin(bare, key, replace=True)
        room.refused.pop(bare, None)
        ctx.echo(f"pinned {bare} to key {show_fingerprint(fingerprint(key))}")
    else:
        ctx.client.trust.accept_next(bare)
        ctx.echo(f"-!- the next key {bare} proves (within {ACCEPT_NEXT_KEY_S / 60:g} minutes) will be pinned for "
                 f"{bare}; then compare safety numbers with /whois {bare}")
    if peer is None or not peer.is_open:
        room.retry(bare)


@command("untrust", help="forget a peer's pinned key", usage="/untrust NAME")
async def _untrust(ctx: Context, args: str) -> None:
    name, _ = _split_first(args, "/untrust NAME")
    count = ctx.client.trust.unpin(bare_name(name))
    ctx.echo(f"forgot {count} key(s) of {bare_name(name)}" if count else f"no key pinned for {bare_name(name)}")


@command("whoami", help="your name and key fingerprint", usage="/whoami")
async def _whoami(ctx: Context, args: str) -> None:
    client = ctx.client
    here = ctx.session.room
    if here is not None and here.network_name == "peerjs":
        ctx.echo(f"{here.me} on PeerJS at {here.server}")
    else:
        ctx.echo(f"{client.me} in #{here.name if here else '-'} on {client.signaling.broker}")
    ctx.echo(f"  key fingerprint {show_fingerprint(client.identity.fingerprint)}")
    ctx.echo(f"  state file      {client.store.path}")


@command("history", help="show earlier messages of this room", usage="/history [N]")
async def _history(ctx: Context, args: str) -> None:
    count = int(args) if args.strip().isdigit() else 20
    for msg in ctx.room.history(count):
        ctx.session.show(msg, from_history=True)


@command("lastlog", help="search this room's history", usage="/lastlog TEXT", example="/lastlog deploy")
async def _lastlog(ctx: Context, args: str) -> None:
    """Every kept message of the room that contains TEXT (any case), oldest first, with its date."""
    if not args.strip():
        raise UsageError("usage: /lastlog TEXT")
    wanted = args.strip().casefold()
    found = [msg for msg in ctx.room.history(HISTORY_PER_ROOM) if wanted in msg.text.casefold()]
    for msg in found[-50:]:
        ctx.session.show(msg, from_history=True)
    ctx.echo(f"-!- {len(found)} message(s) with {args.strip()!r} in #{ctx.room.name}" +
             (" (the last 50 shown)" if len(found) > 50 else ""))


@command("ignore", help="hide someone's messages (kept across restarts)", usage="/ignore [NAME]")
async def _ignore(ctx: Context, args: str) -> None:
    """Without NAME, lists whom you ignore. Their messages are still kept in the history."""
    name = bare_name(args.strip().lstrip("@")).casefold()
    if not name:
        ignored = ctx.client.store.data["ignored"]
        ctx.echo("ignoring " + ", ".join(ignored) if ignored else "you ignore nobody")
        return
    ctx.client.store.update(lambda d: d["ignored"].append(name) if name not in d["ignored"] else None)
    ctx.echo(f"-!- ignoring {name} (/unignore {name} to undo)")


@command("unignore", help="show someone's messages again", usage="/unignore NAME")
async def _unignore(ctx: Context, args: str) -> None:
    name, _ = _split_first(bare_name(args.strip().lstrip("@")).casefold(), "/unignore NAME")
    if name not in ctx.client.store.data["ignored"]:
        raise UsageError(f"you do not ignore {name}")
    ctx.client.store.update(lambda d: d["ignored"].remove(name) if name in d["ignored"] else None)
    ctx.echo(f"-!- no longer ignoring {name}")


@command("rooms", "list", help="the rooms you are in, and those you have been in", usage="/rooms",
         not_on={"peerjs": PEERJS_LACKS["rooms"]})
async def _rooms(ctx: Context, args: str) -> None:
    session = ctx.session
    for number, room in enumerate(session.rooms, 1):
        unread = session.unread_count(room)
        state = "here" if room is session.room else f"{unread} unread" if unread else "joined"
        ctx.echo(f"{number}: #{clean(room.name, 200)} ({state}, {len(room.verified_peers())} verified)")
    rooms = ctx.client.store.data["rooms"]
    earlier = [name for name in sorted(rooms, key=lambda r: -rooms[r].get("last_joined", 0))
               if name not in ctx.client.rooms]
    if earlier:
        ctx.echo("earlier: " + " ".join(f"#{clean(name, 200)}" for name in earlier[:20]))


@command("clear", help="clear the screen", usage="/clear")
async def _clear(ctx: Context, args: str) -> None:
    ctx.session.clear()


@command("quit", "exit", "q", help="leave and exit (also Ctrl-D)", usage="/quit")
async def _quit(ctx: Context, args: str) -> None:
    ctx.session.quit()


# =============================================================================
# Plugins: contrib/*.py beside this file, plus folders in RTCHAT_PLUGINS.
# A plugin that fails to load is reported in one line and skipped. Plugins is
# a bot's Session: plugins at work without a front end.
# =============================================================================

def plugin_folders() -> list[Path]:
    """contrib/ beside this file, unless that is an installed copy's site-packages (where a contrib/ is anyone's)."""
    here = Path(__file__).resolve().parent
    folders = [] if here.name in ("site-packages", "dist-packages") else [here / "contrib"]
    folders += [Path(p).expanduser() for p in os.environ.get("RTCHAT_PLUGINS", "").split(os.pathsep) if p]
    return folders


def load_plugins(registry: Registry, folders: list[Path]) -> tuple[list[str], list[str]]:
    """Import every *.py of the folders; returns (loaded names, one-line reasons for skipped ones)."""
    loaded, skipped = [], []
    for folder in folders:
        for path in sorted(folder.glob("*.py")) if folder.is_dir() else ():
            if path.name.startswith("_"):
                continue
            try:
                spec = importlib.util.spec_from_file_location(f"rtchat_plugin_{path.stem}", path)
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
                registry.collect(module, path.stem)
                loaded.append(path.stem)
            except Exception as exc:
                log.debug("plugin %s failed", path, exc_info=True)
                skipped.append(f"plugin {path} skipped: {type(exc).__name__}: {exc}")
    return loaded, skipped


class Plugins(Session):
    """Plugins for a bot built on the library, as the chat has them: the files of the folders (by default
    plugin_folders()) and the bot's own tagged functions (add). Their @question handlers answer at once, their @on
    hooks hear the rooms given to attach(). This is the bot's Session: ctx.say() sends (unless may_send is False),
    ctx.echo() logs; a plugin that fails to load is logged (see .skipped) and left out."""

    def __init__(self, client: Client, folders: list[str | os.PathLike] | None = None, *,
                 may_send: bool = True) -> None:
        super().__init__(client)
        self.may_send = may_send
        found = plugin_folders() if folders is None else [Path(folder).expanduser() for folder in folders]
        self.loaded, self.skipped = load_plugins(self.registry, found)
        for line in self.skipped:
            log.warning("%s", line)
        self.answer_questions()

    def add(self, *functions: Callable, origin: str = "bot") -> None:
        """Put the bot's own @command, @question and @on functions to work, as the plugin called origin."""
        self.registry.collect({f"f{number}": func for number, func in enumerate(functions)}, origin)
        self.answer_questions()


# =============================================================================
# Front ends: the interactive prompt (prompt_toolkit), the pipe sender and the
# listener. App is their Session (client, rooms, commands, plugins, output).
# =============================================================================

_COLORS = (31, 32, 33, 34, 35, 36, 91, 92, 93, 94, 95, 96)
TURN_HINT = "--ice turn:USER:PASS@HOST:3478"


def no_route_text(them: str, facts: dict, report: NetReport | None) -> str:
    """Why ICE found no path to a peer (from a Peer's ice_facts and our NetReport), and what would make one."""
    ours, theirs = facts.get("ours", []), facts.get("theirs", [])
    udp = report.udp if report and report.udp is not None else facts.get("nat") is not None
    if not facts.get("stun"):
        cause = "you have no STUN server"
    elif not udp:
        cause = "no STUN server answered you: UDP may be blocked on your network"
    elif report and report.mapping == "endpoint-dependent":
        cause = "you are behind a symmetric NAT"
    else:
        cause = "you are behind a NAT" if facts.get("nat") else "your address is public"
    their_udp = "srflx" in theirs or "relay" in theirs
    if not udp:
        pass  # the cause is on our side; what they offered says little
    elif not their_udp:
        cause += f"; {them} gave no public address: UDP may be blocked there"
    elif facts.get("their_nat"):
        cause += f"; {them} is behind a NAT{' too' if facts.get('nat') else ''}"
    if "relay" in ours:
        fix = f"{them} cannot reach your TURN relay either: {them} needs a TURN server (over TCP if UDP is blocked)"
    elif facts.get("turn"):
        fix = "your TURN server gave no relay: see /netcheck"
    elif facts.get("stun") and not udp:
        fix = f"add a TURN server reachable over TCP: {TURN_HINT}?transport=tcp"
    elif not their_udp:
        fix = f"{them} needs a TURN server (over TCP if UDP is blocked there)"
    else:
        fix = f"add a TURN server: {TURN_HINT}"
    return f"no network path ({cause}); {fix}"


MAX_SHOWN_ROWS = 12      # screen rows one message or notice may take at a terminal; the rest is counted, not shown


def wrap_cells(text: str, first: int, rest: int) -> list[str]:
    """text in pieces that fill first, then rest, terminal cells (wide characters count two), cut after a space
    where one is in the piece's second half. A row we cut is never left for the terminal to wrap."""
    from prompt_toolkit.utils import get_cwidth
    pieces: list[str] = []
    piece: list[str] = []
    cells = 0
    for ch in text:
        width = get_cwidth(ch)
        if cells + width > (rest if pieces else first) and piece:
            cut = len(piece)
            space = "".join(piece).rfind(" ")
            if space >= cut // 2:
                cut = space + 1
            pieces.append("".join(piece[:cut]))
            piece = piece[cut:]
            cells = sum(get_cwidth(c) for c in piece)
        piece.append(ch)
        cells += width
    pieces.append("".join(piece))
    return pieces


def screen_rows(head: str, text: str, width: int | None, limit: int = MAX_SHOWN_ROWS) -> list[str]:
    """head + text as terminal rows. Every row after the first is indented, so no part of a message, however
    padded or broken into lines, can start a row the way another message does; and one message takes at most
    limit rows, the last saying how much is not shown (issue 12)."""
    indent = " " * max(2, min(len(head), (width or 80) // 3))
    rows: list[str] = []
    consumed: list[int] = []  # characters of text shown up to and including each row
    done = 0
    for number, line in enumerate(text.split("\n")):
        lead = head if number == 0 else indent
        pieces = wrap_cells(lead + line, width, width - len(indent)) if width else [lead + line]
        for index, piece in enumerate(pieces):
            rows.append(piece if index == 0 else indent + piece)
            done += len(piece) - (len(lead) if index == 0 else 0)
            consumed.append(done)
            if len(rows) > limit:
                return rows[:limit - 1] + [f"{indent}[... {len(text) - consumed[limit - 2]} more characters]"]
        done += 1
    return rows


def mentions(text: str, name: str) -> bool:
    """Does a message name you (your name as a word, any case)?"""
    return re.search(rf"(?<!\w){re.escape(name)}(?!\w)", text, re.IGNORECASE) is not None


def use_color(stream, flag: str | None = None) -> bool:
    """--color=always/never, else NO_COLOR, TERM=dumb and whether the stream is a terminal decide."""
    if flag in ("always", "never"):
        return flag == "always"
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    if os.environ.get("FORCE_COLOR"):
        return True
    return hasattr(stream, "isatty") and stream.isatty()


def _peer_fields(room: Room, peer: Peer) -> dict:
    return {"from": room.label(peer), "fingerprint": peer.fingerprint, "channel_bound": peer.channel_bound,
            "client": clean(peer.client_tag, 64) if peer.client_tag else None}


def key_changed_text(name: str, fp: str | None, verdict: str) -> str:
    why = "uses a key you have not pinned" if verdict == "new" else "has a DIFFERENT KEY than the one pinned"
    bare = clean(bare_name(name), 80)
    if fp is None:  # signaling in a pinned rtchat.py peer's name, signed by another message key
        return f"{why}: its signaling is signed by another key (a new key, or anyone on the broker); ignored. " \
               f"If {bare} changed keys, /trust {bare} accepts the key they prove next; then compare safety " \
               f"numbers (/whois {bare})"
    return f"{why} ({show_fingerprint(fp)}); refused. If that is expected, /trust {bare}"


VERIFY_FAILED_TEXT = {   # a verify-failed event's reason in words
    "no-identity": "did not prove its key in time; disconnected",
    "bad-identity": "could not prove its key on this connection (someone may be in the middle); disconnected",
    "challenge-failed": "failed the key check (identify/challenge); disconnected",
}


RELAY_REFUSED_TEXT = {   # a relay-refused event's reason in words
    "off": "does not pass messages on (--no-relay); trying another member",
    "busy": "passes on no more of your messages for now (over its budget); trying another member",
    "unreachable": "no longer reaches whom you wrote to; trying another member",
}


def describe_transfer(transfer: Transfer, label: str) -> str:
    """'sending report.pdf to bob: 45.0 MB of 300.0 MB (15%), 13.6 MB/s, 19 s left'."""
    verb, way = ("receiving", "from") if transfer.incoming else ("sending", "to")
    line = f"{verb} {transfer.name} {way} {label}: {human_size(transfer.done)} of {human_size(transfer.size)}"
    if transfer.size:
        line += f" ({100 * transfer.done // transfer.size}%)"
    elapsed = time.monotonic() - transfer.started
    if transfer.state == "checking":
        return line + ", waiting for the receiver to check it"
    if transfer.done and elapsed > 0:
        rate = transfer.done / elapsed
        line += f", {human_size(rate)}/s, {math.ceil((transfer.size - transfer.done) / rate)} s left"
    return line


def transfer_text(transfer: Transfer, label: str = "") -> str:
    """What a 'file-progress' event says, as seen from our side."""
    if transfer.state == "failed":
        way = f"sent {transfer.name}, but it was not saved" if transfer.incoming else f"{transfer.name} was not sent"
        return f"{way}: {clean(transfer.error, 300)}"
    if transfer.state == "offered":
        return f"is sending you {transfer.name} ({human_size(transfer.size)})" if transfer.incoming else \
            f"offered {transfer.name} ({human_size(transfer.size)})"
    if transfer.state == "done":
        return f"{transfer.name} ({human_size(transfer.size)}) is there, SHA-256 checked"
    return describe_transfer(transfer, label)


def message_record(msg: Message) -> dict:
    """A message as --json prints it (Message.to_dict, with every string from a peer cleaned)."""
    record = msg.to_dict()
    for field in ("from", "to", "relayed_by", "lookalike"):
        if isinstance(record.get(field), str):
            record[field] = clean(record[field], MAX_NAME_CHARS + 16)
    record["text"] = clean(record["text"], keep_newlines=True)
    return record


def event_record(room: Room, event: str, *args: Any) -> dict:
    """An event as --json prints it: type, room, from, text, fingerprint and ts always (from, fingerprint may be
    null), and the fields of its kind. Every string from a peer is cleaned. Fields are only ever added."""
    record = {"type": event, "room": room.name, "from": None, "text": "", "fingerprint": None, "ts": now_ms()}
    if event in ("message", "dm", "history"):
        return message_record(args[0])
    if event in ("join", "verified"):
        record.update(_peer_fields(room, args[0]))
        if event == "join" and not args[0].is_verified:  # a page's user on PeerJS: nothing to prove with
            record.update(text=UNVERIFIED_PINNED_JOIN if args[0].pinned else UNVERIFIED_JOIN, path=args[0].path)
        elif event == "join":
            how = "channel-bound" if args[0].channel_bound else "legacy key check, not channel-bound"
            record.update(text=f"joined (verified, {how})", path=args[0].path)
            if args[0].lookalike:  # shown apart from the known name it looks like
                like = clean(args[0].lookalike, MAX_NAME_CHARS)
                record.update(text=f"joined (verified, {how}; LOOKS LIKE {like})", lookalike=like)
    elif event == "leave":
        peer, reason = args
        record.update(_peer_fields(room, peer), text=f"left ({clean(reason, 200)})", reason=clean(reason, 200))
    elif event == "key-changed":
        name, fp, verdict = args
        record.update({"from": clean(name, 80), "fingerprint": fp, "verdict": verdict,
                       "text": key_changed_text(name, fp, verdict)})
    elif event == "delivered":
        msg_id, peer = args
        record.update(_peer_fields(room, peer), id=msg_id)
    elif event == "file":
        got = args[0]
        record.update({"from": room.label(got.sender), "fingerprint": got.fingerprint, "name": got.name,
                       "path": str(got.path), "size": got.size, "sha256": got.sha256,
                       "text": f"sent {got.name} ({human_size(got.size)}), saved as {got.path}"})
    elif event == "no-route":  # App adds text (the facts in words) and mapping (from a netcheck)
        peer, facts = args
        record.update(_peer_fields(room, peer), **facts)
    elif event == "key-accepted":
        peer = args[0]
        record.update(_peer_fields(room, peer), text=f"is now pinned to its new key "
                      f"{show_fingerprint(peer.fingerprint)}, as /trust asked; compare safety numbers: "
                      f"/whois {room.label(peer)}")
    elif event == "key-refused":
        name, reason, confirmed = args
        me = bare_name(room.me)
        record.update({"from": clean(name, 80), "reason": reason, "confirmed": confirmed,
                       "text": f"refuses your key: it has another key pinned for the name {me}, so you cannot "
                               f"connect. If you changed keys, ask them to type /trust {me}" +
                               ("" if confirmed else " (unconfirmed: anyone on the broker could send this)")})
    elif event == "file-progress":
        transfer = args[0]
        record.update({"from": room.label(transfer.peer), "id": transfer.id, "name": transfer.name,
                       "size": transfer.size, "done": transfer.done, "incoming": transfer.incoming,
                       "state": transfer.state, "error": transfer.error,
                       "text": transfer_text(transfer, room.label(transfer.peer))})
    elif event == "question-failed":
        asked, exc = args
        error = f"{type(exc).__name__}: {clean(exc, 300)}"
        record.update(_peer_fields(room, asked.sender), topic=clean(asked.topic, 64), error=error,
                      text=f"the answer to its question {clean(asked.topic, 64)!r} failed: {error}")
    elif event == "status":
        record["text"] = clean(args[0], 500).removeprefix("-!- ")
    elif event == "disk-error":
        path, reason = args
        record.update(path=path, reason=clean(reason, 300), text=f"cannot write the history ({clean(reason, 300)}): "
                      f"messages are shown but not acknowledged until it can")
    elif event == "disk-ok":
        record.update(path=args[0], text="the history can be written again")
    elif event == "queued":
        msg = args[0]
        record.update({"from": clean(msg.to or "", MAX_NAME_CHARS + 16), "id": msg.id,
                       "text": "is away: the message waits and goes out when they are back"})
    elif event == "compaction-failed":
        path, reason = args
        record.update(path=path, reason=clean(reason, 300), text=f"cannot compact the history ({clean(reason, 300)}): "
                      f"it is kept as it is, and grows")
    elif event == "mitm-detected":
        peer, claimed = args
        record.update(_peer_fields(room, peer), fingerprint=claimed,
                      text=f"its key ({show_fingerprint(claimed)}) signed another connection than this one: someone "
                           f"is in the middle; disconnected")
    elif event == "verify-failed":
        peer, reason = args
        record.update(_peer_fields(room, peer), reason=reason, text=VERIFY_FAILED_TEXT.get(reason, reason))
    elif event == "relayed":
        name, via = args
        record.update({"from": room.label(name), "via": room.label(via) if via else None,
                       "text": f"relayed via {room.label(via)} (no direct connection)" if via else
                       "no longer reached through another member"})
    elif event == "relay-refused":
        peer, why = args
        record.update(_peer_fields(room, peer), reason=why, text=RELAY_REFUSED_TEXT[why])
    elif event == "history-conflict":
        peer, claimed = args
        record.update(_peer_fields(room, peer), claimed=claimed,
                      text=f"has key {show_fingerprint(peer.fingerprint)}, but history passed on in that name was "
                           f"signed by another key: it was forged")
    return record


class Printer:
    """Turns messages and events into lines: 'chat' for people, 'plain' (NAME: TEXT) or 'json' for scripts;
    'quiet' (pipe mode) shows no messages, and status on stderr."""

    def __init__(self, style: str, color: bool, out=None, err=None, width: Callable[[], int] | None = None,
                 bell: bool = False) -> None:
        self.style = style
        self.color = color and style != "json"
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.width = width          # a terminal's columns, for 'chat': rows are cut to fit, never wrapped by it
        self.bell = bell            # ring on a mention or a direct message ('chat')
        self.broken = False

    def _paint(self, text: str, code: int | str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.color else text

    def nick(self, name: str) -> str:
        return self._paint(name, _COLORS[int(hashlib.sha256(bare_name(name).encode()).hexdigest(), 16) % 12])

    def _write(self, stream, line: str, end: str = "\n") -> None:
        try:
            stream.write(line + end)
            stream.flush()
        except BrokenPipeError:
            self.broken = True

    def json_line(self, record: dict) -> None:
        self._write(self.out, json.dumps(record, ensure_ascii=False))

    def message(self, msg: Message, me: str, from_history: bool = False, other_room: bool = False,
                mention: bool = False) -> None:
        if self.style == "quiet":
            return
        if self.style == "json":
            self.json_line({**message_record(msg), **({"history": True} if from_history else {})})
            return
        msg = dataclasses.replace(msg, text=clean(msg.text, keep_newlines=True))  # kept as sent; shown cleaned
        text, sender = msg.text, clean(msg.sender, MAX_NAME_CHARS + 16)
        if self.style == "chat" and msg.room == PEERJS_ROOM and msg.trust == "unverified":  # nothing proved it
            sender += UNVERIFIED_MARK
        if msg.lookalike:  # shown apart from the name it imitates; a wire name cannot hold " ("
            sender += f" (looks like {clean(msg.lookalike, MAX_NAME_CHARS)})"
        via = ""
        if msg.relayed_by:
            via = f"via {clean(msg.relayed_by, MAX_NAME_CHARS + 16)}" + (
                ", unverified" if msg.trust == "unverified" else "")
        if self.style == "plain":
            # (the chat marks history by its time stamp's style)
            notes = [note for note in (via, "history" if from_history else "") if note]
            text += f"  ({', '.join(notes)})" if notes else ""
            prefix = f"{sender} (dm)" if msg.kind == "dm" else sender
            self._write(self.out, f"{prefix}: {'* ' if msg.action else ''}{text.replace(chr(10), ' ')}")
            return
        self._chat_message(msg, sender, f"({via})" if via else "", me, from_history, other_room, mention)

    def _chat_message(self, msg: Message, sender: str, via: str, me: str, from_history: bool, other_room: bool,
                      mention: bool) -> None:
        """HH:MM <name> text (with the date if not from today, #room first if not the room you are in). The
        sender and how far it is trusted are on the first row, before the text; other rows are indented."""
        when = time.localtime(msg.ts / 1000)
        stamp = time.strftime("%H:%M" if when[:3] == time.localtime()[:3] else "%Y-%m-%d %H:%M", when)
        to = clean(msg.to or me, MAX_NAME_CHARS + 16)
        if msg.kind == "dm":
            who, painted = f"[{sender} -> {to}]", f"[{self.nick(sender)} -> {self.nick(to)}]"
        elif msg.action:
            who, painted = f"* {sender}", f"* {self.nick(sender)}"
        else:
            who, painted = f"<{sender}>", f"<{self.nick(sender)}>"
        place = f"#{clean(msg.room, 200)} " if other_room else ""
        mark = f"{via} " if via else ""
        head = f"{place}{stamp} {who} {mark}"
        painted = f"{place}{self._paint(stamp, '2;3' if from_history else 2)} {painted} " + (
            self._paint(via, 33) + " " if via else "")
        self._rows(head, msg.text, painted, "1;33" if mention else None)
        if mention and self.bell and not from_history:
            self._write(self.out, "\a", end="")

    def _rows(self, head: str, text: str, painted_head: str | None = None, code: int | str | None = None,
              stream=None, limit: int = MAX_SHOWN_ROWS) -> None:
        rows = screen_rows(head, text, self.width() if self.width else None, limit)
        if painted_head is not None and rows[0].startswith(head):
            rows[0] = painted_head + self._paint(rows[0][len(head):], code) if code else painted_head + rows[0][
                len(head):]
            rows[1:] = [self._paint(row, code) for row in rows[1:]] if code else rows[1:]
        elif code:
            rows = [self._paint(row, code) for row in rows]
        self._write(stream or self.out, "\n".join(rows))

    def event(self, kind: str, name: str, text: str = "", room: str | None = None) -> None:
        """join/leave/key-changed/file/no-route: a marked line, led by the room if it is not the one you are in
        (json style prints event_record instead)."""
        marker = {"join": "-->", "leave": "<--"}.get(kind, "-!-")
        name += ":" if kind in ("no-route", "mitm-detected") else ""
        place = f"#{clean(room, 200)} " if room else ""
        self.status(place + " ".join(part for part in (marker, name, text) if part),
                    32 if kind == "join" else 33 if kind == "leave" else 31)

    def status(self, text: str, code: int | str = 2, limit: int = MAX_SHOWN_ROWS) -> None:
        if self.style == "chat":
            self._rows("", text, code=code, limit=limit)
        else:
            self._write(self.err, text)

    def clear(self) -> None:
        if self.style == "chat":
            self._write(self.out, "\x1b[2J\x1b[H")


@dataclasses.dataclass
class Unread:
    """Lines that came in a room while you were in another: all of them, and those for you (mentions, DMs)."""
    count: int = 0
    for_you: int = 0


class App(Session):
    """The Session of every front end: the client, the rooms you are in (one of them current), commands, plugins
    and output. Room events become lines here: the library reports facts, this words them."""

    def __init__(self, client: Client, registry: Registry, printer: Printer, secret: str | None = None,
                 history_lines: int = 10, may_send: bool = True, remember_rooms: bool = False) -> None:
        super().__init__(client, registry)
        self.printer = printer
        self.secret = secret
        self.history_lines = history_lines
        self.may_send = may_send            # off in the script modes: they send only what they are given
        self.history_left = math.inf        # history events still to show (--listen --history N shows N in all)
        self._passed_on: list[Message] = []  # history events of this turn of the loop: one peer's batch
        self.remember_rooms = remember_rooms  # the interactive chat rejoins the rooms you were in on its next start
        self.unread: dict[str, Unread] = {}
        self.transfers: dict[str, Transfer] = {}  # files on their way, in or out
        self.changed: Callable[[], None] = lambda: None  # the screen redraws what shows state (toolbar, progress)
        self._listeners: dict[str, list[tuple[str, Callable]]] = {}

    def echo(self, text: str) -> None:
        self.printer.status(clean(text, 4000, keep_newlines=True), 0)

    def show(self, msg: Message, from_history: bool = False, mention: bool = False) -> None:
        other = self.room is None or msg.room != self.room.name
        self.printer.message(msg, self.client.me, from_history, other_room=other, mention=mention)

    def clear(self) -> None:
        self.printer.clear()

    def unread_count(self, room: Room) -> int:
        unread = self.unread.get(room.name)
        return unread.count if unread else 0

    async def switch_room(self, name: str) -> Room:
        name = check_room_name(name)
        if name not in self._listeners:
            room = await self.client.join(name, self.secret)  # the room itself, if the client is in it already
            self.enter(room)
            sealed = " (sealed)" if room.seal else ""
            self.printer.status(f"-!- joined #{clean(room.name, 200)}{sealed} as {room.me} "
                                f"on {self.client.signaling.broker}")
            if self.remember_rooms:
                self.client.store.defer(lambda d: d["rooms"].setdefault(name, {}).update(open=True))
        return self.select_room(name)

    def enter(self, room: Room | PeerJSPlace) -> None:
        """Show this place's events and make it the current one, its last lines first."""
        self._listeners[room.name] = [(event, room.on(event, functools.partial(self._display, room, event)))
                                      for event in EVENTS]
        self.attach(room)
        self.room = room
        for msg in room.history(self.history_lines):
            self.show(msg, from_history=True)

    def select_room(self, name: str) -> Room:
        room = super().select_room(name)
        self.unread.pop(room.name, None)
        if self.remember_rooms:
            self.client.store.defer(lambda d: d.update(last_room=room.name))
        self.changed()
        return room

    async def part_room(self, name: str | None = None) -> Room | None:
        room = self.room if name is None else self.client.rooms.get(name.lstrip("#"))
        if room is not None:
            for event, listener in self._listeners.pop(room.name, ()):
                room.off(event, listener)
            self.unread.pop(room.name, None)
        now = await super().part_room(name)
        if self.remember_rooms:
            self.client.store.defer(lambda d: d["rooms"].setdefault(room.name, {}).update(open=False))
        self.changed()
        return now

    async def rejoin(self, current: str) -> None:
        """Join the rooms that were open when the interactive chat last ran (current last, so it is current)."""
        rooms = self.client.store.data["rooms"]
        remembered = sorted((name for name, r in rooms.items() if isinstance(r, dict) and r.get("open")),
                            key=lambda name: rooms[name].get("last_joined", 0))
        for name in remembered:
            if name != current.lstrip("#"):
                try:
                    await self.switch_room(name)
                except RtchatError as exc:
                    self.printer.status(f"-!- could not rejoin #{clean(name, 200)}: {exc}", 31)

    def is_ignored(self, name: str) -> bool:
        return bare_name(name).casefold() in self.client.store.data["ignored"]

    def failed(self, what: str, exc: BaseException) -> None:
        log.debug("%s failed", what, exc_info=exc)
        self.printer.status(f"-!- {what} failed: {type(exc).__name__}: {clean(exc, 300)} (see --debug)", 31)

    def _display(self, room: Room, event: str, *args: Any) -> None:
        other = room is not self.room
        if event == "join":
            self.no_route.pop((room.name, args[0].name), None)
        if event == "history":  # a message said before we came, passed on by a peer: shown as history, if wanted
            if not self._passed_on:
                asyncio.get_running_loop().call_soon(self._show_passed_on)
            self._passed_on.append(args[0])
        elif event == "no-route":
            peer, facts = args
            told = (room.name, peer.name) in self.no_route
            self.no_route[room.name, peer.name] = time.monotonic()
            if not told:  # a room tries again now and then: one line is enough
                _spawn(self._tell_no_route(room, peer, facts), f"no-route-{peer.name}")
        elif self.printer.style == "json":
            self.printer.json_line(event_record(room, event, *args))
        elif event in ("message", "dm"):
            msg = args[0]
            if self.is_ignored(msg.sender):
                return
            for_you = msg.kind == "dm" or mentions(msg.text, self.client.name)
            if other:
                unread = self.unread.setdefault(room.name, Unread())
                unread.count += 1
                unread.for_you += for_you
                self.changed()
            self.show(msg, mention=for_you)
        elif event in ("join", "leave", "key-changed", "file", "key-accepted", "key-refused", "disk-error", "disk-ok",
                       "compaction-failed", "history-conflict", "mitm-detected", "verify-failed", "queued",
                       "relayed", "relay-refused"):
            record = event_record(room, event, *args)
            self.printer.event(event, record["from"] or "", record["text"], room.name if other else None)
            self.changed()
        elif event == "delivered":
            msg_id, peer = args
            self.printer.status(("#" + room.name + " " if other else "") + f"-!- delivered to {room.label(peer)}", 2)
        elif event == "file-progress":
            self._display_transfer(room, args[0], other)
        elif event == "question-failed":
            asked, exc = args
            origin = self.registry.questions.get(asked.topic, (None, "a handler"))[1]
            self.failed(f"the answer to {room.label(asked.sender)}'s question {clean(asked.topic, 64)!r} "
                        f"({origin}; they were told)", exc)
        elif event == "status":
            self.printer.status(clean(args[0], 500), 31)

    async def _tell_no_route(self, room: Room, peer: Peer, facts: dict) -> None:
        """Say why a peer cannot be reached, knowing our NAT better after a netcheck (once per run)."""
        report = self.client.network
        if report is None:
            try:
                report = await self.client.netcheck()
            except Exception:
                log.debug("netcheck failed", exc_info=True)
        record = event_record(room, "no-route", peer, facts)
        record.update(text=no_route_text(record["from"], facts, report), mapping=report.mapping if report else None)
        if self.printer.style == "json":
            self.printer.json_line(record)
        else:
            self.printer.event("no-route", record["from"], record["text"],
                               room.name if room is not self.room else None)

    def _display_transfer(self, room: Room, transfer: Transfer, other: bool) -> None:
        """Files on their way are kept for the screen's progress lines; an incoming one is told when it starts and,
        if it fails, why (an outgoing one's end is told by whoever sent it, e.g. /send)."""
        if transfer.is_over:
            self.transfers.pop(transfer.id, None)
        else:
            self.transfers[transfer.id] = transfer
        if transfer.incoming and transfer.state in ("offered", "failed"):
            self.printer.event("file", room.label(transfer.peer), transfer_text(transfer),
                               room.name if other else None)
        self.changed()

    def _show_passed_on(self) -> None:
        """What a peer passed on at once comes oldest first: the newest of it, as many as are still wanted."""
        batch, self._passed_on = [msg for msg in self._passed_on if not self.is_ignored(msg.sender)], []
        keep = int(min(len(batch), max(self.history_left, 0)))
        self.history_left -= keep
        for msg in batch[len(batch) - keep:]:
            self.show(msg, from_history=True)

    async def run_line(self, line: str) -> None:
        """handle_line with errors turned into one line for the user."""
        try:
            await handle_line(self, line)
        except RtchatError as exc:
            self.printer.status(f"-!- {exc}", 31)
        except Exception as exc:
            self.failed(line.split()[0], exc)

    def toolbar(self) -> list[tuple[str, str]]:
        """The status bar: the room you are in and who is there, then other rooms with unread lines (those with
        lines for you stand out), then you and the broker. Most important first, for narrow terminals."""
        client, room = self.client, self.room
        if isinstance(room, PeerJSPlace):
            members = [m for m in room.peers.values() if m.is_open]
            server = "server ok" if room.server_connected else "server reconnecting"
            return [("", f" PeerJS: {len(members)} connected, {len(room.verified_peers())} verified "),
                    ("", f"| {room.me}, {server} ")]
        bar = [("", f" #{room.name}{' (sealed)' if room.seal else ''}: {len(room.verified_peers())} verified of "
                    f"{len(room.peers)} seen " if room else " no room (/join ROOM) ")]
        for number, other in enumerate(self.rooms, 1):
            unread = self.unread.get(other.name)
            if other is not room and unread:
                style = "class:toolbar.for-you" if unread.for_you else ""
                bar.append(("", "|"))
                bar.append((style, f" {number}:#{other.name} {unread.count}{'!' if unread.for_you else ''} "))
        broker = "broker ok" if client.signaling.is_connected else "broker reconnecting"
        bar.append(("", f"| {client.me}, {broker} "))
        return bar


class _StateHistory:
    """Input history kept in the state file (prompt_toolkit History, created lazily)."""

    @staticmethod
    def make(store: Store):
        from prompt_toolkit.history import History

        class StateHistory(History):
            def load_history_strings(self):
                return reversed([s for s in store.data["input_history"] if isinstance(s, str)])

            def store_string(self, string: str) -> None:
                def append(data: dict) -> None:
                    data["input_history"].append(string)
                    del data["input_history"][:-INPUT_HISTORY]
                store.defer(append)
        return StateHistory()


def _completer(app: App):
    from prompt_toolkit.completion import Completer, Completion, PathCompleter
    from prompt_toolkit.document import Document
    paths = PathCompleter(expanduser=True)

    class ChatCompleter(Completer):
        """Command names after '/' and '/help ', file paths after '/send NAME ', rooms after /join, /switch and
        /part, peer names elsewhere ('alice: ' at the start of a line)."""

        def get_completions(self, document, complete_event):
            text = document.text_before_cursor
            word = document.get_word_before_cursor(WORD=True)
            typed, space, rest = text.partition(" ")
            spec = app.registry.commands.get(typed[1:].lower()) if typed.startswith("/") and space else None
            if text.startswith("/") and not space:
                yield from self._commands(text[1:], "/")
            elif spec is not None and spec.name == "help" and " " not in rest:
                yield from self._commands(rest.lstrip("/"), "")
            elif spec is not None and spec.name == "send" and " " in rest.lstrip():
                yield from paths.get_completions(Document(rest.lstrip().partition(" ")[2].lstrip()), complete_event)
            elif spec is not None and spec.name in ("join", "switch", "part") and " " not in rest:
                known = [room.name for room in app.rooms] + [name for name in app.client.store.data["rooms"]
                                                            if spec.name == "join"]
                for name in dict.fromkeys(known):
                    if name.startswith(rest.lstrip("#")):
                        yield Completion(name, start_position=-len(rest))
            else:
                room = app.room
                for peer in list(room.peers.values()) if room else []:
                    label = peer.name if isinstance(room, PeerJSPlace) else room.label(peer)  # with no '?' mark
                    if label.lower().startswith(word.lstrip("@").lower()):
                        yield Completion(label + (": " if text == word else ""), start_position=-len(word))

        @staticmethod
        def _commands(typed: str, slash: str):
            for name in sorted(app.registry.commands):
                if name.startswith(typed.lower()):
                    yield Completion(slash + name, start_position=-len(typed) - len(slash))
    return ChatCompleter()


class ScreenOutput:
    """Where the interactive chat's lines go. While the prompt runs, the prompt and the status bar are erased, the
    lines printed and both drawn again below them: a line never lands in the draft or under the status bar. Lines
    that come together are printed together, with one redraw. (Not prompt_toolkit's run_in_terminal: that puts
    the terminal in cooked mode meanwhile, and keys typed then would be echoed into the screen.)"""

    def __init__(self) -> None:
        from prompt_toolkit.output import create_output
        self.output = create_output()
        self.app = None  # the prompt's Application while there is one
        self._pending: list[str] = []
        self._scheduled = False
        self._printing: asyncio.Task | None = None

    def columns(self) -> int:
        return max(20, self.output.get_size().columns)

    def write(self, text: str) -> None:
        self._pending.append(text)

    def flush(self) -> None:
        if self.app is None or not self.app.is_running:
            self._print()
        elif not self._scheduled:
            self._scheduled = True
            self.app.loop.call_soon_threadsafe(self._print_soon)  # after what else comes in this turn of the loop

    def _print_soon(self) -> None:
        self._printing = _spawn(self._print_when_ready(), "screen")

    async def _print_when_ready(self) -> None:
        renderer = self.app.renderer if self.app is not None else None
        if renderer is not None and renderer.waiting_for_cpr:
            # A cursor position asked for before these lines must arrive first: read after them, it would make
            # the prompt take more rows than are left, and the screen would scroll them away.
            await renderer.wait_for_cpr_responses()
        self._print()

    def _print(self) -> None:
        self._scheduled = False
        text, self._pending = "".join(self._pending), []
        if not text:
            return
        app = self.app if self.app is not None and self.app.is_running else None
        if app is not None:
            app.renderer.erase()  # the cursor goes back to where the prompt starts
        self.output.write_raw(text.replace("\n", "\r\n"))
        self.output.flush()
        if app is not None:
            app.renderer.request_absolute_cursor_position()  # how much room is left below, for the status bar
            app.invalidate()


class _LogToScreen(logging.Handler):
    """Log lines (warnings; everything with --debug) shown above the prompt like any other line."""

    def __init__(self, printer: Printer, formatter: logging.Formatter | None) -> None:
        super().__init__()
        self.printer = printer
        self.setFormatter(formatter)

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            if record.exc_info and not log.isEnabledFor(logging.DEBUG):  # a traceback only with --debug
                exc = record.exc_info[1]
                record = logging.makeLogRecord({**record.__dict__, "exc_info": None, "exc_text": None,
                                                "msg": f"{record.getMessage()}: {type(exc).__name__}: {exc} "
                                                       f"(see --debug)", "args": ()})
            self.printer.status(self.format(record), 31, limit=1000)


def _key_bindings(app: App):
    from prompt_toolkit.filters import has_completions
    from prompt_toolkit.key_binding import KeyBindings
    from prompt_toolkit.keys import Keys

    keys = KeyBindings()

    @keys.add("c-c")
    def _interrupt(event) -> None:
        """Ctrl-C clears the line; a second one in a row, on the empty line, leaves (as does Ctrl-D)."""
        previous = event.previous_key_sequence
        if event.current_buffer.text:
            event.current_buffer.reset()
        elif previous and previous[-1].key == Keys.ControlC:
            event.app.exit(exception=EOFError)  # as Ctrl-D (a KeyboardInterrupt would stop the event loop)
        else:
            app.echo("-!- Ctrl-C again (or Ctrl-D, or /quit) to leave")

    def go(offset: int | None = None, number: int | None = None) -> None:
        rooms = app.rooms
        if number is not None:
            if number <= len(rooms):
                app.select_room(rooms[number - 1].name)
        elif rooms:
            here = rooms.index(app.room) if app.room in rooms else 0
            app.select_room(rooms[(here + offset) % len(rooms)].name)

    for number in range(1, 10):
        keys.add("escape", str(number))(lambda event, number=number: go(number=number))
    keys.add("c-n", filter=~has_completions)(lambda event: go(1))
    keys.add("c-p", filter=~has_completions)(lambda event: go(-1))
    return keys


def _prompt_message(app: App) -> str:
    """Files on their way, one line each, updated in place; then the prompt, '[room] '."""
    lines = []
    for transfer in list(app.transfers.values()):
        room = app.client.rooms.get(transfer.room)
        lines.append("-!- " + describe_transfer(transfer, room.label(transfer.peer) if room else transfer.peer))
    return "\n".join(lines + [f"[{app.room.name if app.room else '-'}] "])


async def run_interactive(app: App, screen: ScreenOutput) -> int:
    from prompt_toolkit import PromptSession
    from prompt_toolkit.patch_stdout import patch_stdout
    from prompt_toolkit.styles import Style

    session = PromptSession(lambda: _prompt_message(app), history=_StateHistory.make(app.client.store),
                            completer=_completer(app), complete_while_typing=False, bottom_toolbar=app.toolbar,
                            refresh_interval=1.0, erase_when_done=True,  # the line comes back formatted, as in IRC
                            reserve_space_for_menu=0,  # the status bar right under the line, as in IRC clients
                            key_bindings=_key_bindings(app), output=screen.output,
                            style=Style.from_dict({"toolbar.for-you": "bold underline"}))
    screen.app, app.changed = session.app, session.app.invalidate
    root = logging.getLogger()
    handlers = root.handlers[:]
    root.handlers = [_LogToScreen(app.printer, handlers[0].formatter if handlers else None)]
    lines: set[asyncio.Task] = set()
    app.echo("Type to chat; /help lists commands; Ctrl-D or /quit leaves.")
    try:
        # Raw mode from the first prompt to the last: between two prompts the terminal would be in cooked mode,
        # where a Ctrl-D typed right after Enter is taken by the terminal as end-of-file and never reaches us.
        with patch_stdout(raw=True), session.input.raw_mode():  # anything else printed goes above the prompt too
            while not app.done.is_set():
                prompt = asyncio.ensure_future(session.prompt_async())
                done = asyncio.ensure_future(app.done.wait())
                await asyncio.wait({prompt, done}, return_when=asyncio.FIRST_COMPLETED)
                done.cancel()
                if not prompt.done():
                    prompt.cancel()
                    break
                try:
                    line = prompt.result()
                except (EOFError, KeyboardInterrupt):
                    break
                task = _spawn(app.run_line(line), "line")  # nothing a command waits for holds up typing
                lines.add(task)
                task.add_done_callback(lines.discard)
    finally:
        for task in lines:
            task.cancel()
        root.handlers = handlers
        screen.app, app.changed = None, lambda: None
    return 0


def _stdin_lines(queue: asyncio.Queue) -> None:
    """Feed stdin lines to the queue as they come (so `tail -f log | rtchat.py` works); None at EOF.

    A daemon thread: one blocked in readline() must not keep the program from exiting."""
    loop = asyncio.get_running_loop()

    def pump() -> None:
        for raw in iter(sys.stdin.buffer.readline, b""):
            loop.call_soon_threadsafe(queue.put_nowait, raw.decode("utf-8", "replace").rstrip("\r\n"))
        loop.call_soon_threadsafe(queue.put_nowait, None)
    threading.Thread(target=pump, name="stdin", daemon=True).start()


def _watch_refusals(room: Room) -> set[str]:
    """Names whose key is refused in this room from now on: a sender says so, with its own exit code."""
    refused: set[str] = set()
    room.on("key-changed", lambda name, fp, verdict: refused.add(clean(name, MAX_NAME_CHARS + 16)))
    return refused


def _refusal(refused: set[str]) -> str:
    return f"refused {', '.join(sorted(refused))}: not the pinned key (see --trust; in a chat, /whois, /trust or " \
           f"/untrust NAME)"


def _nobody(exc: NoPeers, refused: set[str]) -> RtchatError:
    """Nobody to send to: because a key was refused (exit 77), or because nobody came (75)."""
    return KeyMismatch(f"{exc}; {_refusal(refused)}") if refused else exc


def _recipient(room: Room, peer: Peer | Remote) -> str:
    """'bob', or 'bob (via carol)' for a member reached through another."""
    return f"{room.label(peer)} (via {room.label(peer.via[0])})" if isinstance(peer, Remote) and peer.via \
        else room.label(peer)


def _some(names: list[str], most: int = 12) -> str:
    """'a, b, c' or, in a large room, the first ones and how many more."""
    return ", ".join(names) if len(names) <= most else f"{', '.join(names[:most])} and {len(names) - most} more"


async def run_pipe(app: App, wait_peers: int, timeout: float) -> int:
    """Send every stdin line to everyone in the room: once at least wait_peers peers are verified and the others
    heard of have connected too. Exit 0 only if every recipient acknowledged every line and nobody heard of in
    the room was left out; stderr names who got the lines and who did not."""
    room = app.room
    queue: asyncio.Queue = asyncio.Queue()
    _stdin_lines(queue)
    refused = _watch_refusals(room)
    app.printer.status(f"waiting for {wait_peers} verified peer(s) in #{room.name} (up to {timeout:g} s)")
    try:
        await room.wait_for_room(wait_peers, timeout)
    except NoPeers as exc:
        raise _nobody(exc, refused) from None
    unreached = {p.name: room.label(p) for p in room.unverified_peers()}  # heard of, not verified by the timeout
    app.printer.status(f"sending to {_some([_recipient(room, p) for p in room.reachable_peers()]) or 'nobody'}")
    sent, recipients = 0, {}
    while (line := await queue.get()) is not None:
        if line.strip():
            room.send(line[:MAX_TEXT_CHARS])
            sent += 1
            recipients.update((p.name, room.label(p)) for p in room.reachable_peers())
    confirmed = await room.flush(timeout)
    missing = room.unacknowledged()
    got = sorted(label for name, label in recipients.items() if name not in missing)
    app.printer.status(f"delivered {sent} message(s) to {len(got)} peer(s)" + (f": {_some(got)}" if got else ""))
    left_out = sorted(label for name, label in unreached.items() if name not in recipients)
    if missing or not confirmed:
        names = _some(sorted(recipients.get(name, name) for name in missing), 30) or "every peer"
        raise NoPeers(f"{sent} message(s) sent, but not confirmed delivered by {names} within {timeout:g} s")
    if refused:
        raise KeyMismatch(f"not delivered to everyone: {_refusal(refused)}")
    if left_out and sent:
        raise NoPeers(f"not delivered to {', '.join(left_out)}: in #{room.name}, but not verified within "
                      f"{timeout:g} s")
    return 0


async def run_listen(app: App, count: int | None, history: int) -> int:
    """Print what is said from now on on stdout (NAME: TEXT, or NDJSON with --json); stop after count new
    messages. With history, up to that many earlier messages first, marked: kept ones, then ones peers pass on."""
    room = app.room
    received = 0
    app.history_left = history  # before anything can arrive: peers connect only once this coroutine waits
    for msg in room.history(history):
        app.history_left -= 1
        app.show(msg, from_history=True)

    def counted(msg: Message) -> None:
        nonlocal received
        received += 1
        if count is not None and received >= count:
            app.quit()
    room.on("message", counted)
    room.on("dm", counted)
    app.printer.status(f"listening in #{room.name}" + (f" for {count} message(s)" if count else ""))
    while not app.done.is_set() and not app.printer.broken:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(app.done.wait(), 0.5)
    return 0


def _progress_line(stream) -> Callable[[int, int], None]:
    """A progress line redrawn in place on a terminal, at most ten times a second."""
    shown = 0.0

    def show(sent: int, size: int) -> None:
        nonlocal shown
        if time.monotonic() - shown >= 0.1 or sent == size:
            shown = time.monotonic()
            stream.write(f"\r{human_size(sent)} of {human_size(size)} ({sent * 100 // max(size, 1)}%)\x1b[K"
                         + ("\n" if sent == size else ""))
            stream.flush()
    return show


async def run_send(app: App, name: str, path: str, timeout: float) -> int:
    """Send one file to one peer; exit 0 only once it has all of it on disk with the right SHA-256."""
    room = app.room
    refused = _watch_refusals(room)
    app.printer.status(f"waiting for {name} in #{room.name} (up to {timeout:g} s)")
    try:
        peer = await room.wait_for_peer(name, timeout)
    except NoPeers as exc:
        raise _nobody(exc, {n for n in refused if bare_name(n) == bare_name(name)}) from None
    size = os.path.getsize(path)
    app.printer.status(f"sending {path} ({human_size(size)}) to {room.label(peer)}")
    progress = _progress_line(app.printer.err) if app.printer.err.isatty() else None
    saved = await room.send_file(peer.name, path, progress=progress)
    app.printer.status(f"{room.label(peer)} has {path} as {saved} ({human_size(size)}, SHA-256 checked)")
    return 0


# =============================================================================
# main: options and environment, modes, exit codes.
# =============================================================================

EPILOG = f"""\
modes:
  With a terminal: interactive chat (type /help).
  With stdin from a pipe: each line is sent to everyone in the room, once --wait-peers peers are verified
    and the others heard of have connected; it exits 0 when every one of them acknowledged every line.
    Nothing is written to stdout.
  With --listen: messages said from now on go to stdout, as "NAME: TEXT" or NDJSON with --json
    (every event); --history N prints up to N earlier ones first, marked.
  With --send PATH --to NAME: sends one file and exits 0 once NAME has it on disk, SHA-256 checked.
  With --netcheck: asks the --ice servers what the network lets through, prints it (an object with --json), exits.
  With --peerjs [URL]: the chat, pipes and --listen on a peerjs-multichat mesh instead of an RTChat room;
    --connect NAME (in the chat also /connect NAME) dials a user and the meshes merge; a pipe sends once the mesh
    is merged (or --wait-peers users dialled you).
  Options of another mode are a usage error.

environment: RTCHAT_BROKER, RTCHAT_ROOM, RTCHAT_STATE, RTCHAT_ICE, RTCHAT_ICE_HOST, RTCHAT_SECRET,
  RTCHAT_PASSPHRASE, RTCHAT_FILES, RTCHAT_PEERJS (a PeerServer URL, as --peerjs URL), RTCHAT_PLUGINS (extra
  plugin folders), RTCHAT_DEBUG=1, NO_COLOR.

exit codes:
  0 success; 1 other error; {EX_USAGE} bad usage; {EX_UNAVAILABLE} broker or PeerServer (--netcheck: every server)
  unreachable; {EX_TEMPFAIL} no peer in time, or delivery not confirmed; {EX_NOPERM} key refused;
  {EX_CONFIG} state file problem; {EX_NOUSER} PeerJS user not online; {EX_CANTCREAT} PeerJS name taken;
  {EX_PROTOCOL} refused by the PeerServer; 130 interrupted.
"""


PEERJS_TOLD = ("key-changed", "key-accepted", "mitm-detected", "verify-failed", "disk-error", "disk-ok",
               "compaction-failed")  # what pipes and listeners on PeerJS say on stderr (--json: stdout), besides
#                                      a listener's joins and leaves


def peerjs_record(place: PeerJSPlace, event: str, *args: Any) -> dict:
    """An event on the PeerJS network as --json prints it: event_record's, with "network", and a member's name in
    "from" as it is (no mark: "fingerprint" and "channel_bound" say what it proved)."""
    record = event_record(place, event, *args) | {"network": "peerjs"}
    if event in ("join", "leave"):
        record["from"] = clean(args[0].name, MAX_NAME_CHARS)
    if event == "leave" and args[1] in ("", "left"):
        record["text"] = "left"
    return record


async def run_peerjs(args: argparse.Namespace, client: Client) -> int:
    """Pipes and listeners on a peerjs-multichat mesh, with the state file's identity and pins as in rooms: dial
    each --connect user (the mesh merges through them) or wait to be dialled, then send stdin's lines to everyone
    (pipe mode) or print what is said (--listen). No MQTT connection is made."""
    printer = Printer("json" if args.json else "plain" if args.listen else "quiet", use_color(sys.stdout, args.color))
    stop = asyncio.Event()  # a listener's --count reached, or its stdout closed
    received = 0

    def on_message(msg: Message) -> None:
        nonlocal received
        if args.mode != "listen":
            return
        if printer.style == "json":
            printer.json_line(message_record(msg) | {"network": "peerjs"})
        else:
            printer.message(msg, place.me)
        received += 1
        if args.count is not None and received >= args.count or printer.broken:
            stop.set()

    def on_event(event: str, *facts: Any) -> None:
        if event in ("join", "leave") and args.mode != "listen":
            return
        record = peerjs_record(place, event, *facts)
        if printer.style == "json":
            printer.json_line(record)
        else:
            printer.event(event, record["from"] or "", record["text"])
    await client.start(broker=False)
    try:
        place = await client.join_peerjs(args.peerjs or None)
        place.on("message", on_message)
        for event in ("join", "leave", *PEERJS_TOLD):
            place.on(event, functools.partial(on_event, event))
        for friend in args.connect:
            await place.connect(friend, args.timeout)
        if args.mode == "listen":
            printer.status(f"listening on PeerJS as {place.me}" + (f" for {args.count} message(s)" if args.count
                                                                   else ""))
            await stop.wait()
            return 0
        queue: asyncio.Queue = asyncio.Queue()
        _stdin_lines(queue)
        return await _peerjs_pipe(place.mesh, args, printer, queue)
    finally:
        await client.close()


async def _peerjs_pipe(mesh: PeerJSMesh, args: argparse.Namespace, printer: Printer, queue: asyncio.Queue) -> int:
    """Once the mesh reached is merged (or --wait-peers users dialled us), every stdin line to everyone in it; 0
    once each connection's SCTP acknowledged them all. The page sends no acknowledgements of its own."""
    deadline = time.monotonic() + args.timeout
    unreachable: set[str] = set()
    mesh.on("unreachable", lambda who, *reason: unreachable.add(who))
    if not args.connect:
        printer.status(f"waiting for {args.wait_peers} user(s) to connect to {mesh.name} (up to {args.timeout:g} s)")
        joined = asyncio.Event()
        mesh.on("join", lambda who: joined.set() if len(mesh.peers()) >= args.wait_peers else None)
        if len(mesh.peers()) < args.wait_peers:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(joined.wait(), args.timeout)
        if len(mesh.peers()) < args.wait_peers:
            raise NoPeers(f"nobody connected to {mesh.name} on PeerJS within {args.timeout:g} s")
    settled = await mesh.wait_settled(max(0.0, deadline - time.monotonic()))
    pending = set(mesh.pending())
    printer.status(f"sending to {', '.join(mesh.peers()) or 'nobody'}")
    sent, recipients = 0, set()
    unheard = 0  # lines that reached nobody (the mesh emptied): the network keeps no history to pass them on
    while (line := await queue.get()) is not None:
        if line.strip():
            got = mesh.send_chat(line[:MAX_TEXT_CHARS])[1]
            recipients.update(got)
            unheard += not got
            sent += 1
    confirmed = await mesh.flush(max(1.0, deadline - time.monotonic()))
    printer.status(f"delivered {sent} message(s) to {len(recipients)} peer(s)"
                   + (f": {', '.join(sorted(recipients))}" if recipients and confirmed else ""))
    if not confirmed:
        raise NoPeers(f"{sent} message(s) sent, but not confirmed delivered within {args.timeout:g} s")
    if unheard:
        raise NoPeers(f"{unheard} of {sent} message(s) reached nobody: nobody was connected then")
    left_out = sorted(unreachable - recipients)
    if left_out and sent:
        raise NoPeers(f"not delivered to {', '.join(left_out)}: in the mesh, but not reachable")
    if not settled and sent:
        raise NoPeers(f"not delivered to {', '.join(sorted(pending)) or 'part of the mesh'}: in the mesh, but not "
                      f"connected within {args.timeout:g} s")
    return 0


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """A usage mistake is one line, as every other error (argparse would print the whole usage first)."""
        self.exit(EX_USAGE, f"{self.prog}: {message} (see --help)\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    parser = _Parser(prog="rtchat.py", description=__doc__, epilog=EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", nargs="?", help="your name (default: the last one used)")
    parser.add_argument("--room", "-r", default=env("RTCHAT_ROOM"), help=f"room to join (default: last room, "
                        f"else {DEFAULT_ROOM!r}; browsers' widget default is {DEFAULT_ROOM!r})")
    parser.add_argument("--broker", "-b", default=env("RTCHAT_BROKER", DEFAULT_BROKER),
                        help=f"MQTT broker URL: mqtt:// mqtts:// ws:// wss:// (default: {DEFAULT_BROKER})")
    parser.add_argument("--state", default=None, help="state file (default: $RTCHAT_STATE or ~/.rtchat.json)")
    parser.add_argument("--ice", default=env("RTCHAT_ICE"),
                        help="STUN/TURN URLs, comma-separated (turn:USER:PASS@host:port), or 'none' "
                             "(default: RTChat's STUN servers)")
    parser.add_argument("--ice-host", action="append", default=[env("RTCHAT_ICE_HOST")] if env("RTCHAT_ICE_HOST")
                        else [], metavar="ADDR", help="only offer these host addresses in ICE "
                        "(repeatable or comma-separated; 127.0.0.1 for a loopback-only test)")
    parser.add_argument("--secret", default=env("RTCHAT_SECRET"),
                        help="seal the room with this passphrase: hidden topic, encrypted signaling")
    parser.add_argument("--passphrase", default=env("RTCHAT_PASSPHRASE"),
                        help="passphrase protecting your private key in the state file")
    parser.add_argument("--trust", choices=Trust.POLICIES, default="new",
                        help="which peer keys to accept: new = pin unknown names, refuse changed keys "
                             "(default); known = only pinned keys; any = everything")
    parser.add_argument("--files", default=env("RTCHAT_FILES", "off"), metavar="DIR|off",
                        help="take files rtchat.py peers send you, into DIR (default off: refused)")
    parser.add_argument("--no-relay", action="store_true", default=env("RTCHAT_NO_RELAY", "0") not in ("", "0"),
                        help="refuse to pass on anything for others (signaling and chat between members who "
                             "have no network path to each other; see Networks)")
    parser.add_argument("--max-peers", type=int, metavar="D", default=None,
                        help=f"in a room of more than {LARGE_ROOM_FACTOR}×D rtchat.py users, keep sessions with at "
                             f"most D of them and reach the others by gossip (default {MAX_NEIGHBORS}; 0: always "
                             f"connect to everyone; see Large rooms)")
    parser.add_argument("--peerjs", nargs="?", const="", default=env("RTCHAT_PEERJS") or None, metavar="URL",
                        help="chat on the peerjs-multichat network instead of in an RTChat room: log in on this "
                             "PeerServer (ws[s]://HOST:PORT/PATH?key=KEY; without URL the page's own, "
                             f"{PEERJS_CLOUD})")
    parser.add_argument("--connect", action="append", default=[], metavar="NAME",
                        help="with --peerjs: connect to this user (repeatable); the meshes merge as the page does")
    parser.add_argument("--netcheck", action="store_true",
                        help="show what the network lets through (public address, NAT mapping, UDP, which --ice "
                             "servers answer) and exit")
    parser.add_argument("--listen", action="store_true",
                        help="print messages said from now on to stdout; send nothing")
    parser.add_argument("--json", action="store_true", help="with --listen: one JSON object per line, every event")
    parser.add_argument("--count", type=int, metavar="N", help="with --listen: exit after N new messages")
    parser.add_argument("--history", type=int, metavar="N",
                        help="with --listen: print up to N earlier messages too, marked as history")
    parser.add_argument("--wait-peers", type=int, metavar="N",
                        help="pipe mode: verified peers to wait for at least before sending (default 1)")
    parser.add_argument("--send", metavar="PATH", help="send this file to the peer --to names, then exit")
    parser.add_argument("--to", metavar="NAME", help="with --send: who gets the file")
    parser.add_argument("--timeout", type=float, metavar="SECONDS",
                        help="pipe mode and --send: how long to wait for peers, and for delivery (default 30)")
    parser.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                        help="colour on a terminal (auto, the default, also follows NO_COLOR and TERM=dumb)")
    parser.add_argument("--no-color", dest="color", action="store_const", const="never", help="same as --color never")
    parser.add_argument("--no-bell", dest="bell", action="store_false",
                        help="no terminal bell when someone names you or sends you a direct message")
    parser.add_argument("--debug", action="store_true", default=env("RTCHAT_DEBUG", "") not in ("", "0"),
                        help="log details to stderr")
    parser.add_argument("--version", action="version", version=f"rtchat.py {__version__}")
    args = parser.parse_args(argv)
    args.ice = ice_option(args.ice)
    args.ice_host = list_option(args.ice_host)
    args.mode = "netcheck" if args.netcheck else "listen" if args.listen else "send" if args.send or args.to else \
        "interactive" if sys.stdin.isatty() else "pipe"
    allowed = {"listen": {"json", "count", "history"}, "pipe": {"wait_peers", "timeout"},
               "send": {"send", "to", "timeout"}, "interactive": set(), "netcheck": {"json"}}[args.mode]
    for option in ("json", "count", "history", "wait_peers", "send", "to", "timeout"):
        value = getattr(args, option)
        if value is not None and value is not False and option not in allowed:  # 0 is given too
            parser.error(f"--{option.replace('_', '-')} does not apply to {args.mode} mode "
                         f"(see the modes below --help's options)")
    if args.connect and args.peerjs is None:
        parser.error("--connect NAME is for the PeerJS network: add --peerjs [URL]")
    if args.peerjs is not None:
        given = "--peerjs" if args.peerjs != env("RTCHAT_PEERJS") else "RTCHAT_PEERJS (set in the environment)"
        for option, why in (("send", "peerjs-multichat has no file transfer"), ("history", "no history is passed on "
                            "there"), ("secret", "peerjs-multichat has no sealed rooms"), ("netcheck", "run it alone"),
                            ("room", "a mesh is whom you --connect to")):
            if getattr(args, option) and getattr(args, option) != env(f"RTCHAT_{option.upper()}"):
                parser.error(f"--{option} does not apply to {given}: {why}")
    if args.mode == "send" and not (args.send and args.to):
        parser.error("--send PATH and --to NAME go together")
    if args.send and not os.path.isfile(args.send):
        parser.error(f"--send {args.send}: not a file")
    if args.count is not None and args.count < 1:
        parser.error("--count must be at least 1")
    if (args.history or 0) < 0 or (args.wait_peers or 0) < 0:
        parser.error("--history and --wait-peers must be 0 or more")
    args.history, args.wait_peers = args.history or 0, 1 if args.wait_peers is None else args.wait_peers
    if args.max_peers is None:
        given = env("RTCHAT_MAX_PEERS") or str(MAX_NEIGHBORS)
        args.max_peers = int(given) if given.isdigit() else -1
    if args.max_peers != 0 and not MIN_PEERS <= args.max_peers <= MAX_PEERS_LIMIT:
        parser.error(f"--max-peers (or RTCHAT_MAX_PEERS) must be 0 (always a full mesh) or {MIN_PEERS} to "
                     f"{MAX_PEERS_LIMIT}")
    args.timeout = 30.0 if args.timeout is None else args.timeout
    return args


async def run_netcheck(args: argparse.Namespace) -> int:
    """--netcheck: the report on stdout (JSON with --json); EX_UNAVAILABLE if no server answered."""
    report = await NetCheck([IceServer.parse(url) for url in (DEFAULT_ICE if args.ice is None else args.ice)],
                            args.ice_host).run()
    lines = [json.dumps(report.to_dict())] if args.json else netcheck_lines(report)
    print("\n".join(lines), flush=True)
    return EX_UNAVAILABLE if report.answers and not any(a.answered for a in report.answers) else 0


def _on_signals(callback: Callable[[], None], sigint: bool) -> list[bool]:
    """SIGTERM and SIGHUP (and SIGINT, but not at the chat's prompt, where Ctrl-C is a key) call back; the list
    returned gets True once one came (the exit code is then 130)."""
    import signal
    came: list[bool] = []

    def interrupt() -> None:
        came.append(True)
        callback()
    for signum in (signal.SIGTERM, signal.SIGHUP) + ((signal.SIGINT,) if sigint else ()):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            asyncio.get_running_loop().add_signal_handler(signum, interrupt)
    return came


async def _unless(work: Awaitable[Any], stop: asyncio.Event) -> Any:
    """What work returns, or None if stop is set first (work is then cancelled)."""
    task = asyncio.ensure_future(work)
    waiter = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task  # its own clean-up (leaving a room, a mesh) runs now, not at shutdown
    return task.result() if not task.cancelled() else None


async def _enter_peerjs(app: App, server: str | None, friends: list[str], timeout: float) -> None:
    """The chat on the PeerJS network: log in, show its last lines, dial each --connect user."""
    place = await app.client.join_peerjs(server)
    app.enter(place)
    app.printer.status(f"-!- on PeerJS as {place.me} at {place.server}; a name marked {UNVERIFIED_MARK} proved "
                       f"nothing (the page has no identities); /connect NAME dials a user")
    for friend in friends:
        await place.connect(friend, timeout)


def _after_close(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    """aiortc's SCTP timers send on a transport that a closed session has shut, in tasks nobody awaits: the
    ConnectionError they end with is expected (in a large room sessions are closed all the time), not news to the
    user. Logged with --debug; anything else is reported as asyncio would."""
    if isinstance(context.get("exception"), ConnectionError):
        log.debug("after a session closed: %s (%s)", context.get("message"), context["exception"])
    else:
        loop.default_exception_handler(context)


async def run(args: argparse.Namespace) -> int:
    asyncio.get_running_loop().set_exception_handler(_after_close)
    if args.mode == "netcheck":
        return await run_netcheck(args)
    state_path = Path(args.state).expanduser() if args.state else default_state_path()
    if args.room:
        check_room_name(args.room)
    name = args.name
    interactive = args.mode == "interactive"
    if not name:
        name = Store(state_path).load().get("name")
        if not name:
            raise UsageError("give your name: python rtchat.py NAME")
    if args.peerjs is not None:  # a name or URL PeerJS cannot take is said before any passphrase prompt
        peerjs_id(name)
        PeerJSServer.parse(args.peerjs or None)
    passphrase = args.passphrase
    if passphrase is None and interactive:
        stored = Store(state_path).load().get("identity")
        if isinstance(stored, dict) and stored.get("encrypted"):
            passphrase = getpass.getpass("passphrase for your rtchat key: ")
    client = Client(name, broker=args.broker, state=state_path, ice=args.ice, ice_hosts=args.ice_host,
                    trust=args.trust, passphrase=passphrase, files=None if args.files == "off" else args.files,
                    relay=not args.no_relay, max_peers=args.max_peers, present=args.mode not in ("pipe", "send"))
    if args.peerjs is not None and not interactive:
        interrupt = asyncio.Event()
        interrupted = _on_signals(interrupt.set, sigint=True)
        code = await _unless(run_peerjs(args, client), interrupt)
        return 130 if interrupted or code is None else code
    style = "chat" if interactive else "json" if args.json else "plain" if args.listen else "quiet"
    screen = ScreenOutput() if interactive else None
    printer = Printer(style, use_color(sys.stdout, args.color), out=screen, err=screen,
                      width=screen.columns if screen else None, bell=interactive and args.bell)
    registry = Registry()
    registry.collect(globals(), "core")
    loaded, skipped = load_plugins(registry, plugin_folders())
    for line in skipped:
        printer.status(line, 31)
    if interactive and (loaded or skipped):
        printer.status(f"{len(loaded)} plugin(s) loaded" + (f", {len(skipped)} skipped" if skipped else ""))
    await client.start(broker=args.peerjs is None)
    app = App(client, registry, printer, secret=args.secret, history_lines=10 if interactive else 0,
              may_send=interactive, remember_rooms=interactive and args.peerjs is None)
    interrupted = _on_signals(app.quit, sigint=not interactive)
    try:
        if args.peerjs is not None:
            await _enter_peerjs(app, args.peerjs or None, args.connect, args.timeout)
        else:
            room = args.room or client.store.data.get("last_room") or DEFAULT_ROOM
            if interactive:
                await app.rejoin(room)
            await app.switch_room(room)
        if interactive:
            code = await run_interactive(app, screen)
        elif args.mode == "listen":
            code = await run_listen(app, args.count, args.history)
        else:
            sender = run_pipe(app, args.wait_peers, args.timeout) if args.mode == "pipe" else \
                run_send(app, args.to, args.send, args.timeout)
            code = await _unless(sender, app.done)
        return 130 if interrupted or code is None else code
    finally:
        await app.close(timeout=0)  # the hooks still running are cancelled: the client is closing
        await client.close()


def main(argv: list[str] | None = None) -> int:
    sys.modules.setdefault("rtchat", sys.modules[__name__])  # plugins' `import rtchat` is this very module
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, stream=sys.stderr,
                        format="%(name)s: %(message)s" if args.debug else "rtchat: %(message)s")
    if not args.debug:
        for noisy in ("aioice", "aiortc", "asyncio"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        require_packages()
        code = asyncio.run(run(args))
    except RtchatError as exc:
        print(f"rtchat: {exc}", file=sys.stderr)
        code = exc.exit_code
    except KeyboardInterrupt:
        code = 130
    return code


def _exit_now(code: int) -> None:
    """Everything is closed and fsynced by now: tearing aiortc, av and cryptography down module by module
    only delays the shell by ~0.15 s, so leave at once."""
    logging.shutdown()
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


def console_main() -> None:
    """The `rtchat` command of an installed copy (pip install .)."""
    _exit_now(main())


if __name__ == "__main__":
    console_main()
