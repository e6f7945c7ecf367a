"""mmserve's Prometheus metrics: what each process records, and how one scrape sees them all.

Every process of an application records into ``prometheus_client``'s registry of its own
process: the ingress replicas (requests, latencies, streams), each engine and node replica
(batches, time per output token) and, where an engine's backend records metrics of its own
(``<backend>:<name>``), those, in the process that runs the engine. Each process serves that registry on a free port
of its node (:func:`expose`) and lists itself, with the labels that tell it apart
(``deployment``, ``replica``, and ``model_id`` for a model's own replicas), in the
application's :class:`Directory`, a named Ray actor. ``GET /metrics`` on the ingress reads every
listed process and answers with their merge (:func:`merge`), so one scrape of the served port
covers every replica on every node.

Why not Ray's own metrics (``ray.util.metrics``, exported by each node's metrics agent): Ray
renames every metric (a ``ray_`` prefix, no ``:``), so a backend's own ``<backend>:`` names
and the Grafana dashboards built on them would not survive, and the agent needs Ray's dashboard processes,
which mmserve leaves off on small machines.

Labels are set by the code, never copied from a request: ``model_id`` is a served model's id
or empty (a request naming no served model), ``route`` a route's path template or ``other``.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import Counter as Tally
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import Metric

logger = logging.getLogger("mmserve.metrics")

#: whether this process records; each replica sets it from ``server.metrics`` when it starts
ENABLED = False

disable_created_metrics()  # the *_created series double every counter and histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   120.0, 300.0, 600.0)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                0.75, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

REQUESTS = Counter("mmserve_requests", "HTTP requests answered, by status code and error type "
                   "(error: empty on success; a stream that failed after it started has code 200 "
                   "and the error of its last event)", ["model_id", "route", "code", "error"])
DURATION = Histogram("mmserve_request_duration_seconds", "Time from a request's arrival to its "
                     "response's last byte", ["model_id", "route"], buckets=LATENCY_BUCKETS)
TTFT = Histogram("mmserve_time_to_first_token_seconds", "Streamed responses: time from the "
                 "request's arrival to its first event", ["model_id", "route"], buckets=TTFT_BUCKETS)
TPOT = Histogram("mmserve_time_per_output_token_seconds", "Streamed text: time between the first "
                 "and last output token, per token after the first", ["model_id"], buckets=TPOT_BUCKETS)
IN_FLIGHT = Gauge("mmserve_requests_in_flight", "Requests of a served model being answered",
                  ["model_id", "route"])
QUEUED = Gauge("mmserve_requests_queued", "Calls waiting for a replica of a model's step (or, "
               "inline, for a slot of its engine)", ["model_id"])
DISCONNECTS = Counter("mmserve_client_disconnects", "Clients that went away before their response "
                      "ended", ["model_id", "route"])
NODE_DURATION = Histogram("mmserve_node_duration_seconds", "Time a request spent in each step of "
                          "its model's pipeline, wherever it runs (remote calls included)",
                          ["model_id", "node"], buckets=LATENCY_BUCKETS)
BATCH_SIZE = Histogram("mmserve_batch_size", "Requests per batch of a batched engine",
                       ["model_id"], buckets=BATCH_BUCKETS)
BATCH_WAIT = Histogram("mmserve_batch_wait_seconds", "Time a request waited for its batch to run",
                       ["model_id"], buckets=LATENCY_BUCKETS)

#: the values of ``mmserve_model_status``'s ``status`` label (``pipelines.runner.Pipeline.status``)
STATUSES = ("ready", "starting", "failed", "recovering", "unavailable", "unhealthy")


_series: dict[tuple, Any] = {}


def series(metric, *values: str):
    """``metric.labels(*values)``, looked up once per label set: label values are bounded
    (served ids, route templates, the error vocabulary), so this cache is too, and the hot
    path skips prometheus_client's locked lookup."""
    key = (metric, values)
    child = _series.get(key)
    if child is None:
        child = _series[key] = metric.labels(*values)
    return child


def configure(enabled: bool) -> None:
    """Turn recording in this process on or off."""
    global ENABLED
    ENABLED = enabled


@contextmanager
def timed(histogram) -> Iterator[None]:
    """Observe the time the block takes into ``histogram`` (a labelled child)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        histogram.observe(time.perf_counter() - start)


@contextmanager
def queued(model_id: str) -> Iterator[None]:
    """Count the block as one call waiting for a replica (or a slot) of ``model_id``."""
    if not ENABLED:
        yield
        return
    gauge = series(QUEUED, model_id)
    gauge.inc()
    try:
        yield
    finally:
        gauge.dec()


class TokenTimer:
    """Time per output token of one streamed text request: fed each output's new tokens."""

    __slots__ = ("first", "last", "tokens")

    def __init__(self) -> None:
        self.first = self.last = 0.0
        self.tokens = 0

    def add(self, new_tokens: int) -> None:
        if new_tokens <= 0:
            return
        now = time.perf_counter()
        if not self.tokens:
            self.first = now
        self.last = now
        self.tokens += new_tokens

    def observe(self, model_id: str) -> None:
        if ENABLED and self.tokens > 1 and self.last > self.first:
            series(TPOT, model_id).observe((self.last - self.first) / (self.tokens - 1))


# --- one scrape over every process ----------------------------------------------------------

DIRECTORY_NAME = "mmserve-metrics"
DIRECTORY_NAMESPACE = "mmserve"


class Directory:
    """Which processes of each application serve metrics, and how often each deployment's
    replicas started (``mmserve_replica_starts_total``). A named Ray actor, one per Ray
    cluster (:func:`directory`); the scrape drops a process that no longer answers."""

    def __init__(self) -> None:
        self.apps: dict[str, dict[str, tuple[str, dict[str, str]]]] = {}
        self.starts: Tally = Tally()

    def register(self, app: str, key: str, url: str, labels: dict[str, str]) -> None:
        listed = self.apps.setdefault(app, {})
        if key not in listed:
            self.starts[(app, labels.get("model_id", ""), labels["deployment"])] += 1
        listed[key] = (url, labels)

    @staticmethod
    def _of(app: str, name: str) -> bool:
        """Whether the application ``name`` is ``app`` or hosts a step of its models
        (``<app>.<model_id>.<step>``, see ``pipelines.deployments.step_app_name``)."""
        return name == app or name.startswith(f"{app}.")

    def unregister(self, app: str, key: str) -> None:
        for name, listed in self.apps.items():
            if self._of(app, name):
                listed.pop(key, None)

    def listing(self, app: str) -> tuple[list[tuple[str, str, dict[str, str]]], list[tuple[str, str, int]]]:
        """The processes of ``app`` and of its models' step applications, and their starts."""
        procs = [(key, url, labels) for name, listed in self.apps.items() if self._of(app, name)
                 for key, (url, labels) in listed.items()]
        starts = [(m, d, n) for (a, m, d), n in self.starts.items() if self._of(app, a)]
        return procs, starts


def directory(create: bool = True):
    """The cluster's :class:`Directory` actor, started by whichever process asks first
    (``create=False``: only an existing one; raises ValueError if there is none)."""
    import ray

    if not create:
        return ray.get_actor(DIRECTORY_NAME, namespace=DIRECTORY_NAMESPACE)
    return ray.remote(num_cpus=0, max_restarts=-1)(Directory).options(
        name=DIRECTORY_NAME, namespace=DIRECTORY_NAMESPACE, lifetime="detached",
        get_if_exists=True).remote()


class Exposed:
    """This replica's registry, served on a free port of its node and listed in the directory."""

    def __init__(self, app: str, key: str, url: str, server) -> None:
        self.app, self.key, self.url, self.server = app, key, url, server

    def close(self) -> None:
        try:
            directory(create=False).unregister.remote(self.app, self.key)
        except Exception as err:  # Ray going down: the scrape drops this process anyway
            logger.debug("metrics: unregister %s: %s", self.key, err)
        self.server.shutdown()
        self.server.server_close()


async def expose(model_id: str | None = None) -> Exposed:
    """Serve this Serve replica's metrics and list it in its application's directory, labelled
    with its deployment, replica id and (for a model's own replicas) ``model_id``."""
    import ray
    from prometheus_client import start_http_server
    from ray import serve

    ctx = serve.get_replica_context()
    host = ray.util.get_node_ip_address()
    server, _thread = start_http_server(0, addr=host)
    url = f"http://{host}:{server.server_port}/metrics"
    key = ctx.replica_id.unique_id
    labels = {"deployment": ctx.deployment, "replica": key}
    if model_id is not None:
        labels["model_id"] = model_id
    await directory().register.remote(ctx.app_name, key, url, labels)
    return Exposed(ctx.app_name, key, url, server)


def merge(sources: Iterable[tuple[dict[str, str], Iterable[Metric]]]) -> list[Metric]:
    """One list of metric families from several processes': each process's samples get its
    labels (a label the sample has itself wins: the ingress's own ``model_id``)."""
    families: dict[str, Metric] = {}
    for labels, metrics in sources:
        for family in metrics:
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type,
                                                        family.unit)
            for s in family.samples:
                merged.add_sample(s.name, _with_model_id({**labels, **s.labels}), s.value, s.timestamp,
                                  s.exemplar)
    return list(families.values())


def _with_model_id(labels: dict[str, str]) -> dict[str, str]:
    """A backend's own samples may name their model (``model_name``, its model_id); from a process that
    serves several models (the ingress, with ``placement: remote_core``) that becomes its
    ``model_id`` too."""
    if "model_id" not in labels and "model_name" in labels:
        return {**labels, "model_id": labels["model_name"]}
    return labels


def parse(text: str) -> list[Metric]:
    from prometheus_client.parser import text_string_to_metric_families

    return list(text_string_to_metric_families(text))


def local_families() -> list[Metric]:
    """This process's metrics."""
    return list(REGISTRY.collect())


def family(name: str, documentation: str, rows: Iterable[tuple[dict[str, str], float]],
           typ: str = "gauge") -> Metric:
    """A gauge (or counter) family of ``(labels, value)`` rows made at scrape time."""
    made = Metric(name, documentation, typ)
    sample = f"{name}_total" if typ == "counter" else name
    for labels, value in rows:
        made.add_sample(sample, labels, value)
    return made


def status_family(statuses: dict[str, str]) -> Metric:
    """``mmserve_model_status``: 1 for each model's current status, 0 for the others."""
    rows = []
    for model_id, status in statuses.items():
        current = status.split(":", 1)[0]
        rows += [({"model_id": model_id, "status": s}, float(s == current)) for s in STATUSES]
    return family("mmserve_model_status", "Each model's status (1: the current one): ready, "
                        "starting, failed (to start), recovering (its replica died, a replacement is coming), "
                        "unavailable (no replica), unhealthy", rows)


def render(families: Iterable[Metric]) -> bytes:
    """Prometheus' text format (0.0.4) of ``families``."""
    from prometheus_client.exposition import generate_latest

    class _Families:
        def collect(self) -> Iterable[Metric]:
            return families

    return generate_latest(_Families())


@functools.cache
def _tls():
    """httpx's default TLS context, made once: a client makes one of its own otherwise, loading
    the CA bundle (about 19 ms of the ingress's event loop, every stream in it waiting, at
    each scrape), although the processes it reads answer plain HTTP."""
    import httpx

    return httpx.create_ssl_context()


async def scrape_cluster(app: str, timeout_s: float, extra: list[Metric]) -> bytes:
    """Every listed process of ``app`` read at once (within ``timeout_s``), merged with
    ``extra`` and the directory's replica start counts. A process that refuses the connection
    has gone and is dropped from the directory; one that times out is left out this time."""
    import asyncio

    import httpx

    d = directory()
    procs, starts = await d.listing.remote(app)
    async with httpx.AsyncClient(timeout=timeout_s, verify=_tls()) as client:
        answers = await asyncio.gather(*(client.get(url) for _key, url, _labels in procs),
                                       return_exceptions=True)
    sources: list[tuple[dict[str, str], list[Metric]]] = [({}, extra)]
    for (key, url, labels), answer in zip(procs, answers):
        if isinstance(answer, httpx.ConnectError):
            d.unregister.remote(app, key)
            continue
        if isinstance(answer, BaseException) or answer.status_code != 200:
            logger.warning("metrics: %s (%s) did not answer: %s", url, labels, answer)
            continue
        sources.append((labels, parse(answer.text)))
    sources.append(({}, [family(
        "mmserve_replica_starts", "Replicas started per deployment (a restart counts once more)",
        [({"model_id": m, "deployment": dep}, float(n)) for m, dep, n in starts], typ="counter")]))
    return render(merge(sources))


def sample_value(families: Iterable[Metric], sample: str, **labels: Any) -> float:
    """The sum of ``sample``'s values whose labels include ``labels`` (for tests and benchmarks)."""
    want = {k: str(v) for k, v in labels.items()}
    return sum(s.value for f in families for s in f.samples
               if s.name == sample and want.items() <= s.labels.items())
