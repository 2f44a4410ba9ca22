"""The wire format of the serving API (pydantic), and the settings of one serving application.

Types here reject what JSON can smuggle into a float field: strings, booleans, ``NaN`` and
``Infinity`` (Python's JSON parser accepts the last two), so a bad value is a 422 naming its
place before any tensor is built. Shapes depend on the model being asked (the data set's
``(channels, height, width)`` images or sinusoid scalars), so they are checked later, against
the model (:mod:`serve.signature`), and so are packed inputs (``*_b64``: float32, base64),
which are decoded there and held to the same count limits and finite values.
The limits in the schema are hard ceilings for the OpenAPI document; the smaller, configurable
limits of :class:`ServeSettings` are enforced by the application.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

from serve.quota import StoreQuota

#: Upper bounds written into the OpenAPI schema; the deployment may set lower ones.
HARD_MAX_INPUTS = 4096
HARD_MAX_STEPS = 1000
#: Numbers one input may hold at most in the schema (a 3×128×128 image); the body limit of
#: :class:`ServeSettings` and the run's input shape bound requests far below.
HARD_MAX_INPUT_VALUES = 3 * 128 * 128
#: base64 characters of HARD_MAX_INPUTS packed such inputs (4 per 3 bytes, rounded up).
HARD_MAX_PACKED_CHARS = 4 * ((HARD_MAX_INPUTS * HARD_MAX_INPUT_VALUES * 4 + 2) // 3)

FiniteFloat = Annotated[float, Field(strict=True, allow_inf_nan=False)]
#: One input: a sinusoid ``x`` (a number, or ``[x]``), a grey image (rows of numbers), or an
#: image with its channel axis (channels of rows of numbers).
Input = (FiniteFloat | list[FiniteFloat] | list[list[FiniteFloat]]
         | list[list[list[FiniteFloat]]])
#: Classification labels and regression targets: one per support input, at least one.
Labels = Annotated[list[StrictInt], Field(min_length=1, max_length=HARD_MAX_INPUTS)]
Targets = Annotated[list[FiniteFloat], Field(min_length=1, max_length=HARD_MAX_INPUTS)]
#: The same inputs packed: little-endian float32 values, row-major, in standard base64.
#: Standard base64 of whole float32 values (a multiple of 4 bytes: 16 characters per 12 bytes,
#: then 4 or 8 bytes more, padded). Stated in the schema; enforced when decoded, against the
#: model's input shape, with messages that say what is wrong (:mod:`serve.signature`).
PACKED_PATTERN = r"^(?:[A-Za-z0-9+/]{16})*(?:[A-Za-z0-9+/]{6}==|[A-Za-z0-9+/]{11}=)?$"
Packed = Annotated[str, Field(min_length=1, max_length=HARD_MAX_PACKED_CHARS,
                              json_schema_extra={"pattern": PACKED_PATTERN},
                              description="base64 of little-endian float32 values, row-major: "
                                          "N×C×H×W for images (the run's input_shape), N for "
                                          "sinusoid; read 4-8× faster than JSON numbers, in a "
                                          "smaller body")]

#: What every input field says about shapes; the served runs' own shapes are added to the
#: API document when the application starts (:func:`document_input_shapes`).
INPUTS_HELP = ("Each input has the run's input_shape (GET /v1/models; the API description "
               "lists every served run's): images are channels of rows of numbers in [0, 1] "
               "(a 1-channel image may be given as rows alone); sinusoid inputs are numbers "
               "(x values), or one-element lists.")


def exactly_one(field: str) -> dict[str, object]:
    """JSON Schema for :func:`_one_of`: ``field`` (an array) or ``field_b64`` (a string), not
    both and not neither; a null counts as absent, as the validator counts it."""
    return {"oneOf": [{"required": [field], "properties": {field: {"type": "array"}}},
                      {"required": [f"{field}_b64"],
                       "properties": {f"{field}_b64": {"type": "string"}}}]}


def at_most_one(field: str) -> dict[str, object]:
    """JSON Schema: not both ``field`` (an array) and ``field_b64`` (a string)."""
    return {"not": {"required": [field, f"{field}_b64"],
                    "properties": {field: {"type": "array"},
                                   f"{field}_b64": {"type": "string"}}}}


def _one_of(body: BaseModel, field: str) -> None:
    """Exactly one of ``field`` (JSON numbers) and ``field_b64`` (packed float32)."""
    given = [getattr(body, field) is not None, getattr(body, f"{field}_b64") is not None]
    if all(given):
        raise ValueError(f"give {field} or {field}_b64, not both")
    if not any(given):
        raise ValueError(f"{field} (JSON numbers) or {field}_b64 (packed float32) is required")


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PredictRequest(_Body):
    """A batch of inputs for one model: ``inputs`` or ``inputs_b64``, exactly one."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=exactly_one("inputs"))

    inputs: list[Input] | None = Field(
        None, min_length=1, max_length=HARD_MAX_INPUTS, description=INPUTS_HELP,
        examples=[[-2.0, 0.0, 1.5]])
    inputs_b64: Packed | None = None

    @model_validator(mode="after")
    def _one_form(self) -> PredictRequest:
        _one_of(self, "inputs")
        return self


class Prediction(BaseModel):
    """Outputs for a batch: classification fills ``labels`` + ``probabilities``,
    regression fills ``values``."""

    task_type: Literal["classification", "regression"]
    labels: list[int] | None = None
    probabilities: list[list[float]] | None = None
    values: list[float] | None = None


class PredictResponse(Prediction):
    model_id: str = Field(description="the id as requested")
    resolved_model_id: str = Field(description="the exact version that answered, "
                                               "e.g. `run@000120` for `latest`")
    run: str
    step: int | None = Field(None, description="meta-model step (round) the answer came from")


class AdaptRequest(_Body):
    """A support set to adapt a meta-model version on (the same inner loop as training):
    ``support_inputs`` or ``support_inputs_b64`` (exactly one), at most one of ``query_inputs``
    and ``query_inputs_b64``, and as many labels as support inputs."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "allOf": [exactly_one("support_inputs"), at_most_one("query_inputs")]})

    base_model: str = Field("latest", max_length=200,
                            description="a meta-model version (`latest`, `run@12`), a site model"
                                        " or an adapted model")
    support_inputs: list[Input] | None = Field(None, min_length=1, max_length=HARD_MAX_INPUTS,
                                               description=INPUTS_HELP)
    support_inputs_b64: Packed | None = None
    support_labels: Labels | Targets = Field(
        description="class labels 0..ways-1 (classification) or target values (regression)")
    steps: int | None = Field(None, ge=0, le=HARD_MAX_STEPS,
                              description="inner steps; default: the run's test_steps")
    query_inputs: list[Input] | None = Field(
        None, max_length=HARD_MAX_INPUTS,
        description="optional inputs to predict with the adapted model in the same request")
    query_inputs_b64: Packed | None = None

    @model_validator(mode="after")
    def _paired(self) -> AdaptRequest:
        _one_of(self, "support_inputs")
        if self.query_inputs is not None and self.query_inputs_b64 is not None:
            raise ValueError("give query_inputs or query_inputs_b64, not both")
        # Packed inputs are counted once decoded, against the model's input shape.
        if self.support_inputs is not None and len(self.support_labels) != len(
                self.support_inputs):
            raise ValueError(f"support_labels has {len(self.support_labels)} entries but "
                             f"support_inputs has {len(self.support_inputs)}")
        return self


class AdaptResponse(_Body):
    model_id: str = Field(description="content-derived id of the adapted model; the same base "
                                      "version, support set and steps always give the same id")
    base_model: str = Field(description="the resolved base version, e.g. `run@000120`")
    steps: int
    created: bool = Field(description="false when this exact adaptation already existed")
    adapt_ms: float = Field(description="time spent in the inner loop (0 when reused)")
    predictions: Prediction | None = None


class MetaModelInfo(BaseModel):
    id: str
    run: str
    step: int
    latest: bool


class SiteModelInfo(BaseModel):
    id: str
    run: str
    site: str
    bytes: int
    modified: float


class AdaptedModelInfo(BaseModel):
    id: str
    run: str
    bytes: int
    modified: float


class RunInfo(BaseModel):
    run: str
    algorithm: str
    dataset: str
    task_type: Literal["classification", "regression"]
    ways: int | None
    input_shape: list[int] = Field(description="one input's shape: [channels, height, width] "
                                   "for images, [1] for sinusoid x values")
    latest: str | None
    adapted_models: int = Field(description="adapted models stored for this run now")
    adapted_bytes: int = Field(description="their size on disk")


class AdaptedQuotaInfo(BaseModel):
    """The bound on each run folder's adapted models (least recently used evicted first)."""

    max_models: int
    max_bytes: int
    ttl_s: float | None = Field(description="evict models unused for this long (null: never)")


class ModelsResponse(BaseModel):
    runs: list[RunInfo]
    meta_models: list[MetaModelInfo]
    site_models: list[SiteModelInfo]
    adapted_models: list[AdaptedModelInfo]
    adapted_total: int = Field(description="adapted models on disk (the list may be capped)")
    adapted_quota: AdaptedQuotaInfo | None = Field(
        description="the bound per run folder; an evicted id is 404 until adapted again")


class HealthResponse(BaseModel):
    status: Literal["ok"]
    node_id: str
    site: str | None
    replica: str


class ErrorResponse(BaseModel):
    detail: str | list[dict[str, object]]


class ServeSettings(BaseModel):
    """Arguments of one serving application (``serve deploy`` args, ``edgemeta serve`` flags).

    Read once per replica; limits apply per request.
    """

    model_config = ConfigDict(extra="forbid")

    run_dirs: list[str] = Field(min_length=1, description="run folders; the first is `latest`")
    site: str | None = Field(None, pattern=r"^[a-z0-9][a-z0-9-]{0,40}$",
                             description="pin replicas to this edge site's node")
    num_replicas: int = Field(1, ge=1, description="replicas that hold models")
    num_cpus: float = Field(1.0, ge=0, description="CPUs each replica that holds models reserves")
    route_by_model: bool = Field(True, description="with num_replicas > 1: models in a "
                                 "deployment behind the ingress, each request routed to a "
                                 "replica that holds its model (one more hop a request); false: "
                                 "every replica is an ingress with its own models")
    ingress_replicas: int = Field(1, ge=1, description="ingress replicas in front of routed "
                                  "model replicas (they hold no model)")
    ingress_num_cpus: float = Field(0.0, ge=0, description="CPUs each such ingress replica "
                                    "reserves (0, like Serve's proxies: it decodes, forwards)")
    torch_threads: int | None = Field(None, ge=1, description="default: Ray's per-replica setting")
    max_models_per_replica: int = Field(16, ge=1, description="LRU size of a model replica's "
                                        "cache")
    max_inputs: int = Field(256, ge=1, le=HARD_MAX_INPUTS)
    max_support: int = Field(512, ge=1, le=HARD_MAX_INPUTS)
    max_adapt_steps: int = Field(50, ge=0, le=HARD_MAX_STEPS)
    max_body_bytes: int = Field(8 << 20, ge=1024, description="larger bodies get 413 unread")
    token_file: str | None = Field(None, description="bearer token file; or EDGEMETA_SERVE_TOKEN")
    latest_poll_ms: float = Field(200.0, ge=0, description="how stale `latest` may be")
    batch_max_size: int = Field(32, ge=1)
    batch_wait_timeout_s: float = Field(0.0, ge=0, description="0: batch what is already queued")
    batch_max_images: int = Field(32, ge=1, description="inputs a batched forward pass holds "
                                  "at most (more requests: more passes)")
    max_ongoing_requests: int = Field(64, ge=1, description="per replica that holds models")
    max_queued_requests: int = Field(32, ge=-1, description="-1: unbounded (32 against 256 at "
                                     "twice the capacity: docs/BENCHMARKS.md, overload)")
    retry_after_s: float = Field(1.0, ge=0)
    backpressure_status: Literal[503, 429] = 503
    models_list_limit: int = Field(200, ge=0, description="adapted models listed by GET /v1/models")
    adapted_max_models: int = Field(1000, ge=1, description="adapted models kept per run folder; "
                                    "past it the least recently used are deleted")
    adapted_max_bytes: int = Field(1 << 30, ge=1, description="bytes of adapted models kept per "
                                   "run folder (the newest is kept even if larger)")
    adapted_ttl_s: float | None = Field(None, gt=0, description="also delete adapted models "
                                        "unused for this many seconds (default: no expiry)")
    access_log: bool = Field(False, description="Serve's per-request access log line in the "
                             "replica (off: it cost 15-24 % of throughput under load here)")
    compute_in_thread: bool = Field(True, description="run torch on a dedicated thread, so "
                                    "the event loop stays free; False: inline (less latency)")

    def adapted_quota(self) -> StoreQuota:
        return StoreQuota(self.adapted_max_models, self.adapted_max_bytes, self.adapted_ttl_s)

    @field_validator("run_dirs", mode="before")
    @classmethod
    def _one_or_many(cls, v: object) -> object:
        return [v] if isinstance(v, str) else v


def document_input_shapes(spec: dict[str, Any], shapes: dict[str, list[int]]) -> dict[str, Any]:
    """The OpenAPI document ``spec`` saying which input shape each served run expects: in the
    API's description, and as ``x-edgemeta-input-shapes`` (run name -> shape) beside it."""
    lines = [f"- `{run}`: inputs of shape {shape}" + (
        " (channels, height, width)" if len(shape) == 3 else "") for run, shape in shapes.items()]
    info = spec.setdefault("info", {})
    info["description"] = (info.get("description", "") + "\n\nInput shapes of the runs served "
                           "here (a model id names its run; `latest` is the first):\n"
                           + "\n".join(lines))
    info["x-edgemeta-input-shapes"] = {run: list(shape) for run, shape in shapes.items()}
    return spec
