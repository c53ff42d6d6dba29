#!/usr/bin/env python3
"""Remote control for real RTChat browser peers, used by test_browser_interop.py.

Run with a Python that has Playwright (the harness venv), never with the project's Python:

    RTCHAT_SRC=... RTCHAT_NODE_MODULES=... /tmp/harness-venv/bin/python browser_driver_interop.py \
        --harness ../shared/interop

It imports the shared harness (browser_peer.py, which runs RTChat's own shipped JavaScript in headless
Chromium; no RTChat code lives here) and then reads one JSON command per line on stdin:

    {"id": 1, "cmd": "start", "key": "b1", "name": "zed", "room": "r", "broker": "ws://127.0.0.1:9001",
     "mdns": false, "storage": {...localStorage to preset...}}
    {"id": 2, "cmd": "ready", "key": "b1"}                      -> peers a chat would reach
    {"id": 3, "cmd": "send", "key": "b1", "text": "hi", "to": null}
    {"id": 4, "cmd": "dm", "key": "b1", "to": "amy", "text": "psst"}
    {"id": 5, "cmd": "ask", "key": "b1", "to": "amy", "topic": "time", "content": 1, "timeout": 8}
    {"id": 6, "cmd": "add_question", "key": "b1", "topic": "echo"}
    {"id": 7, "cmd": "storage", "key": "b1"}                    -> the page's localStorage
    {"id": 8, "cmd": "reload", "key": "b1"} / {"cmd": "close", "key": "b1"}
    {"id": 9, "cmd": "call", "key": "b1", "to": "amy"}         -> starts an audio call (callUser)
    {"id": 10, "cmd": "info", "key": "b1"} / {"cmd": "quit"}

and answers {"reply": id, "ok": true, "result": ...} or {"reply": id, "ok": false, "error": "..."}.
Every harness event is also written as {"event": ..., "key": ...} (same fields as browser_peer.py's CLI).
Loopback only: the harness serves RTChat from 127.0.0.1, aborts every other request, strips ICE servers.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import traceback

QUIET = {"dc_created", "dc_send", "init", "page_module_loaded", "mqtt_unhandled", "cdn_served_locally"}

# Preset localStorage once per tab (sessionStorage survives a reload, so a reload keeps what RTChat wrote).
STORAGE_SCRIPT = r"""
(() => {
  const S = __STORAGE__;
  if (location.protocol !== 'http:') return;
  try {
    if (sessionStorage.getItem('__interop_preset')) return;
    for (const [k, v] of Object.entries(S)) localStorage.setItem(k, v);
    sessionStorage.setItem('__interop_preset', '1');
  } catch (e) {}
})();
"""


# What Chrome does for an ordinary page (no camera/mic permission): host candidates carry a random
# "<uuid>.local" name instead of the address.  A real --mdns-candidates Chrome gathers no candidate
# at all in a namespace that has only lo (no default-route address), so this emulates it on the wire:
# RTChat publishes the renamed candidate; the browser's own ICE still uses and checks its real address.
FAKE_MDNS_SCRIPT = r"""
(() => {
  const P = window.RTCPeerConnection && window.RTCPeerConnection.prototype;
  if (!P) return;
  const desc = Object.getOwnPropertyDescriptor(P, 'onicecandidate');
  const names = {};
  const rename = (line) => line.replace(/^(candidate:\S+ \d+ \S+ \d+ )(\S+)( \d+ typ host)/, (m, a, addr, b) => {
    if (addr.endsWith('.local')) return m;
    names[addr] = names[addr] || (crypto.randomUUID() + '.local');
    return a + names[addr] + b;
  });
  Object.defineProperty(P, 'onicecandidate', {
    configurable: true,
    get() { return desc.get.call(this); },
    set(fn) {
      desc.set.call(this, fn ? function (ev) {
        const c = ev && ev.candidate;
        if (!c || !c.candidate) return fn.call(this, ev);
        const fake = {candidate: rename(c.candidate), sdpMid: c.sdpMid, sdpMLineIndex: c.sdpMLineIndex,
                      usernameFragment: c.usernameFragment};
        if (window.__harnessEmit) window.__harnessEmit('published_candidate', {candidate: fake.candidate});
        return fn.call(this, {candidate: fake, target: ev.target, type: ev.type});
      } : fn);
    },
  });
})();
"""


def out(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
    sys.stdout.flush()


class Driver:
    def __init__(self, bp) -> None:
        self.bp = bp
        self.harnesses: dict[bool, object] = {}
        self.peers: dict[str, object] = {}

    async def harness(self, mdns: bool):
        if mdns not in self.harnesses:
            h = self.bp.Harness(mdns_candidates=mdns)
            await h.start()
            self.harnesses[mdns] = h
        return self.harnesses[mdns]

    def peer(self, key: str):
        p = self.peers.get(key)
        if p is None:
            raise KeyError(f"no browser peer {key!r}")
        return p

    async def cmd_start(self, c: dict):
        h = await self.harness(bool(c.get("mdns")))
        key = c.get("key") or c["name"]
        storage = c.get("storage")
        verbose = bool(c.get("verbose"))

        def on_event(ev: dict, key=key):
            if ev.get("event") in QUIET:
                return
            if not verbose and ev.get("event") in ("dc_recv", "rtcmessage") and ev.get("channel", ev.get("label")) \
                    not in ("question", "answer", "streamoffer", "endcall", "connectedViaRTC"):
                return
            out(dict(ev, key=key))

        orig = h.browser.new_context

        async def new_context(**kw):
            ctx = await orig(**kw)
            if storage:
                await ctx.add_init_script(STORAGE_SCRIPT.replace("__STORAGE__", json.dumps(storage)))
            if c.get("fake_mdns"):
                await ctx.add_init_script(FAKE_MDNS_SCRIPT)
            return ctx
        h.browser.new_context = new_context
        try:
            peer = await h.start_peer(c["name"], c["room"], c["broker"], auto_accept=c.get("auto_accept", "dialog"),
                                      log_candidates=True, log_datachannels=verbose, on_event=on_event)
        finally:
            h.browser.new_context = orig
        self.peers[key] = peer
        return {"name": peer.name, "topic": peer.topic, "t_start": peer.t_start}

    async def cmd_ready(self, c):
        return await self.peer(c["key"]).peers()

    async def cmd_info(self, c):
        return await self.peer(c["key"]).info()

    async def cmd_send(self, c):
        return await self.peer(c["key"]).send(c["text"], c.get("to"))

    async def cmd_dm(self, c):
        p = self.peer(c["key"])
        await p.page.evaluate("([t, to]) => window.__client.sendRTCDM(t, to)", [c["text"], c["to"]])
        return True

    async def cmd_ask(self, c):
        p = self.peer(c["key"])
        return await p.page.evaluate(
            """([to, topic, content, ms]) => Promise.race([
                 window.__client.sendRTCQuestion(topic, content, to).then(a => ({answer: a})),
                 new Promise(r => setTimeout(() => r({timeout: true}), ms))])""",
            [c["to"], c["topic"], c.get("content"), int(float(c.get("timeout", 8)) * 1000)])

    async def cmd_add_question(self, c):
        p = self.peer(c["key"])
        await p.page.evaluate(
            """(topic) => window.__client.addQuestionHandler(topic, (content, sender) => {
                 window.__harnessEmit('question_handled', {topic: topic, content: content, from: sender});
                 return {echo: content, from: sender, by: window.__client.name};
               })""", c["topic"])
        return True

    async def cmd_storage(self, c):
        p = self.peer(c["key"])
        return await p.page.evaluate("() => Object.fromEntries(Object.entries(localStorage))")

    async def cmd_reload(self, c):
        p = self.peer(c["key"])
        p._push({"event": "reloading"})
        await p.page.reload(wait_until="load")
        return True

    async def cmd_close(self, c):
        await self.peer(c["key"]).close()
        return True

    async def cmd_call(self, c):
        p = self.peer(c["key"])
        return await p.page.evaluate(
            """(to) => {
                 const c = window.__client;
                 if (!c.__interopCallHooks) {
                   c.__interopCallHooks = true;
                   c.on('callended', (u) => window.__harnessEmit('callended', {peer: u}));
                 }
                 const r = c.callUser(to, {audio: true, video: false});
                 r.start.then(() => window.__harnessEmit('call_started', {peer: to}),
                              (e) => window.__harnessEmit('call_start_failed', {peer: to, error: String(e)}));
                 r.end.then(() => window.__harnessEmit('call_end_resolved', {peer: to}),
                            (e) => window.__harnessEmit('call_end_rejected', {peer: to, error: String(e)}));
                 return true;
               }""", c["to"])

    async def cmd_eval(self, c):
        return await self.peer(c["key"]).page.evaluate(c["js"], c.get("arg"))

    async def close(self):
        for h in self.harnesses.values():
            try:
                await asyncio.wait_for(h.close(), 20)
            except Exception:
                pass


async def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--harness", required=True, help="folder holding browser_peer.py")
    args = ap.parse_args()
    sys.path.insert(0, args.harness)
    import browser_peer  # noqa: E402

    driver = Driver(browser_peer)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    out({"event": "driver_ready", "ts": time.time()})
    tasks = set()

    async def run(c: dict):
        try:
            result = await getattr(driver, "cmd_" + c["cmd"])(c)
            out({"reply": c.get("id"), "ok": True, "result": result})
        except Exception as exc:
            out({"reply": c.get("id"), "ok": False, "error": f"{type(exc).__name__}: {exc}",
                 "trace": traceback.format_exc(limit=3)})

    try:
        while True:
            line = await reader.readline()
            if not line:
                break
            try:
                c = json.loads(line)
            except ValueError:
                continue
            if c.get("cmd") == "quit":
                out({"reply": c.get("id"), "ok": True, "result": True})
                break
            if c.get("cmd") == "start":
                await run(c)  # serially: start patches browser.new_context for its own context
            else:
                t = asyncio.ensure_future(run(c))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
    finally:
        await driver.close()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
