"""contrib/bridge.py between two real browser chats (issue 14): a line from the RTChat page (test_browser_interop.py's
harness, on mosquitto over websockets) reaches the peerjs-multichat page (test_peerjs_browser.py's harness, on its
PeerServer) through the bridge, and a line from that page comes back the other way; neither returns to its author.

Opt-in like both harnesses: skipped, with the reason printed, without the pages' sources, Chromium or Playwright.
Prints `RESULT {json}` with the bridge's start until each page has it, and a line's latency each way (from the
driver's command on the RTChat side, from the click on the peerjs side) beside the same page to page on each network;
run with -s to see them.
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


async def click(pages, user: str, text: str) -> float:
    """user types text on the peerjs page and clicks Send: when the click was (epoch ms)."""
    before = peerjs_page.now_ms()
    await pages.call("say", user=user, text=text)
    return (await pages.wait(lambda e: e.get("event") == "click_send" and e.get("user") == user and
                             e["t"] >= before))["t"]


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

                clicked = await click(pages, "amy", "from the peerjs page")
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

                # beside the same line page to page on each network, measured the same way
                await pages.call("open", user="bo")
                await pages.call("connect", user="bo", target="amy")
                await pages.lists("amy", "bo")
                clicked_too = await click(pages, "amy", "page to page")
                beside = await pages.shows("bo", "amy", "page to page")
                await rtchat_pages.start_peer("Dora", ROOM)
                await rtchat_pages.validated("Carl", "Dora")
                await rtchat_pages.validated("Dora", "Carl")
                called_too = peerjs_page.now_ms()
                assert sorted(await rtchat_pages.call("send", key="Carl", text="room to room")) == ["Dora", "relay"]
                got = await rtchat_pages.got("Dora", "chat", "room to room")
                pages.assert_no_errors()
                peerjs_page.result("bridge_rtchat_page_to_peerjs_page", bridge_start_to_peerjs_listed_ms=listed["t"] -
                                   launched, bridge_start_to_rtchat_validated_ms=validated["ts"] * 1000 - launched,
                                   rtchat_to_peerjs_ms=shown["t"] - called_at,
                                   peerjs_to_rtchat_ms=back["ts"] * 1000 - clicked,
                                   rtchat_page_to_page_ms=got["ts"] * 1000 - called_too,
                                   peerjs_page_to_page_ms=beside["t"] - clicked_too)
            finally:
                if bridge is not None:
                    with contextlib.suppress(ProcessLookupError):
                        bridge.terminate()
                    assert await bridge.wait() == 130
                await rtchat_pages.close()
    started = time.monotonic()
    run(scenario(), 240)
    print(f"bridge between the two pages: {time.monotonic() - started:.1f} s")
