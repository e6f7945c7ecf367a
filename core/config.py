"""The validated schema of the composed Hydra config.

Each top-level section mirrors one config group in ``conf/``:

=================  ==========================  ==============================================
config group        schema                      what it builds
=================  ==========================  ==============================================
``server/``         :class:`ServerConfig`       the HTTP ingress (``api.ingress.Ingress``,
                                                serving ``api.app``; bound by ``apps.builder``)
                                                and the Ray and Serve it runs on (``apps.serving``)
``deployment/``     :class:`DeploymentProfile`  Ray Serve options of every deployment
                                                (``pipelines.deployments``, ``apps.builder``)
``pipeline/``       :class:`PipelineConfig`     the node chain of a modality (``pipelines``)
``model/``          :class:`ModelConfig`        one served model (``engines``)
=================  ==========================  ==============================================

Every model is strict (unknown keys are errors) so that a typo in YAML fails at validation,
with its dotted path, before anything starts. Cross references (a model naming a pipeline,
a pipeline naming a node) are checked in :mod:`core.validate`. Every field carries a
``description``: ``python -m apps.config_reference`` turns them into docs/configuration.md.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

Placement = Literal["inline", "remote_core", "engine", "split"]
Modality = Literal["text", "audio", "vision", "video"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- deployment/ ---------------------------------------------------------------------------

class AutoscalingConfig(Strict):
    """Ray Serve autoscaling; replaces ``num_replicas`` when set."""

    min_replicas: int = Field(1, ge=0, description="Replicas kept at all times (0 scales to zero).")
    initial_replicas: int | None = Field(None, ge=0, description=(
        "Replicas started first; unset: min_replicas."))
    max_replicas: int = Field(1, ge=1, description="Upper bound of replicas.")
    target_ongoing_requests: float = Field(2.0, gt=0, description="Requests per replica to aim for.")
    upscale_delay_s: float = Field(30.0, ge=0, description="Sustained load before scaling up.")
    downscale_delay_s: float = Field(600.0, ge=0, description="Sustained idleness before scaling down.")
    downscale_to_zero_delay_s: float | None = Field(None, ge=0, description=(
        "Sustained idleness before the last replica goes (min_replicas 0); unset: downscale_delay_s."))
    look_back_period_s: float = Field(30.0, gt=0, description=(
        "The window Serve averages a deployment's ongoing requests over for each decision."))

    @model_validator(mode="after")
    def _bounds(self) -> "AutoscalingConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})")
        return self


def _env_strings(cls, v: Any) -> Any:
    """YAML reads ``MALLOC_ARENA_MAX: 2`` as a number; the environment only holds strings."""
    if isinstance(v, dict):
        return {k: str(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else x
                for k, x in v.items()}
    return v


class RayActorOptions(Strict):
    """Resources of each replica (Ray actor options)."""

    num_cpus: float = Field(0.0, ge=0, description="CPUs reserved per replica; light nodes use 0.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs reserved per replica.")
    memory: int | None = Field(None, ge=0, description="Bytes of memory reserved per replica.")
    resources: dict[str, float] = Field(default_factory=dict, description=(
        "Custom Ray resources per replica, e.g. {gpu_node: 1} to place it on the nodes started "
        "with that resource."))
    env_vars: dict[str, str] = Field(default_factory=dict, description=(
        "Environment of the replica's process, set before it starts (e.g. OMP_WAIT_POLICY)."))
    jemalloc: bool = Field(False, description=(
        "Run the replica's process on jemalloc (the copy Ray ships, through LD_PRELOAD) instead "
        "of glibc's malloc, whose per-thread arenas keep growing under media decoding in "
        "worker threads (BENCHMARKS.md)."))

    _env_as_strings = field_validator("env_vars", mode="before")(_env_strings)

    def process_env(self) -> dict[str, str]:
        """``env_vars``, with jemalloc preloaded if asked for and Ray ships it here. A cluster
        node whose Ray lies elsewhere only warns that it cannot preload it, and runs glibc's."""
        env = dict(self.env_vars)
        if self.jemalloc and "LD_PRELOAD" not in env and (lib := ray_jemalloc()):
            env["LD_PRELOAD"] = lib
        return env


def ray_jemalloc() -> str | None:
    """The jemalloc library inside the installed ray package, found without importing ray."""
    import importlib.util

    spec = importlib.util.find_spec("ray")
    if spec is None or not spec.origin:
        return None
    lib = os.path.join(os.path.dirname(spec.origin), "core", "libjemalloc.so")
    return lib if os.path.exists(lib) else None


class DeploymentOptions(Strict):
    """Options of one Ray Serve deployment (replicas, resources, queue limits, health checks)."""

    num_replicas: int = Field(1, ge=1, description="Fixed replica count, unless autoscaling is set.")
    autoscaling_config: AutoscalingConfig | None = Field(None, description=(
        "Ray Serve autoscaling instead of a fixed num_replicas."))
    ray_actor_options: RayActorOptions = Field(default_factory=RayActorOptions, description=(
        "Resources and process environment of each replica."))
    max_ongoing_requests: int = Field(5, ge=1, description=(
        "Requests a replica runs at once. For an engine, at least what it can batch (the batch "
        "size its engine_kwargs set, e.g. instances x max_batch_size), or Serve caps its "
        "batches. With placement inline or remote_core, the engine's own admission limit."))
    max_queued_requests: int = Field(-1, ge=-1, description="Requests queued per caller before "
                                     "refusing with 503; -1 is unbounded.")
    health_check_period_s: float = Field(10.0, gt=0, description="Seconds between health checks.")
    health_check_timeout_s: float = Field(30.0, gt=0, description="A check slower than this fails.")
    graceful_shutdown_timeout_s: float = Field(20.0, ge=0, description=(
        "Seconds a stopping replica gives its requests in flight to finish."))
    access_log: bool = Field(True, description="Serve's one log line per request of this deployment.")

    def serve_options(self) -> dict[str, Any]:
        """Keyword arguments for ``Deployment.options``."""
        opts = self.model_dump(exclude_none=True)
        opts["logging_config"] = {"enable_access_log": opts.pop("access_log")}
        # env_vars and jemalloc become the process's environment (process_env)
        actor = opts["ray_actor_options"] = self.ray_actor_options.model_dump(
            exclude_none=True, exclude={"env_vars", "jemalloc"})
        if not actor["resources"]:
            del actor["resources"]
        env = self.ray_actor_options.process_env()
        if env:
            actor["runtime_env"] = {"env_vars": env}
        if self.autoscaling_config is not None:
            del opts["num_replicas"]
        return opts

    @property
    def min_replicas(self) -> int:
        """Replicas that must run for the deployment to be ready."""
        if self.autoscaling_config is None:
            return self.num_replicas
        a = self.autoscaling_config
        return a.initial_replicas if a.initial_replicas is not None else a.min_replicas

    @property
    def scales_to_zero(self) -> bool:
        """Whether the deployment may have no replica at all while idle (autoscaling to 0)."""
        return self.autoscaling_config is not None and self.autoscaling_config.min_replicas == 0


class ModelDeployment(Strict):
    """Where a model's nodes run and with which options.

    ``placement`` decides how many Ray Serve deployments a model's pipeline becomes:

    - ``inline``: preprocess, engine and postprocess run inside the ingress replica (no handle
      hop at all; for cheap engines such as ``echo``).
    - ``remote_core`` (engines whose hosting declares a core, ``engines.base.Hosting``): the
      engine's frontend runs in the ingress replica (no handle hop), its compute core in Ray
      actors of its own with the ``engine`` options' resources, started again by the engine when
      they die (the default for text models).
    - ``engine``: pre/postprocess run in the ingress replica, the engine in its own deployment
      (one hop; the default for real models, whose engine needs its own resources).
    - ``split``: every node is its own deployment (most isolation, one hop per node).
    """

    placement: Placement = Field("engine", description=(
        "Which of the model's steps get a Serve deployment of their own: inline (none), "
        "remote_core (none; the engine's core runs in Ray actors of its own, for an engine whose "
        "hosting declares a core), engine (the engine), split (every node)."))
    engine: DeploymentOptions = Field(default_factory=DeploymentOptions,
                                      description=(
                                          "The engine deployment (placement engine/split); with "
                                          "remote_core, the resources of each of the core's "
                                          "actors and the engine's admission limits."))
    node: DeploymentOptions = Field(default_factory=DeploymentOptions,
                                    description="Pre/postprocess deployments (placement split).")


class DeploymentProfile(ModelDeployment):
    """The ``deployment`` group: defaults for every model, plus the ingress deployment."""

    ingress: DeploymentOptions = Field(default_factory=DeploymentOptions,
                                       description="The HTTP ingress/router deployment.")


# --- server/ -------------------------------------------------------------------------------

class RetryAfter(Strict):
    """Seconds a 503 tells a client to wait before retrying (``Retry-After``), by its cause."""

    overloaded: int = Field(1, ge=0, description="The model's queue is full (Overloaded).")
    recovering: int = Field(2, ge=0, description=(
        "The model's engine replica died and is being replaced; a probe re-opens the model."))
    replica_unavailable: int = Field(5, ge=0, description="A call found the model's replica dead or unreachable.")
    engine_dead: int = Field(30, ge=0, description=(
        "The engine's backend died; the engine (remote_core) or Serve (engine) starts it again, "
        "which can take tens of seconds."))
    not_ready: int = Field(5, ge=0, description="Models are starting or unhealthy (/ready).")
    starting: int = Field(5, ge=0, description=(
        "The model is still starting (its engine loading, its replicas being placed)."))


class ServerConfig(Strict):
    """The HTTP side: where Serve listens and what it accepts."""

    host: str = Field("127.0.0.1", description=(
        "Address HTTP is served on (HAProxy or Serve's proxy binds it); 0.0.0.0 for every interface."))
    port: int = Field(8000, ge=1, le=65535, description="Port HTTP is served on.")
    app_name: str = Field("mmserve", min_length=1, description=(
        "Ray Serve application name of the ingress; a model step with a deployment of its own "
        "is the application <app_name>.<model_id>.<step>."))
    route_prefix: str = Field("/", pattern=r"^/", description="Route prefix of the application.")
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1, description=(
        "Largest request body in bytes; a larger one gets 413 before it is read."))
    max_json_depth: int = Field(32, ge=2, description="Deeper nesting in a request body gets 422.")
    max_string_chars: int = Field(4 * 1024 * 1024, ge=1, description="A longer string in a body gets 422.")
    ready_timeout_s: float = Field(900.0, gt=0, description=(
        "Seconds the launcher waits for every deployment to run before it gives up (exit 1)."))
    status_timeout_s: float = Field(2.0, gt=0, description=(
        "Budget of one model status probe (/ready, /v1/models) and of reading one process's "
        "metrics for GET /metrics."))
    request_timeout_s: float = Field(300.0, gt=0, description=(
        "Deadline of a request that names none (params.timeout_s or the x-request-timeout header)."))
    max_request_timeout_s: float = Field(600.0, gt=0, description="Cap on any request's deadline.")
    api_keys: list[str] = Field(default_factory=list, description=(
        "Bearer keys; when any is set, every route but /health needs one. Prefer api_keys_env."))
    api_keys_env: str | None = Field("MMSERVE_API_KEYS", description=(
        "Environment variable holding more comma-separated keys; the launcher adds them after "
        "validation (apps.config.with_env_api_keys), so a config validates the same in every shell."))
    cors_origins: list[str] = Field(default_factory=list, description="Allowed CORS origins; none by default.")
    allow_runtime_lora_updating: bool = Field(False, description=(
        "Answer POST /v1/load_lora_adapter and /v1/unload_lora_adapter (an LLM server's routes "
        "for adapters loaded at run time): a load reads any path of the serving machine, so they "
        "are off unless set, as in the LLM server; the adapters of a model's config need no such key."))
    metrics: bool = Field(True, description=(
        "Record Prometheus metrics in every replica and answer GET /metrics with all of them "
        "(core.metrics); false: record nothing, /metrics is 404."))
    metrics_public: bool = Field(False, description=(
        "With api_keys set, let GET /metrics through without a key (for a scraper inside a "
        "trusted network); by default it needs one like every route but /health."))
    tracing_endpoint: str | None = Field(None, description=(
        "OTLP/HTTP URL that every process sends its spans of requests to (e.g. "
        "http://collector:4318/v1/traces; core.tracing). null: the OTEL_EXPORTER_OTLP_TRACES_ENDPOINT "
        "or OTEL_EXPORTER_OTLP_ENDPOINT variable where the launcher runs, if set; else tracing "
        "is off. The launcher's other OTEL_* variables apply too."))
    on_start_failure: Literal["serve_others", "stop"] = Field("serve_others", description=(
        "A model that fails to start (its weights missing, its engine failing): the others are "
        "served and it answers 503 naming why, the launcher reports it and exits 1 when stopped "
        "(serve_others); or the launcher stops everything and exits 1 (stop)."))
    slow_starts_at_once: int | None = Field(None, ge=1, description=(
        "How many models whose engine starts slowly (an LLM engine: minutes of CPU where no GPU "
        "does the work) start at once, in the config's order, once the other models are up (a "
        "model waiting its turn is 'starting', 'waiting to start'); null: every model starts at "
        "once, as on GPUs, where each engine has its own. The small_cpu host profile sets 2."))
    retry_after_s: RetryAfter = Field(default_factory=RetryAfter, description=(
        "The Retry-After of each kind of 503, the one place that sets it."))
    http_proxy: Literal["haproxy", "ray"] = Field("haproxy", description=(
        "What takes HTTP on `port`. haproxy: Ray Serve's throughput-optimized mode "
        "(RAY_SERVE_ENABLE_HA_PROXY=1, RAY_SERVE_THROUGHPUT_OPTIMIZED=1), HAProxy (shipped with "
        "ray[serve]) forwarding to the ingress replica, which serves HTTP itself; a local Ray gets "
        "free ports for its stats, metrics and fallback proxy. ray: Ray Serve's Python proxy actor. "
        "Applies to the Serve that mmserve starts (apps.serving.serve_env)."))
    proxy_location: Literal["EveryNode", "HeadOnly"] = Field("EveryNode", description=(
        "Where Serve takes HTTP on a cluster: on every node that has a replica (Serve's default), "
        "or on the head node only (nodes sharing one address, as in a cluster on one machine)."))
    ship_code: bool = Field(True, description=(
        "When the launcher joins a Ray cluster (RAY_ADDRESS), ship the project to its nodes in "
        "the job's runtime environment (working_dir, without virtual environments, caches, "
        "outputs and multirun directories); false where the cluster's image already holds it."))
    serve_env: dict[str, str] = Field(default_factory=dict, description=(
        "Environment of the Ray and Serve processes that mmserve starts (RAY_SERVE_* settings), "
        "on top of what http_proxy sets; conf/server/default.yaml holds mmserve's defaults, "
        "each documented there."))
    ray_cpus: Literal["auto", "all"] | list[int] = Field("auto", description=(
        "CPUs of the processes of a local Ray that mmserve starts (raylet, GCS, Serve's "
        "controller and proxies); mmserve's own replicas still use every CPU. auto: the last CPU "
        "on a host without GPUs where a model's engine binds a CPU worker to cores (its hosting "
        "says so), which that worker leaves free; all; or a list of CPU ids (core.cpus)."))

    _env_as_strings = field_validator("serve_env", mode="before")(_env_strings)

    def __repr_args__(self):  # never print keys
        return [(k, "***" if k == "api_keys" and v else v) for k, v in super().__repr_args__()]


# --- pipeline/ -----------------------------------------------------------------------------

class NodeSpec(Strict):
    """A registered pre/postprocess node and its keyword arguments."""

    name: str = Field(..., description="Registered node name (see core.registry.NODES).")
    kwargs: dict[str, Any] = Field(default_factory=dict, description=(
        "The node's arguments (its limits, formats, transforms), checked by the node's Kwargs "
        "schema at validation."))


class PipelineConfig(Strict):
    """The chain of one modality: preprocess → engine → postprocess."""

    description: str = Field("", description="Free text for whoever reads the config; not served.")
    modality: Modality | None = Field(None, description=(
        "The modality of the models this pipeline serves; a model of another one fails "
        "validation. None: any (echo)."))
    preprocess: NodeSpec = Field(..., description=(
        "The node that turns a request's input into the engine's (decoding, tokenizing, checks)."))
    engine: str = Field(..., description="Default engine of models on this pipeline.")
    postprocess: NodeSpec = Field(..., description="The node that shapes the engine's result into the response.")


# --- model/ --------------------------------------------------------------------------------

class ModelConfig(Strict):
    """One served model. ``deployment`` holds the profile merged with this model's overrides."""

    model_id: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$", description=(
        "The id clients send as model_id (and as model on the OpenAI routes). Default: from the "
        "source: a hub id as it is (as LLM servers name a model they serve from the hub), a local "
        "directory's name, a generated checkpoint's name."))
    source: str | None = Field(None, description=(
        "The weights: a hub id (Qwen/Qwen3-0.6B), a local directory, generated:<name> (a "
        "checkpoint the project generates, conf/model/tiny_*.yaml) or package:<module>/<dir> "
        "(weights inside an installed package)."))
    modality: Modality = Field(..., description=(
        "What the model takes in; its pipeline must serve this modality (or any)."))
    pipeline: str = Field(..., description="Name of the pipeline config (conf/pipeline).")
    engine: str | None = Field(None, description="Engine name; defaults to the pipeline's.")
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description=(
        "The engine's arguments, checked by the engine's Kwargs schema at validation (see "
        "docs/models.md for each engine's)."))
    params: dict[str, Any] = Field(default_factory=dict, description=(
        "Default request params, under what a request sends; checked by the engine's Params schema."))
    deployment: ModelDeployment = Field(default_factory=ModelDeployment, description=(
        "This model's placement and deployment options: the profile's (the deployment group), "
        "with what this block sets merged over them."))
    description: str = Field("", description="Free text for whoever reads the config; not served.")

    _options: Any = PrivateAttr(default=None)

    @model_validator(mode="wrap")
    @classmethod
    def _model_id_from_source(cls, data: Any, handler) -> Any:
        if isinstance(data, dict) and data.get("model_id") is None:
            if isinstance(data.get("source"), str):
                data = {**data, "model_id": model_id_of(data["source"])}
            else:  # a model file whose source the user gives (conf/model/llm.yaml)
                from pydantic import ValidationError
                from pydantic_core import InitErrorDetails, PydanticCustomError

                raise ValidationError.from_exception_data(cls.__name__, [InitErrorDetails(
                    type=PydanticCustomError("source_required", "required: the weights (a hub id or a local "
                                             "directory), or a model_id for a model without weights"),
                    loc=("source",), input=None)])
        return handler(data)

    def options(self, schema: type[BaseModel]) -> Any:
        """``engine_kwargs`` as ``schema`` (the engine's ``Kwargs``), typed and defaulted:
        resolved once (by :func:`core.validate.validate_config`) and carried with the model to
        the replicas. Raises pydantic's ValidationError if they do not fit the schema."""
        if not isinstance(self._options, schema):
            self._options = schema.model_validate(self.engine_kwargs)
        return self._options


def model_id_of(source: str) -> str:
    """The model id a source gives when the config names none: a hub id as it is (an LLM
    server given ``Qwen/Qwen3-0.6B`` serves it as ``Qwen/Qwen3-0.6B``), a local directory's
    name, the name of a generated checkpoint or of a torchvision model, the module of weights
    inside a package."""
    if source.startswith("generated:"):
        return source.removeprefix("generated:")
    if source.startswith("torchvision:"):  # torchvision:ResNet50_Weights.DEFAULT -> resnet50
        return source.removeprefix("torchvision:").split(".")[0].removesuffix("_Weights").lower()
    if source.startswith("package:"):
        return source.removeprefix("package:").split("/")[0].replace("_", "-")
    if source.startswith(("/", ".", "~")) or os.path.isdir(source):
        return os.path.basename(os.path.normpath(os.path.expanduser(source)))
    return source


# --- the whole tree ------------------------------------------------------------------------

class AppConfig(Strict):
    """The whole composed config, validated once by :func:`core.validate.validate_config`."""

    server: ServerConfig = Field(default_factory=ServerConfig, description=(
        "The HTTP side, and the Ray and Serve that mmserve starts."))
    deployment: DeploymentProfile = Field(default_factory=DeploymentProfile, description=(
        "Deployment options of every model, and of the ingress."))
    pipeline: dict[str, PipelineConfig] = Field(default_factory=dict, description=(
        "Node chains, by name; a model names one."))
    model: dict[str, ModelConfig] = Field(..., min_length=1, description="Served models, by key.")
