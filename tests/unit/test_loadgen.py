"""The load generator against a stub HTTP server whose timings are known (no Ray)."""

from __future__ import annotations

import asyncio
import json

import pytest

from apps.loadgen import Sample, body_factory, closed_loop, open_loop, percentile, run_load, summarize
from apps.serving import free_port

DELAY_S = 0.05        # every answer
FIRST_TOKEN_S = 0.05  # streamed: the first token after this, then one token every TOKEN_S
TOKEN_S = 0.01
TOKENS = 6


async def _stub_server(port: int, seen: list):
    """/ok answers after DELAY_S; /busy answers 503; /stream sends TOKENS tokens in mmserve's
    SSE shape (cumulative usage in each event)."""
    from aiohttp import web

    async def ok(request):
        seen.append(await request.json())
        await asyncio.sleep(DELAY_S)
        return web.json_response({"output": "x"})

    async def busy(request):
        return web.json_response({"error": {"type": "overloaded"}}, status=503)

    async def stream(request):
        seen.append(await request.json())
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        await asyncio.sleep(FIRST_TOKEN_S)
        for n in range(1, TOKENS + 1):
            if n > 1:
                await asyncio.sleep(TOKEN_S)
            event = {"output": "t", "usage": {"completion_tokens": n}}
            await resp.write(b"data: " + json.dumps(event).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        return resp

    app = web.Application()
    app.add_routes([web.post("/ok", ok), web.post("/busy", busy), web.post("/stream", stream)])
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


def drive(path: str, body=None, **kw):
    """Start the stub, run the load of ``body`` (default: numbered) at ``path``, stop the stub;
    returns (LoadResult, bodies)."""
    port = free_port()
    seen: list = []

    async def go():
        runner = await _stub_server(port, seen)
        try:
            return await run_load(f"http://127.0.0.1:{port}{path}", body or {"input": "{n} hi"}, **kw)
        finally:
            await runner.cleanup()

    return asyncio.run(go()), seen


def test_closed_loop_latency_and_throughput_match_the_server():
    res, seen = drive("/ok", concurrency=4, duration_s=1.0, warmup_s=0.2)
    assert res.errors == 0 and res.statuses == {"200": res.requests}
    assert DELAY_S * 1000 <= res.p50_ms < DELAY_S * 1000 + 40
    expected_rps = 4 / DELAY_S
    assert 0.6 * expected_rps < res.rps <= 1.05 * expected_rps
    assert res.output_tokens is None and res.ttft_p50_ms is None  # not streamed
    # '{n}' numbers every request, warm-up included
    assert len({b["input"] for b in seen}) == len(seen) > res.requests


def test_errors_are_counted_by_status():
    res, _ = drive("/busy", concurrency=2, duration_s=0.3, warmup_s=0)
    assert res.requests > 0 and res.errors == res.requests and set(res.statuses) == {"503"}


def test_refused_connections_are_a_status_not_a_crash():
    port = free_port()  # nothing listens there
    res = asyncio.run(run_load(f"http://127.0.0.1:{port}/", {}, concurrency=1, duration_s=0.2, warmup_s=0))
    assert res.errors == res.requests > 0 and set(res.statuses) == {"ClientConnectorError"}


def test_streamed_ttft_and_tpot_as_vllm_bench_defines_them():
    res, seen = drive("/stream", concurrency=2, duration_s=1.0, warmup_s=0.1, stream=True)
    assert all(b["stream"] is True for b in seen)
    assert res.errors == 0 and res.output_tokens == TOKENS * res.requests
    # TTFT: send → first token; TPOT: (latency - TTFT) / (tokens - 1)
    assert FIRST_TOKEN_S * 1000 <= res.ttft_p50_ms < FIRST_TOKEN_S * 1000 + 40
    assert TOKEN_S * 1000 <= res.tpot_p50_ms < TOKEN_S * 1000 + 10
    assert res.output_tok_s == pytest.approx(res.output_tokens / res.duration_s, rel=0.01)


def test_open_loop_follows_the_rate():
    res, _ = drive("/ok", concurrency=32, duration_s=2.0, warmup_s=0, rate=50, seed=1)
    assert 70 <= res.requests <= 130  # Poisson(100)
    assert res.errors == 0


def test_a_closed_loop_of_n_requests_over_any_call_counts_what_raises():
    started, in_flight, most = [], 0, 0

    async def call(i):
        nonlocal in_flight, most
        started.append(i)
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(0.01)
        in_flight -= 1
        if i % 5 == 4:
            raise RuntimeError("engine failed")
        return Sample("200", 0.01, ttft_s=0.005, tokens=3)

    samples, elapsed = asyncio.run(closed_loop(call, concurrency=3, requests=20))
    assert sorted(started) == list(range(20)) and most == 3
    res = summarize(samples, elapsed, stream=True)
    assert res.requests == 20 and res.statuses == {"200": 16, "RuntimeError": 4} and res.errors == 4
    assert res.output_tokens == 48 and res.ttft_p50_ms == pytest.approx(5)
    with pytest.raises(ValueError):
        asyncio.run(closed_loop(call, concurrency=1))


def test_a_closed_loop_counts_the_answers_of_its_window_whatever_their_start():
    # 4 slots of 0.3 s requests: 13.3 answers a second. With a 0.2 s warm-up, the warm-up's
    # requests end at 0.3 s, inside the window (0.2-0.8 s): counting requests by their start
    # would give 8 answers over 0.7 s (11.4 a second), left out the first 0.1 s of the window.
    async def call(i):
        await asyncio.sleep(0.3)
        return Sample("200", 0.3)

    samples, elapsed = asyncio.run(closed_loop(call, concurrency=4, duration_s=0.6, warmup_s=0.2))
    assert elapsed == pytest.approx(0.6, abs=0.01)  # the window, not the last answer
    assert len(samples) == 8  # those ending at 0.3 s and at 0.6 s; not those at 0.9 s
    assert summarize(samples, elapsed, stream=False).rps == pytest.approx(4 / 0.3, rel=0.05)


def test_the_open_loop_caps_what_is_in_flight():
    in_flight, most = 0, 0

    async def call(i):
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(0.2)
        in_flight -= 1
        return Sample("200", 0.2)

    samples, _ = asyncio.run(open_loop(call, rate=200, concurrency=4, duration_s=0.5, seed=0))
    assert most == 4 and len(samples) > 4


def test_bodies_can_be_built_per_request_number():
    res, seen = drive("/ok", lambda i: {"prompt": f"p{i}"}, concurrency=2, duration_s=None,
                      warmup_s=0, requests=6)
    assert res.requests == 6 and res.errors == 0
    assert sorted(b["prompt"] for b in seen) == [f"p{i}" for i in range(6)]


def test_body_factory_and_percentile():
    assert body_factory({"a": "x"})(3) == b'{"a": "x"}'
    assert json.loads(body_factory({"p": "{n} go", "q": ["{n}"]})(7)) == {"p": "7 go", "q": ["7"]}
    assert percentile([1, 2, 3, 4], 50) == 2.5 and percentile([5], 99) == 5
