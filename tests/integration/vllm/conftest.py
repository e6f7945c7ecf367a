"""The vLLM set: every vLLM model kind the tests need, served once for the whole package.

One Ray, one Serve application, four vLLM engines started side by side (and echo, which serves
while they start): the generated tiny Llama
(``placement: remote_core``, its AsyncLLM in the ingress), the real all-MiniLM-L6-v2 embedding
model, the generated tiny Whisper and tiny Qwen2-VL (each engine in a deployment of its own).
Started one after the other, per module, they cost a Ray and a vLLM start-up each; side by side
their imports and loads overlap on the 2 cores. Each module checks its own model, and the models
listing and metrics by model id, so that the others being there changes nothing it asserts.

Whisper and Qwen2-VL are served as a user's own model is, in one override of the kind's model
file (``model=speech_to_text model.speech_to_text.source=<directory>``, ``model=vlm ...``) with
the generated checkpoints' directories as their sources: their model ids come from the
directories' names, and the few settings the tests rely on (a short answer for random weights,
a fixed seed, two images per prompt, a 1024-token context) are set beside it.
"""

from __future__ import annotations

import pytest

from apps.serving import free_port

def overrides() -> list[str]:
    """The set's Hydra overrides (the generated checkpoints made if missing)."""
    from engines.checkpoints import resolve_source

    whisper, qwen2_vl = resolve_source("generated:tiny-whisper"), resolve_source("generated:tiny-qwen2-vl")
    return [
        # echo beside them: it serves while they start (test_first_minute.py)
        "model=[echo,tiny_llama,all_minilm_l6_v2,speech_to_text,vlm]",
        "pipeline=[echo,text,embedding,speech,vlm]",
        # a user's own models, from their directories (model ids: tiny-whisper, tiny-qwen2-vl)
        f"model.speech_to_text.source={whisper}", f"model.vlm.source={qwen2_vl}",
        # what the tests rely on: random weights seldom end a window by themselves
        "+model.speech_to_text.params.max_completion_tokens=32", "+model.vlm.params.max_tokens=32",
        "+model.speech_to_text.engine_kwargs.seed=0", "+model.vlm.engine_kwargs.seed=0",
        "+model.vlm.engine_kwargs.max_model_len=1024",
        "+model.vlm.engine_kwargs.limit_mm_per_prompt={image: 2, video: 1}",
        # a vLLM server option whose effect test_text.py checks
        "+model.tiny_llama.engine_kwargs.enable_prompt_tokens_details=true",
        # adapters loaded at run time (test_lora.py)
        "server.allow_runtime_lora_updating=true",
        # a small max_pixels, so that a "too large" image is cheap to make (test_vlm.py)
        "pipeline.vlm.preprocess.kwargs.max_pixels=1000000",
        # without torch.compile, as vLLM's own CPU CI runs: compiling the four models' graphs
        # with the inductor at every start took 65 s of CPU of the set's 480 (start 256-266 s
        # against 337 s, docs/testing.md); the compiled path is what `make run` and the
        # benchmarks serve
        *(f"+model.{key}.engine_kwargs.enforce_eager=true"
          for key in ("tiny_llama", "all_minilm_l6_v2", "speech_to_text", "vlm"))]


#: what the start of the set showed a client (tests/integration/vllm/test_first_minute.py):
#: seconds from the start of serving to ``/health`` answering, echo serving, each model ready;
#: and the answer to a request for the tiny Llama while it was starting
STARTUP: dict = {}


class Probe:
    """A client asking, every 0.2 s while the set starts, for ``/health``, an echo and (once it
    has answered) the tiny Llama; and the launcher's progress (``served(progress=...)``)."""

    def __init__(self, url: str) -> None:
        import threading
        import time

        self.url, self.began, self.done = url, time.monotonic(), threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def seen(self, what: str) -> None:
        import time

        STARTUP.setdefault(what, round(time.monotonic() - self.began, 1))

    def progress(self, states: dict) -> None:
        for model_id, s in states.items():
            if s["state"] != "starting":
                self.seen(f"{model_id} {s['state']}")

    def _run(self) -> None:
        import httpx

        with httpx.Client(base_url=self.url, timeout=2) as http:
            while not self.done.wait(0.2):
                try:
                    if http.get("/health").status_code == 200:
                        self.seen("/health")
                    r = http.post("/v1/infer", json={"model_id": "echo", "input": "up?"})
                    if r.status_code == 200 and r.json()["output"] == "up?":
                        self.seen("echo served")
                    if "/health" in STARTUP and "tiny-llama starting" not in STARTUP:
                        r = http.post("/v1/infer", json={"model_id": "tiny-llama", "input": "hi"})
                        STARTUP["tiny-llama starting"] = {"status": r.status_code, "headers": dict(r.headers),
                                                          "body": r.json()}
                except httpx.HTTPError:
                    pass


@pytest.fixture(scope="package")
def otlp():
    """A real OTLP/HTTP receiver that every process of the set sends its spans to
    (``server.tracing_endpoint``; test_tracing.py reads them)."""
    from tests.support import OTLPReceiver

    with OTLPReceiver() as receiver:
        yield receiver


@pytest.fixture(scope="package")
def serve_app(otlp):
    """The vLLM set, served as the launcher serves it, on a local Ray of 2 CPUs, watched by a
    :class:`Probe` while it starts, tracing to ``otlp``; its base URL."""
    from apps.config import compose
    from apps.serving import served
    from tests.support import NO_INGRESS_DRAIN

    cfg = compose([*overrides(), f"server.port={free_port()}", NO_INGRESS_DRAIN,
                   f"server.tracing_endpoint={otlp.url}",
                   "++server.serve_env.OTEL_BSP_SCHEDULE_DELAY=500"])  # spans sent within 0.5 s, not 5
    probe = Probe(f"http://127.0.0.1:{cfg.server.port}")
    try:
        with served(cfg, num_cpus=2, logging_level="ERROR", log_to_driver=False, progress=probe.progress) as server:
            probe.done.set()
            yield server.url
    finally:
        probe.done.set()


@pytest.fixture(scope="package")
def http(serve_app):
    import httpx

    with httpx.Client(base_url=serve_app, timeout=120) as c:
        yield c


@pytest.fixture(scope="package")
def client(serve_app):
    from openai import OpenAI

    return OpenAI(base_url=f"{serve_app}/v1", api_key="-", max_retries=0, timeout=120)
