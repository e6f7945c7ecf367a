"""The load generator: one closed loop (a fixed concurrency) and one open loop (Poisson
arrivals at a rate), over any ``call(i) -> Sample``; :func:`run_load` drives HTTP with them.

Used by every benchmark (``benchmarks/``), ``apps.bench`` sweeps and the tests. Latency is
measured per request from send to full response; throughput counts the requests that ended in
the measured window (after the warm-up, for the run's duration) over its length. With
``stream=True`` (text pipelines) each request is read as Server-Sent Events and also yields time
to first token and time per output token, defined as LLM serving benchmarks define them.
``python -m apps.loadgen --url ... --body '{...}' -c 32 -d 10``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Awaitable, Callable


@dataclass
class LoadResult:
    """What one load run measured. The token fields are set for streamed runs only:
    TTFT from send to the first event with output, TPOT = (latency - TTFT) / (tokens - 1)
    over requests of more than one token, output tokens from each stream's last ``usage``."""

    requests: int
    duration_s: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    statuses: dict[str, int] = field(default_factory=dict)
    errors: int = 0
    output_tokens: int | None = None
    output_tok_s: float | None = None
    ttft_p50_ms: float | None = None
    ttft_p90_ms: float | None = None
    ttft_p99_ms: float | None = None
    tpot_p50_ms: float | None = None
    tpot_p90_ms: float | None = None
    tpot_p99_ms: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation; nan for no values."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


@dataclass
class Sample:
    """One request: its status ("200", "503", an exception's name, "stream_error"), its
    latency, and for streams the time to its first token and its output tokens."""

    status: str
    latency_s: float
    ttft_s: float | None = None
    tokens: int = 0


def body_factory(body: dict) -> Callable[[int], bytes]:
    """Encoded request ``i``: ``body`` with ``{n}`` in any string replaced by ``i`` (distinct
    prompts keep a server's prefix cache from answering them), or the same bytes every time."""
    raw = json.dumps(body)
    if "{n}" not in raw:
        encoded = raw.encode()
        return lambda i: encoded
    return lambda i: raw.replace("{n}", str(i)).encode()


async def read_events(response, t0: float) -> tuple[float | None, int, str | None]:
    """Read mmserve's SSE stream to its end: (ttft_s, output tokens from the last ``usage``,
    the error message of an error event or None)."""
    ttft, tokens, error = None, 0, None
    async for raw in response.content:
        line = raw.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        event = json.loads(line[6:])
        if "error" in event:
            error = event["error"].get("message", "error")
            continue
        if ttft is None and event.get("output"):
            ttft = time.perf_counter() - t0
        tokens = (event.get("usage") or {}).get("completion_tokens", tokens)
    return ttft, tokens, error


async def send(session, url: str, body: bytes, stream: bool) -> Sample:
    """POST one request and read the whole answer; never raises (a refused or reset
    connection is a result, not a crash)."""
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    try:
        async with session.post(url, data=body, headers={"content-type": "application/json"}) as r:
            status = str(r.status)
            if stream and r.status == 200:
                ttft, tokens, error = await read_events(r, t0)
                if error is not None:
                    status = "stream_error"
            else:
                await r.read()
    except Exception as err:
        status = type(err).__name__
    return Sample(status, time.perf_counter() - t0, ttft, tokens)


def summarize(samples: list[Sample], elapsed: float, stream: bool) -> LoadResult:
    """Figures of the measured samples over ``elapsed`` seconds."""
    n = len(samples)
    ms = [s.latency_s * 1000 for s in samples]
    statuses = Counter(s.status for s in samples)
    res = LoadResult(requests=n, duration_s=round(elapsed, 3), rps=n / elapsed if elapsed > 0 else 0.0,
                     p50_ms=percentile(ms, 50), p90_ms=percentile(ms, 90), p99_ms=percentile(ms, 99),
                     mean_ms=sum(ms) / n if n else float("nan"), statuses=dict(statuses),
                     errors=n - statuses.get("200", 0))
    if stream:
        ok = [s for s in samples if s.status == "200"]
        ttfts = [s.ttft_s * 1000 for s in ok if s.ttft_s is not None]
        tpots = [(s.latency_s - s.ttft_s) * 1000 / (s.tokens - 1) for s in ok if s.ttft_s is not None and s.tokens > 1]
        res.output_tokens = sum(s.tokens for s in ok)
        res.output_tok_s = res.output_tokens / elapsed if elapsed > 0 else 0.0
        res.ttft_p50_ms, res.ttft_p90_ms, res.ttft_p99_ms = (percentile(ttfts, q) for q in (50, 90, 99))
        res.tpot_p50_ms, res.tpot_p90_ms, res.tpot_p99_ms = (percentile(tpots, q) for q in (50, 90, 99))
    return res


# --- the two loops -------------------------------------------------------------------------
# Both drive ``call(i) -> Sample`` for request numbers i = 0, 1, 2...: an HTTP request
# (:func:`send`, what :func:`run_load` uses) or anything else measured the same way (an engine
# driven in-process, for comparison). A call that raises is a sample whose status is the
# exception's name. A request is measured when it ends within the window, which runs from
# ``warmup_s`` after the start for ``duration_s`` (for a number of requests alone, until the last
# answer); requests still in flight when it closes are awaited, not counted. Counting requests
# by their start instead would leave out the answers that the warm-up's requests take of the
# window, a latency's worth (40% of the throughput when a request takes 14 s of a 20 s window).

Call = Callable[[int], Awaitable[Sample]]


async def _sample(call: Call, i: int) -> Sample:
    t0 = time.perf_counter()
    try:
        return await call(i)
    except Exception as err:  # a result of the run, not a crash of it
        return Sample(type(err).__name__, time.perf_counter() - t0)


async def closed_loop(call: Call, *, concurrency: int, duration_s: float | None = None,
                      requests: int | None = None, warmup_s: float = 0.0,
                      samples: list[Sample] | None = None) -> tuple[list[Sample], float]:
    """``concurrency`` workers, each starting its next request as soon as its last one ended,
    until ``warmup_s + duration_s`` have passed or ``requests`` have started (whichever comes
    first; one of them is required). Returns the measured samples (appended to ``samples``
    as they end, for a progress display) and the measured window in seconds."""
    if duration_s is None and requests is None:
        raise ValueError("closed_loop needs duration_s or requests")
    samples = [] if samples is None else samples
    start = time.perf_counter()
    measure_from = start + warmup_s
    end = measure_from + duration_s if duration_s is not None else math.inf
    numbers = itertools.count()

    async def worker():
        while time.perf_counter() < end:
            i = next(numbers)
            if requests is not None and i >= requests:
                return
            sample = await _sample(call, i)
            if measure_from <= time.perf_counter() <= end:
                samples.append(sample)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return samples, min(time.perf_counter(), end) - measure_from


async def open_loop(call: Call, *, rate: float, concurrency: int, duration_s: float,
                    warmup_s: float = 0.0, seed: int = 0,
                    samples: list[Sample] | None = None) -> tuple[list[Sample], float]:
    """Requests start at Poisson arrivals of ``rate`` per second (seeded by ``seed``) for
    ``warmup_s + duration_s``, at most ``concurrency`` in flight (an arrival beyond that
    waits for a free slot). Returns what :func:`closed_loop` returns."""
    samples = [] if samples is None else samples
    rng = random.Random(seed)
    slots = asyncio.Semaphore(concurrency)
    start = time.perf_counter()
    measure_from = start + warmup_s
    end = measure_from + duration_s

    async def arrive(i: int):
        async with slots:
            sample = await _sample(call, i)
        if measure_from <= time.perf_counter() <= end:
            samples.append(sample)

    tasks = []
    t = start
    for i in itertools.count():
        t += rng.expovariate(rate)
        if t >= end:
            break
        delay = t - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)  # the Poisson schedule, not a readiness wait
        tasks.append(asyncio.create_task(arrive(i)))
    await asyncio.gather(*tasks)
    return samples, duration_s


# --- HTTP ----------------------------------------------------------------------------------

async def _show_progress(samples: list[Sample], start: float, total_s: float, done: asyncio.Event) -> None:
    """A Rich progress bar over the run's time, with the requests and errors measured so far."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("load"), BarColumn(), TextColumn("{task.fields[info]}"), TimeRemainingColumn())
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task("load", total=total_s, info="warming up")
        while not done.is_set():
            errors = sum(s.status != "200" for s in samples)
            bar.update(task, completed=min(time.perf_counter() - start, total_s),
                       info=f"{len(samples)} requests, {errors} errors" if samples else "warming up")
            try:
                await asyncio.wait_for(done.wait(), 0.25)
            except asyncio.TimeoutError:
                pass


async def run_load(url: str, body: dict | Callable[[int], dict], *, concurrency: int = 32,
                   duration_s: float | None = 10.0, warmup_s: float = 2.0, requests: int | None = None,
                   rate: float | None = None, seed: int = 0, stream: bool = False,
                   timeout_s: float = 300.0, progress: bool = False) -> LoadResult:
    """Drive ``url`` with POSTs of ``body``: a dict (see :func:`body_factory` for ``{n}``), or
    ``body(i)``, the body of request ``i``.

    Closed loop (``rate`` None, :func:`closed_loop`): ``concurrency`` in flight, for
    ``duration_s`` after ``warmup_s`` and/or ``requests`` requests. Open loop
    (:func:`open_loop`): Poisson arrivals of ``rate`` per second, at most ``concurrency`` in
    flight. ``stream`` adds ``"stream": true`` and the token figures; ``progress`` shows a bar.
    """
    import aiohttp

    if callable(body):
        make = body
        encode = (lambda i: json.dumps({**make(i), "stream": True}).encode()) if stream \
            else (lambda i: json.dumps(make(i)).encode())
    else:
        encode = body_factory({**body, "stream": True} if stream else body)
    samples: list[Sample] = []
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
        def call(i: int) -> Awaitable[Sample]:
            return send(session, url, encode(i), stream)

        done = asyncio.Event()
        shown = None
        if progress and duration_s is not None:
            shown = asyncio.create_task(_show_progress(samples, time.perf_counter(), warmup_s + duration_s, done))
        try:
            if rate is None:
                _, elapsed = await closed_loop(call, concurrency=concurrency, duration_s=duration_s,
                                               requests=requests, warmup_s=warmup_s, samples=samples)
            else:
                if duration_s is None:
                    raise ValueError("the open loop needs duration_s")
                _, elapsed = await open_loop(call, rate=rate, concurrency=concurrency, duration_s=duration_s,
                                             warmup_s=warmup_s, seed=seed, samples=samples)
        finally:
            done.set()
            if shown is not None:
                await shown
    return summarize(samples, elapsed, stream)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--url", default="http://127.0.0.1:8000/v1/infer")
    ap.add_argument("--body", default='{"model_id": "echo", "input": "hello"}')
    ap.add_argument("-c", "--concurrency", type=int, default=32)
    ap.add_argument("-d", "--duration", type=float, default=10.0)
    ap.add_argument("-w", "--warmup", type=float, default=2.0)
    ap.add_argument("--rate", type=float, default=None, help="open loop: requests per second")
    ap.add_argument("--stream", action="store_true", help="stream (text): adds TTFT, TPOT, tokens/s")
    args = ap.parse_args()
    res = asyncio.run(run_load(args.url, json.loads(args.body), concurrency=args.concurrency,
                               duration_s=args.duration, warmup_s=args.warmup, rate=args.rate,
                               stream=args.stream, progress=True))
    print(json.dumps(res.as_dict(), indent=2))


if __name__ == "__main__":
    main()
