"""Tasks: background work with an owner that cancels and awaits it."""
import asyncio
import logging

from conftest import run

import rtchat


def test_close_cancels_and_awaits_tasks_and_timers():
    async def main():
        tasks, ended, fired = rtchat.Tasks(), [], []

        async def forever():
            try:
                await asyncio.Event().wait()
            finally:
                ended.append("forever")
        task = tasks.spawn(forever(), "forever")
        tasks.later(3600, fired.append, "late")
        soon = asyncio.Event()
        tasks.later(0, soon.set)
        await soon.wait()  # a timer that fired is forgotten, one still pending is cancelled by close
        await tasks.close()
        assert task.cancelled() and ended == ["forever"] and fired == []
        assert not tasks._tasks and not tasks._timers
    run(main())


def test_a_failed_task_is_logged_and_forgotten(caplog):
    async def main():
        tasks = rtchat.Tasks()

        async def broken():
            raise ValueError("boom")
        task = tasks.spawn(broken(), "broken")
        await asyncio.gather(task, return_exceptions=True)
        await asyncio.sleep(0)  # done callbacks run on the next turn of the loop
        assert not tasks._tasks
    with caplog.at_level(logging.ERROR, logger="rtchat"):
        run(main())
    assert any("task broken failed" in r.getMessage() for r in caplog.records)
