"""asyncio glue: awaiting a transfer or a notification without blocking the event loop (a
library thread waits, with the GIL released, and wakes the loop)."""

import asyncio


async def wait_transfer(transfer):
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def wake():
        if not done.done():
            done.set_result(None)

    transfer._on_done(lambda: loop.call_soon_threadsafe(wake))
    await done
    transfer.wait(0)  # raises what it ended with


async def next_notification(agent, peer=None, tag=None, prefix=None):
    """The next notification (by sender, tag or tag prefix), awaited."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(
        None, lambda: agent.next_notification(None, peer, tag, prefix)
    )
