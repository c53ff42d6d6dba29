"""contrib/bridge.py between two real browser chats (issue 14): a line from the RTChat page (test_browser_interop.py's
harness, on mosquitto over websockets) reaches the peerjs-multichat page (test_peerjs_browser.py's harness, on its
PeerServer) through the bridge, and a line from that page comes back the other way; neither returns to its author.

Opt-in like both harnesses: skipped, with the reason printed, without the pages' sources, Chromium or Playwright.
Prints `RESULT {json}` with the bridge's start until each page has it, and a line's latency each way (from the
driver's command on the RTChat side, from the click on the peerjs side); run with -s to see them.
"""
from __future__ import annotations

import asyncio
import contextlib
import sys
import time

import pytest
import test_browser_interop as rtchat_page
import test_peerjs_browser as peerjs_page
from conftest import run
from support import ROOT, cli_env

ROOM = "ops"


@pytest.fixture(scope="module")
def both_pages():
    for page, missing in (("RTChat", rtchat_page.missing_prerequisite),
                          ("peerjs-multichat", peerjs_page.missing_prerequisite)):
        reason = missing()
        if reason:
            print(f"bridge between the two pages skipped: {page} page: {reason}")
            pytest.skip(f"{page} page: {reason}")


def test_the_bridge_carries_a_line_from_an_rtchat_page_to_a_peerjs_page_and_back(both_pages, broker, tmp_path):
    async def scenario():
        async with peerjs_page.Pages(tmp_path) as pages:
            rtchat_pages = await rtchat_page.Browsers(tmp_path, broker).start()
            bridge = None
            try:
                await pages.call("open", user="amy")
                await rtchat_pages.start_peer("Carl", ROOM)
                launched = peerjs_page.now_ms()
                bridge = await asyncio.create_subprocess_exec(
                    sys.executable, str(ROOT / "contrib" / "bridge.py"), "relay", "--room", ROOM, "--peerjs",
                    pages.server, "--connect", "amy", env=cli_env(broker.url, RTCHAT_STATE=str(tmp_path / "r.json")),
                    stderr=asyncio.subprocess.PIPE)
                assert b"bridging #ops" in await asyncio.wait_for(bridge.stderr.readline(), 60)
                listed = await pages.lists("amy", "relay")
                validated = await rtchat_pages.validated("Carl", "relay")   # it sends only to peers it validated

                called_at = peerjs_page.now_ms()
                sent = await rtchat_pages.call("send", key="Carl", text="from the RTChat page \u00e9")
                assert sent == ["relay"]
                shown = await pages.shows("amy", "relay", "[via #ops] Carl: from the RTChat page \u00e9")

                await pages.call("say", user="amy", text="from the peerjs page")
                clicked = (await pages.wait(lambda e: e.get("event") == "click_send"))["t"]
                back = await rtchat_pages.got("Carl", "chat", "[via peerjs] amy: from the peerjs page")
                assert back["from"] == "relay" and back["text"] == "[via peerjs] amy: from the peerjs page"

                # nothing returns to its author: one more line each way, after which both pages are checked
                await rtchat_pages.call("send", key="Carl", text="last from RTChat")
                await pages.shows("amy", "relay", "[via #ops] Carl: last from RTChat")
                await pages.call("say", user="amy", text="last from peerjs")
                await rtchat_pages.got("Carl", "chat", "[via peerjs] amy: last from peerjs")
                state = await pages.call("state", user="amy")
                assert not any("[via peerjs]" in line for line in state["lines"]), state["lines"]
                assert [line for line in state["lines"] if line.startswith("relay: ")] == \
                    ["relay: [via #ops] Carl: from the RTChat page \u00e9", "relay: [via #ops] Carl: last from RTChat"]
                at_carl = [e["text"] for e in rtchat_pages.find("Carl", "chat")]
                assert at_carl == ["[via peerjs] amy: from the peerjs page", "[via peerjs] amy: last from peerjs"]
                pages.assert_no_errors()
                peerjs_page.result("bridge_rtchat_page_to_peerjs_page", bridge_start_to_peerjs_listed_ms=listed["t"] -
                                   launched, bridge_start_to_rtchat_validated_ms=validated["ts"] * 1000 - launched,
                                   rtchat_to_peerjs_ms=shown["t"] - called_at,
                                   peerjs_to_rtchat_ms=back["ts"] * 1000 - clicked)
            finally:
                if bridge is not None:
                    with contextlib.suppress(ProcessLookupError):
                        bridge.terminate()
                    assert await bridge.wait() == 130
                await rtchat_pages.close()
    started = time.monotonic()
    run(scenario(), 240)
    print(f"bridge between the two pages: {time.monotonic() - started:.1f} s")
