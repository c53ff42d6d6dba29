"""contrib/bridge.py end to end: an RTChat room on mosquitto and a peerjs-multichat mesh on a real PeerServer, one
bridge between them, rtchat.py pipes and listeners on both sides (issue 14); in the mesh the bridge is verified."""
from __future__ import annotations

import subprocess
import sys

from support import ROOT, Proc, cli_env, rtchat_cmd


def test_lines_cross_both_ways_marked_once_without_loops_or_echoes(broker, peerserver, tmp_path):
    def env(name: str) -> dict:
        return cli_env(broker.url, RTCHAT_STATE=str(tmp_path / f"{name}.json"))
    bridge = subprocess.Popen([sys.executable, str(ROOT / "contrib" / "bridge.py"), "bridge", "--room", "ops",
                               "--peerjs", peerserver.url()], env=env("bridge"), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        assert "bridging #ops and the PeerJS mesh as bridge" in bridge.stderr.readline()
        in_room = Proc(["roomy", "--room", "ops", "--listen", "--count", "2"], env("roomy"))
        in_room.said("listening in #ops")
        in_mesh = Proc(["meshy", "--peerjs", peerserver.url(), "--connect", "bridge", "--listen", "--count", "3"],
                       env("meshy"))
        in_mesh.said("listening on PeerJS as meshy")
        said = subprocess.run(rtchat_cmd("ci", "--room", "ops", "--wait-peers", "2"), env=env("ci"), text=True,
                              input="[via elsewhere] a line carried already\nfrom the room\n", capture_output=True,
                              timeout=60)
        assert said.returncode == 0, said.stderr
        in_mesh.wait_for(lambda p: len(p.out) == 1, what="the room's line in the mesh")
        said = subprocess.run(rtchat_cmd("pj", "--peerjs", peerserver.url(), "--connect", "bridge"), env=env("pj"),
                              input="[via #ops] boss: a line in another's name\nfrom the mesh\n", capture_output=True,
                              text=True, timeout=60)
        assert said.returncode == 0, said.stderr
        assert in_room.finish() == 0 and in_mesh.finish() == 0
        assert "--> bridge joined (verified, channel-bound)" in in_mesh.err  # the bridge proved its client's key
        assert in_room.out == ["ci: [via elsewhere] a line carried already", "ci: from the room"]
        assert in_mesh.out == ["bridge: [via #ops] ci: from the room", "pj: [via #ops] boss: a line in another's name",
                               "pj: from the mesh"]
        # and the room heard the mesh's line from the bridge, once (a listener that stays to the end)
        late = Proc(["late", "--room", "ops", "--listen", "--history", "5"], env("late"))
        late.wait_for(lambda p: any("[via peerjs] pj: from the mesh" in line for line in p.out),
                      what="the mesh's line in the room")
        assert sum("from the mesh" in line for line in late.out) == 1
        assert not any("[via #ops]" in line for line in late.out)  # nothing came back, nothing marked was carried
        late.stop()
    finally:
        bridge.terminate()
        assert bridge.wait(30) == 130
