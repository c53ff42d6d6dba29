"""Dice for tabletop rooms: /roll 2d6 tells the room; /ask NAME d20 rolls on the other side, and so does a line
in the room addressed to you ("alice: roll 2d6")."""
import random

from rtchat import UsageError, command, on, question


def roll_dice(spec: str) -> tuple[list[int], int]:
    count, _, sides = spec.lower().partition("d")
    count = count or "1"
    if not (count.isdigit() and sides.isdigit() and 1 <= int(count) <= 100 and 2 <= int(sides) <= 1000):
        raise UsageError("give dice as NdS, e.g. /roll 2d6 (1-100 dice, 2-1000 sides)")
    rolls = [random.randint(1, int(sides)) for _ in range(int(count))]
    return rolls, sum(rolls)


async def _roll_for_room(ctx, spec: str) -> None:
    rolls, total = roll_dice(spec)
    await ctx.say(f"rolled {spec}: {' + '.join(map(str, rolls))} = {total}", action=True)
    ctx.state["rolled"] = ctx.state.get("rolled", 0) + 1


@command("roll", help="roll dice and tell the room", usage="/roll NdS", example="/roll 2d6")
async def roll(ctx, args):
    """Roll N dice with S sides; the room sees each die and the total."""
    await _roll_for_room(ctx, args.strip() or "1d6")


@on("message")
async def roll_when_asked(ctx, msg):
    """'alice: roll 2d6' in the room: alice rolls. Only for news: a request said before we came (passed on as
    history, the "history" event) was answered then, and is not answered again."""
    request = msg.text.strip()
    prefix = f"{ctx.me}: roll"
    if request.lower().startswith(prefix.lower()) and msg.kind == "message":
        try:
            await _roll_for_room(ctx, request[len(prefix):].strip() or "1d6")
        except UsageError:
            pass  # not dice after all (someone talking to us), or a listener, which sends nothing


@question("d20")
def d20(ctx, q):
    return roll_dice("1d20")[1]
