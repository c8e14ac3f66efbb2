"""Config of ``jobs/serve.py``: the model, its engine, decoding defaults and what clients may change,
streaming, limits, auth, HTTP and replicas."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from bt_ray.config import check
from bt_ray.eval.config import DecodeCfg, EngineCfg
from bt_ray.models import ModelCfg


@dataclass(frozen=True, kw_only=True, slots=True)
class ServeEngineCfg:
    """Which engine generates in each replica."""

    kind: Literal["hf", "vllm"] = "hf"
    """hf: transformers generate with Serve's dynamic batching; vllm: vLLM AsyncLLM, continuous batching."""
    max_batch_size: int = 16
    """hf: requests per generate call at most."""
    batch_wait_timeout_s: float = 0.01
    """hf: how long the first request of a batch waits for others to join it."""
    vllm_max_model_len: int = 2048
    """vllm: context length (prompt + answer)."""
    vllm_kv_cache_memory_bytes: int = 1 << 30
    """vllm: KV cache size (vLLM's free-memory probe fails inside Ray actors without it)."""
    vllm_omp_threads_bind: str | None = None
    """vllm on CPU: VLLM_CPU_OMP_THREADS_BIND (e.g. 0-1); null leaves vLLM's default."""

    def __post_init__(self):
        check(self, [
            ("max_batch_size", self.max_batch_size >= 1, "must be >= 1"),
            ("batch_wait_timeout_s", self.batch_wait_timeout_s >= 0, "must be >= 0"),
            ("vllm_max_model_len", self.vllm_max_model_len >= 64, "must be >= 64"),
            ("vllm_kv_cache_memory_bytes", self.vllm_kv_cache_memory_bytes >= 1 << 20, "must be >= 1 MiB"),
        ])

    def eval_engine(self, num_gpus: float) -> EngineCfg:
        """The evaluation engine config the same engine is built from (``bt_ray.eval.engines``)."""
        return EngineCfg(
            kind=self.kind, batch_size=self.max_batch_size, num_gpus_per_actor=num_gpus,
            max_prompt_tokens=self.vllm_max_model_len - 1 if self.kind == "vllm" else 768,
            vllm_max_model_len=self.vllm_max_model_len,
            vllm_kv_cache_memory_bytes=self.vllm_kv_cache_memory_bytes,
            vllm_omp_threads_bind=self.vllm_omp_threads_bind,
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class StreamCfg:
    """How streamed answers handle [RESET] (bt_ray.reset.stream); a request may pick the mode."""

    mode: Literal["hold", "retract"] = "hold"
    """hold: nothing later discarded is ever sent; retract: text goes out at once and a reset event
    tells the client what to drop. A request overrides it with the extension field stream_mode."""
    hold_window_tokens: int = 32
    """hold: a [RESET] is possible only within this many tokens of the start or the last reset, so at
    most this many tokens are held back (the decoder's reset_window for held streams)."""

    def __post_init__(self):
        check(self, [("hold_window_tokens", self.hold_window_tokens >= 1, "must be >= 1")])


@dataclass(frozen=True, kw_only=True, slots=True)
class LimitsCfg:
    """What one request may ask for; beyond these it gets a 4xx naming the field."""

    max_body_bytes: int = 1 << 20
    """Request body size (413 above)."""
    max_messages: int = 64
    """Messages per chat request."""
    max_prompt_tokens: int = 1024
    """Prompt tokens after the chat template."""
    max_tokens: int = 512
    """Largest max_tokens (max_completion_tokens) a request may ask for."""
    max_n: int = 4
    """Choices per request (n times the number of prompts of a completions request)."""
    min_reset_logit_bias: float = -5.0
    """Lowest reset_logit_bias a request may set: a client must not switch backtracking off (-100)."""
    max_reset_logit_bias: float = 100.0
    """Highest reset_logit_bias a request may set."""
    min_max_resets: int = 1
    """Lowest max_resets a request may set (0 would switch backtracking off)."""
    max_max_resets: int = 4
    """Highest max_resets a request may set."""

    def __post_init__(self):
        check(self, [
            ("max_body_bytes", self.max_body_bytes >= 1024, "must be >= 1024"),
            ("max_messages", self.max_messages >= 1, "must be >= 1"),
            ("max_prompt_tokens", self.max_prompt_tokens >= 1, "must be >= 1"),
            ("max_tokens", self.max_tokens >= 1, "must be >= 1"),
            ("max_n", self.max_n >= 1, "must be >= 1"),
            ("min_reset_logit_bias", -100 <= self.min_reset_logit_bias <= self.max_reset_logit_bias <= 100,
             "must satisfy -100 <= min_reset_logit_bias <= max_reset_logit_bias <= 100"),
            ("min_max_resets", 0 <= self.min_max_resets <= self.max_max_resets,
             "must satisfy 0 <= min_max_resets <= max_max_resets"),
        ])


@dataclass(frozen=True, kw_only=True, slots=True)
class AuthCfg:
    """An optional API key (Authorization: Bearer KEY); never written in the config itself."""

    api_key_env: str | None = "BT_RAY_API_KEY"
    """Environment variable holding the key; set and non-empty -> every /v1 route needs it."""
    api_key_file: str | None = None
    """A file holding the key (first line); wins over api_key_env."""
    allow_open_network: bool = False
    """Serve without a key on an address other than loopback; false: jobs/serve.py refuses to."""


@dataclass(frozen=True, kw_only=True, slots=True)
class HttpCfg:
    """Where Serve's HTTP proxy listens."""

    host: str = "127.0.0.1"
    """Bind address; 0.0.0.0 exposes the API to the network (set an API key first)."""
    port: int = 8000
    """TCP port."""

    def __post_init__(self):
        check(self, [("port", 1 <= self.port <= 65535, "must be a TCP port")])


@dataclass(frozen=True, kw_only=True, slots=True)
class AutoscalingCfg:
    """Serve autoscaling of the replicas (used when enabled)."""

    enabled: bool = False
    """false: deployment.num_replicas fixed replicas."""
    min_replicas: int = 1
    """Fewest replicas."""
    max_replicas: int = 2
    """Most replicas."""
    target_ongoing_requests: float = 16.0
    """Requests in flight per replica that Serve scales towards."""

    def __post_init__(self):
        check(self, [
            ("min_replicas", 0 <= self.min_replicas <= self.max_replicas, "must be in [0, max_replicas]"),
            ("max_replicas", self.max_replicas >= 1, "must be >= 1"),
            ("target_ongoing_requests", self.target_ongoing_requests > 0, "must be > 0"),
        ])


@dataclass(frozen=True, kw_only=True, slots=True)
class DeploymentCfg:
    """Replicas and what each asks Ray for."""

    num_replicas: int = 1
    """Fixed replica count (when autoscaling is off)."""
    autoscaling: AutoscalingCfg = field(default_factory=AutoscalingCfg)
    """Autoscaling; overrides num_replicas when enabled."""
    num_cpus: float = 1.0
    """Logical CPUs per replica."""
    num_gpus: float = 0.0
    """GPUs per replica (vLLM on GPU: 1)."""
    max_ongoing_requests: int = 64
    """Requests a replica accepts at once; more wait in the proxy."""
    health_check_period_s: float = 2.0
    """How often Serve checks a replica (a dead one is replaced)."""
    health_check_timeout_s: float = 30.0
    """A replica that does not answer its health check within this is restarted."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Replica log level; INFO logs every request (Serve's access log), WARNING keeps a terminal quiet."""

    def __post_init__(self):
        check(self, [
            ("num_replicas", self.num_replicas >= 1, "must be >= 1"),
            ("num_cpus", self.num_cpus >= 0, "must be >= 0"),
            ("num_gpus", self.num_gpus >= 0, "must be >= 0"),
            ("max_ongoing_requests", self.max_ongoing_requests >= 1, "must be >= 1"),
            ("health_check_period_s", self.health_check_period_s > 0, "must be > 0"),
            ("health_check_timeout_s", self.health_check_timeout_s > 0, "must be > 0"),
        ])


@dataclass(frozen=True, kw_only=True, slots=True)
class ServeCfg:
    """``jobs/serve.py``: one backtracking model behind an OpenAI-compatible API on Ray Serve."""

    model: ModelCfg = field(default_factory=ModelCfg)
    """The model: a bt-ray HF dir (its recorded [RESET] is used) or a preset."""
    served_model_name: str | None = None
    """The model id clients send; null: the model dir's name (the preset's name)."""
    engine: ServeEngineCfg = field(default_factory=ServeEngineCfg)
    """Engine per replica."""
    decode: DecodeCfg = field(default_factory=lambda: DecodeCfg(max_new_tokens=256))
    """Server defaults; a request's temperature, top_p, seed, max_tokens, reset_logit_bias and
    max_resets override them (within limits)."""
    stream: StreamCfg = field(default_factory=StreamCfg)
    """Streaming of answers that may reset."""
    return_discarded: bool = False
    """Send the discarded (unsafe by construction) text in backtracking.discarded_text. Off by default."""
    limits: LimitsCfg = field(default_factory=LimitsCfg)
    """Per-request limits."""
    auth: AuthCfg = field(default_factory=AuthCfg)
    """API key source."""
    http: HttpCfg = field(default_factory=HttpCfg)
    """Bind address and port."""
    deployment: DeploymentCfg = field(default_factory=DeploymentCfg)
    """Replicas, autoscaling, resources."""
    app_name: str = "bt-ray"
    """Serve application name."""
    ray_address: str | None = None
    """Ray cluster to join; null: $RAY_ADDRESS, else a local cluster started here."""
    ray_num_cpus: int | None = None
    """Logical CPUs of a local cluster started here; null: Ray's default (the machine's cores)."""

    def __post_init__(self):
        check(self, [
            ("served_model_name", self.served_model_name is None or bool(self.served_model_name.strip()),
             "must not be empty"),
            ("decode", self.decode.max_new_tokens <= self.limits.max_tokens,
             f"max_new_tokens must be <= limits.max_tokens ({self.limits.max_tokens})"),
        ])
