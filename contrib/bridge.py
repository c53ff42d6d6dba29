"""A bridge between an RTChat room and a peerjs-multichat mesh: what is said in one is said in the other, marked
with where it came from ("[via #ops] bob: hi" in the mesh, "[via peerjs] alice: hi" in the room). A bot on the
library, run beside the chat (loaded as a plugin it adds nothing):

    python contrib/bridge.py NAME --room ops --peerjs ws://127.0.0.1:9000/ --connect alice
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys

try:
    import rtchat
except ModuleNotFoundError:  # run as a script from a checkout: rtchat.py is one folder up
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import rtchat

MARK = "[via "  # a line that starts so was carried by a bridge already: carrying it again could loop


class Bridge:
    """One room and one mesh. A marked line is not carried again, so two bridges between the same places make no
    loop; what we say ourselves raises no event on either side, so nothing comes back to its author. In the mesh
    the bridge proves the client's key to other rtchat.py peers, so their chats see it verified."""

    def __init__(self, room: rtchat.Room, mesh: rtchat.PeerJSPlace) -> None:
        self.room, self.mesh = room, mesh
        room.on("message", self.from_room)
        mesh.on("message", self.from_mesh)

    def from_room(self, msg: rtchat.Message) -> None:
        if msg.kind == "message" and not msg.history and not msg.text.startswith(MARK):
            self.mesh.send(fit(f"[via #{self.room.name}] {msg.sender}: {said(msg)}"))

    def from_mesh(self, msg: rtchat.Message) -> None:
        if not msg.text.startswith(MARK):
            self.room.send(fit(f"[via peerjs] {msg.sender}: {said(msg)}"))

    def close(self) -> None:
        self.room.off("message", self.from_room)
        self.mesh.off("message", self.from_mesh)


def said(msg: rtchat.Message) -> str:
    return f"* {msg.text}" if msg.action else msg.text


def fit(text: str) -> str:
    return text if len(text) <= rtchat.MAX_TEXT_CHARS else text[:rtchat.MAX_TEXT_CHARS - 1] + "…"


async def open_mesh(client: rtchat.Client, server: str | None, friends: list[str]) -> rtchat.PeerJSPlace:
    """The client logged in on the PeerServer (with its key and pins) and connected to each friend (the meshes
    merge through them); the client leaves it when it closes."""
    place = await client.join_peerjs(server)
    for friend in friends:
        await place.connect(friend)
    return place


# -- as a daemon -----------------------------------------------------------------------------------------------

async def run(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    async with rtchat.Client(args.name, broker=args.broker, state=args.state) as client:
        room = await client.join(args.room, secret=args.secret)
        carrying = Bridge(room, await open_mesh(client, args.peerjs, args.connect))
        print(f"bridging #{room.name} and the PeerJS mesh as {args.name}", file=sys.stderr, flush=True)
        await stop.wait()
        carrying.close()
        await room.flush(5)
    return 130  # as rtchat.py: stopped by a signal


def main(argv: list[str] | None = None) -> int:
    env = os.environ.get
    parser = argparse.ArgumentParser(prog="bridge.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("name", help="the bridge's name, in the room and in the mesh")
    parser.add_argument("--room", default=env("RTCHAT_ROOM", "chat"), help="the RTChat room (default: chat)")
    parser.add_argument("--broker", default=env("RTCHAT_BROKER"), help="MQTT broker URL (as rtchat.py)")
    parser.add_argument("--secret", default=env("RTCHAT_SECRET"), help="the room's secret, if it is sealed")
    parser.add_argument("--state", default=env("RTCHAT_STATE"), help="the bridge's state file (key, pins, "
                        "history; default: $RTCHAT_STATE, else ~/.rtchat-bridge-NAME.json, apart from yours)")
    parser.add_argument("--peerjs", default=env("RTCHAT_PEERJS"), metavar="URL",
                        help="the PeerServer (default: the page's own)")
    parser.add_argument("--connect", action="append", default=[], metavar="NAME",
                        help="a user of the mesh to connect to (repeatable)")
    args = parser.parse_args(argv)
    args.state = args.state or os.path.expanduser(f"~/.rtchat-bridge-{args.name}.json")
    try:
        return asyncio.run(run(args))
    except rtchat.RtchatError as exc:
        print(f"bridge: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
