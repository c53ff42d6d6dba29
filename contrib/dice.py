"""Dice for tabletop rooms: /roll 2d6 tells the room; /ask NAME d20 rolls on the other side."""
import random

from rtchat import UsageError, command, question


def roll_dice(spec: str) -> tuple[list[int], int]:
    count, _, sides = spec.lower().partition("d")
    count = count or "1"
    if not (count.isdigit() and sides.isdigit() and 1 <= int(count) <= 100 and 2 <= int(sides) <= 1000):
        raise UsageError("give dice as NdS, e.g. /roll 2d6 (1-100 dice, 2-1000 sides)")
    rolls = [random.randint(1, int(sides)) for _ in range(int(count))]
    return rolls, sum(rolls)


@command("roll", help="roll dice and tell the room", usage="/roll NdS", example="/roll 2d6")
async def roll(ctx, args):
    """Roll N dice with S sides; the room sees each die and the total."""
    rolls, total = roll_dice(args.strip() or "1d6")
    ctx.state["rolled"] = ctx.state.get("rolled", 0) + 1
    await ctx.say(f"rolled {args.strip() or '1d6'}: {' + '.join(map(str, rolls))} = {total}", action=True)


@question("d20")
def d20(ctx, q):
    return roll_dice("1d20")[1]
