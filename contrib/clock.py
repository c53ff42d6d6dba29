"""Answers other peers' questions: /ask NAME time, /ask NAME ping, /ask NAME uptime; adds /uptime."""
import time

from rtchat import command, question

STARTED = time.monotonic()


def _uptime() -> str:
    seconds = int(time.monotonic() - STARTED)
    return f"{seconds // 3600}h {seconds % 3600 // 60}m {seconds % 60}s"


@question("time")
def answer_time(ctx, q):
    """The local time here, with its zone."""
    return time.strftime("%Y-%m-%d %H:%M:%S %Z")


@question("ping")
def answer_ping(ctx, q):
    return "pong"


@question("uptime")
def answer_uptime(ctx, q):
    return _uptime()


@command("uptime", help="how long this rtchat has been running", usage="/uptime", example="/uptime")
async def uptime(ctx, args):
    ctx.echo(f"up {_uptime()}")
