"""An async HTTP load generator: closed loop at a fixed concurrency, or open loop at a rate.

Used by the benchmarks and by ``apps.bench`` sweeps. Latency is measured per request from
send to full response; throughput counts completed requests over the measured window
(warm-up excluded). ``python -m apps.loadgen --url ... --body '{...}' -c 32 -d 10``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field


@dataclass
class LoadResult:
    """What one load run measured."""

    requests: int
    duration_s: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    statuses: dict[str, int] = field(default_factory=dict)

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


async def _one(session, url: str, body: bytes, latencies: list, statuses: Counter, record: bool):
    t0 = time.perf_counter()
    try:
        async with session.post(url, data=body, headers={"content-type": "application/json"}) as r:
            await r.read()
            status = str(r.status)
    except Exception as err:  # a refused or reset connection is a result, not a crash
        status = type(err).__name__
    if record:
        latencies.append((time.perf_counter() - t0) * 1000)
        statuses[status] += 1


async def run_load(url: str, body: dict, *, concurrency: int = 32, duration_s: float = 10.0,
                   warmup_s: float = 2.0, rate: float | None = None, seed: int = 0) -> LoadResult:
    """Drive ``url`` with POSTs of ``body``.

    Closed loop (``rate`` None): ``concurrency`` workers each send the next request as soon as
    the last one finished. Open loop: requests start at Poisson arrivals of ``rate`` per second,
    at most ``concurrency`` in flight. Runs ``warmup_s`` unmeasured, then ``duration_s``.
    """
    import aiohttp

    raw = json.dumps(body).encode()
    latencies: list[float] = []
    statuses: Counter = Counter()
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.perf_counter()
        measure_from = start + warmup_s
        end = measure_from + duration_s

        if rate is None:
            async def worker():
                while (now := time.perf_counter()) < end:
                    await _one(session, url, raw, latencies, statuses, now >= measure_from)

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        else:
            rng = random.Random(seed)
            sem = asyncio.Semaphore(concurrency)
            tasks = []

            async def fire(record: bool):
                async with sem:
                    await _one(session, url, raw, latencies, statuses, record)

            t = start
            while t < end:
                t += rng.expovariate(rate)
                delay = t - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)  # the Poisson schedule, not a readiness wait
                tasks.append(asyncio.create_task(fire(t >= measure_from)))
            await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - measure_from
    n = len(latencies)
    return LoadResult(requests=n, duration_s=round(elapsed, 3), rps=n / elapsed if elapsed > 0 else 0.0,
                      p50_ms=percentile(latencies, 50), p90_ms=percentile(latencies, 90),
                      p99_ms=percentile(latencies, 99),
                      mean_ms=sum(latencies) / n if n else float("nan"), statuses=dict(statuses))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--url", default="http://127.0.0.1:8000/v1/infer")
    ap.add_argument("--body", default='{"model_id": "echo", "input": "hello"}')
    ap.add_argument("-c", "--concurrency", type=int, default=32)
    ap.add_argument("-d", "--duration", type=float, default=10.0)
    ap.add_argument("-w", "--warmup", type=float, default=2.0)
    ap.add_argument("--rate", type=float, default=None, help="open loop: requests per second")
    args = ap.parse_args()
    res = asyncio.run(run_load(args.url, json.loads(args.body), concurrency=args.concurrency,
                               duration_s=args.duration, warmup_s=args.warmup, rate=args.rate))
    print(json.dumps(res.as_dict(), indent=2))


if __name__ == "__main__":
    main()


@dataclass
class TextLoadResult:
    """Token-level figures of a text load run, defined as ``vllm bench serve`` defines them:
    TTFT from send to the first token, TPOT = (latency - TTFT) / (output tokens - 1)."""

    concurrency: int
    requests: int
    duration_s: float
    output_tokens: int
    output_tok_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    tpot_p50_ms: float
    errors: int

    def as_dict(self) -> dict:
        return asdict(self)


async def closed_loop_text(call, n_requests: int, concurrency: int) -> TextLoadResult:
    """Run ``call(i) -> (ttft_s, latency_s, output_tokens)`` ``n_requests`` times, at most
    ``concurrency`` at once (closed loop). A call that raises counts as an error."""
    ttfts, tpots, tokens, errors = [], [], 0, 0
    next_i = 0

    async def worker():
        nonlocal next_i, tokens, errors
        while next_i < n_requests:
            i, next_i = next_i, next_i + 1
            try:
                ttft, latency, n = await call(i)
            except Exception:
                errors += 1
                continue
            ttfts.append(ttft * 1000)
            tokens += n
            if n > 1:
                tpots.append((latency - ttft) * 1000 / (n - 1))

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    return TextLoadResult(concurrency=concurrency, requests=n_requests - errors, duration_s=round(elapsed, 3),
                          output_tokens=tokens, output_tok_s=tokens / elapsed,
                          ttft_p50_ms=percentile(ttfts, 50), ttft_p99_ms=percentile(ttfts, 99),
                          tpot_p50_ms=percentile(tpots, 50), errors=errors)


async def stream_infer(session, url: str, body: dict) -> tuple[float, float, int]:
    """POST a ``stream: true`` request; returns (ttft_s, latency_s, output tokens) read from
    the SSE events (the last event's ``usage.completion_tokens``)."""
    t0 = time.perf_counter()
    ttft = None
    tokens = 0
    async with session.post(url, json={**body, "stream": True}) as r:
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {await r.text()}")
        async for raw in r.content:
            line = raw.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            if ttft is None and event.get("output"):
                ttft = time.perf_counter() - t0
            tokens = (event.get("usage") or {}).get("completion_tokens", tokens)
    latency = time.perf_counter() - t0
    return (ttft if ttft is not None else latency), latency, tokens
