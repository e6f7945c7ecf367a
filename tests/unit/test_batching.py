"""The batched engines' queue (engines.batching): full batches under a closed loop, requests
cancelled while they wait left unrun, a failed batch failing its own requests only, and
``instances`` batches at once."""

from __future__ import annotations

import asyncio
import threading
import time

from core.errors import InvalidField
from core.protocol import MediaPayload, RequestContext
from engines.batching import BatchedEngine
from tests.support import model

CTX = RequestContext(request_id="r", model_id="m")


class Recorder(BatchedEngine):
    """Runs a batch by recording its items' data, taking ``run_s`` (or until ``gate`` opens)."""

    def __init__(self, m, run_s: float = 0.0) -> None:
        super().__init__(m)
        self.run_s, self.ran, self.gate = run_s, [], threading.Event()
        self.gate.set()
        self.lock, self.now, self.most = threading.Lock(), 0, 0  # batches running, at most

    def _run(self, items):
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
        try:
            return super()._run(items)
        finally:
            with self.lock:
                self.now -= 1

    def load(self) -> None:
        pass

    def run_batch(self, items):
        self.gate.wait(10)
        time.sleep(self.run_s)
        data = [p.data for p, _ in items]
        self.ran.append(data)
        if "boom" in data:
            raise RuntimeError("the model failed")
        return [InvalidField("bad item", field="input") if d == "bad" else d * 2 for d in data]


def engine(run_s: float = 0.0, size: int = 4, wait_s: float = 0.05, instances: int = 1) -> Recorder:
    return Recorder(model("m", engine_kwargs={"max_batch_size": size, "batch_wait_timeout_s": wait_s,
                                              "instances": instances}), run_s)


async def one(e: Recorder, data):
    return [r.output async for r in e.infer(MediaPayload(data=data, info={}), e.Params(), CTX)][0]


def test_a_closed_loop_of_more_than_twice_the_batch_size_runs_full_batches():
    """Ten clients, each sending its next request when the last is answered, over batches of
    four: six wait while a batch runs, and the next batch takes the oldest four of them (never a
    batch of the two left over, formed while the model was busy, as ``@serve.batch`` did)."""
    e = engine(run_s=0.02)

    async def client(i: int) -> list:
        return [await one(e, i * 100 + k) for k in range(6)]

    async def run():
        return await asyncio.gather(*(client(i) for i in range(10)))

    answers = asyncio.run(run())
    assert answers == [[(i * 100 + k) * 2 for k in range(6)] for i in range(10)]
    sizes = [len(b) for b in e.ran]
    assert sizes == [4] * 15, sizes
    assert e.most == 1 and e.stats() == {"batches": 15, "items": 60, "mean_batch_size": 4.0}


def test_instances_run_that_many_batches_at_once_and_no_more():
    """Two instances over batches of two: while both hold a batch, the requests after them wait
    in the queue, and each answer goes to its own request."""
    e = engine(size=2, wait_s=0, instances=2)

    async def run():
        e.gate.clear()  # every batch holds its instance until the gate opens
        tasks = [asyncio.create_task(one(e, i)) for i in range(7)]
        while e.now < 2:  # both instances took a batch
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # time enough for a third batch to start, were one allowed to
        held = (e.now, len(e._queue))
        e.gate.set()
        return held, await asyncio.gather(*tasks)

    (running, queued), answers = asyncio.run(run())
    assert (running, queued) == (2, 3)
    assert answers == [i * 2 for i in range(7)]
    assert e.most == 2 and sorted(len(b) for b in e.ran) == [1, 2, 2, 2]


def test_a_request_cancelled_while_it_waits_is_not_run():
    e = engine(size=1, wait_s=0)

    async def run():
        e.gate.clear()  # the first batch holds the model
        first = asyncio.create_task(one(e, 1))
        await asyncio.sleep(0.05)
        second, third = asyncio.create_task(one(e, 2)), asyncio.create_task(one(e, 3))
        await asyncio.sleep(0.05)
        second.cancel()  # its client went away, or its deadline passed
        e.gate.set()
        return await first, await third, await asyncio.gather(second, return_exceptions=True)

    first, third, (second,) = asyncio.run(run())
    assert (first, third) == (2, 6) and isinstance(second, asyncio.CancelledError)
    assert e.ran == [[1], [3]]


def test_a_failed_batch_fails_its_own_requests_and_the_next_batch_runs():
    e = engine(size=2, wait_s=0.05)

    async def run():
        failed = await asyncio.gather(one(e, "boom"), one(e, "x"), return_exceptions=True)
        return failed, await asyncio.gather(one(e, "bad"), one(e, "y"), return_exceptions=True)

    failed, after = asyncio.run(run())
    assert [type(f) for f in failed] == [RuntimeError, RuntimeError]
    assert isinstance(after[0], InvalidField) and after[1] == "yy"  # an item's own error is its alone
    assert e.ran == [["boom", "x"], ["bad", "y"]]
