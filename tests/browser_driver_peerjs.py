#!/usr/bin/env python3
"""Remote control for real peerjs-multichat pages, used by test_peerjs_browser.py.

Run with a Python that has Playwright (the harness venv), never with the project's Python:

    MULTICHAT_SRC=... PJS_NODE_MODULES=... $RTCHAT_HARNESS_PYTHON browser_driver_peerjs.py --harness DIR

It imports the shared harness (multichat_harness.py: the page, unmodified and read at run time, in headless
Chromium against a local PeerServer; nothing of the page lives here), says {"event": "driver_ready", "port": N}
(the PeerServer's port), then reads one JSON command per line on stdin:

    {"id": 1, "cmd": "open", "user": "amy"}               opens a tab and logs in as amy
    {"id": 2, "cmd": "connect", "user": "amy", "target": "bob"}
    {"id": 3, "cmd": "say", "user": "amy", "text": "hi"}
    {"id": 4, "cmd": "state", "user": "amy"}              -> the page's state, and the chat box lines
    {"id": 5, "cmd": "close", "user": "amy"}              closes the tab
    {"id": 6, "cmd": "quit"}

and answers {"reply": id, "ok": true, "result": ...} or {"reply": id, "ok": false, "error": "..."}. Every
harness event is written as it happens: {"event": ..., "user": ..., "t": epoch ms, ...}.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import traceback


def write(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def serve(harness_module) -> None:
    users: dict = {}
    async with harness_module.Harness(log_data=True) as harness:
        write({"event": "driver_ready", "port": harness.peerserver.port, "versions": harness.versions()})
        reader = asyncio.StreamReader()
        await asyncio.get_running_loop().connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := await reader.readline():
            command = json.loads(line)
            try:
                result = await run(command, harness, users)
                write({"reply": command.get("id"), "ok": True, "result": result})
            except Exception as exc:
                write({"reply": command.get("id"), "ok": False, "error": f"{type(exc).__name__}: {exc}",
                       "trace": traceback.format_exc()})
            if command.get("cmd") == "quit":
                break


async def run(command: dict, harness, users: dict):
    cmd, name = command["cmd"], command.get("user")
    if cmd == "open":
        user = await harness.open_user(name)
        user.on_event(write)
        for event in user.events:
            write(event)
        users[name] = user
        event = await user.login()
        if event.get("event") != "screen":
            raise RuntimeError(f"{name} could not log in: {event}")
        return None
    if cmd == "connect":
        return await users[name].connect(command["target"])
    if cmd == "say":
        return await users[name].say(command["text"])
    if cmd == "state":
        return dict(await users[name].state(), lines=await users[name].chatbox_lines())
    if cmd == "close":
        users[name]._push({"event": "tab_closed"})
        return await users.pop(name).close()
    if cmd == "quit":
        return None
    raise ValueError(f"unknown command {cmd!r}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--harness", required=True, help="the folder of multichat_harness.py")
    args = parser.parse_args()
    sys.path.insert(0, args.harness)
    import multichat_harness
    asyncio.run(serve(multichat_harness))


if __name__ == "__main__":
    main()
