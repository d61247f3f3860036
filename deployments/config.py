"""The application's configuration at its boundary: `serve_config.yaml` args, validated by pydantic."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from speckv.models import DEFAULT_DRAFT, DEFAULT_TARGET, ModelError, Tier, parse_device
from speckv.policy import SERVED_POLICIES, policy_kind, validate_policy_spec

Dtype = Literal["auto", "float32", "bfloat16", "float16"]


class AppConfig(BaseModel):
    """Arguments of `deployments.app:build_app` (the `args:` block of an application in serve_config.yaml)."""

    model_config = ConfigDict(extra="forbid")

    draft_model: str = Field(DEFAULT_DRAFT, description="draft model: embedded:NAME, local directory or hub id")
    target_model: str = Field(DEFAULT_TARGET, description="target model, same forms as draft_model")
    tiers: list[Tier] = Field(
        default_factory=lambda: [Tier.FP16, Tier.INT8, Tier.NF4],
        description="compression tiers served; one target deployment (`target-<tier>`) each",
    )
    default_tier: Tier = Field(Tier.FP16, description="tier used when the request's model is `speckv`")
    dtype: Dtype = Field("auto", description="compute dtype of the targets (auto: fp16 on GPU, bf16 on CPU)")
    draft_dtype: Dtype = Field("auto", description="compute dtype of the draft")
    device: str | None = Field(None, description="torch device in each replica; default cuda if present, else cpu")
    topology: Literal["disaggregated", "colocated"] = Field(
        "disaggregated",
        description="disaggregated: draft and targets are separate deployments (two hops per step); "
        "colocated: each target replica also holds a draft (one hop per step)",
    )
    max_tokens_limit: int = Field(1024, ge=1, description="largest max_tokens a request may ask for")
    max_sessions_per_replica: int = Field(64, ge=1, description="KV-cache sessions kept per replica (LRU beyond)")
    session_idle_timeout_s: float = Field(600.0, gt=0, description="a session idle this long is dropped")
    kv_cache_mib: float | None = Field(
        2048.0, gt=0, description="KV-cache bytes each model replica may hold (MiB; bytes per token from the "
        "model's layers, KV heads, head size and dtype); a new request that would not fit beside the running ones "
        "gets 503 + Retry-After; null: bounded by session count only")
    max_batch_size: int = Field(8, ge=1, description="requests per forward pass in a model replica (batched draft "
                                "and verify passes); a deployment's max_ongoing_requests must be at least this")
    share_cores: bool = Field(
        False, description="model replicas on one machine take turns for its cores, one forward pass at a time "
        "(speckv.batching.CoreLease): for one machine whose draft and targets share the same cores; leave it off "
        "where each replica has cores of its own (cluster/placement.yaml); off where the models run on CUDA")
    predictor: str | None = Field(
        None, description="acceptance predictor artifact for `adaptive` (predictor.json, or its directory); "
        "default: the one shipped with speckv; the controller deployment distributes it"
    )
    calibration_budget_s: float = Field(
        30.0, gt=0, description="seconds each draft/target pair may spend measuring its step costs when a replica "
        "loads (target 22/30 of it, draft 8/30); cached per machine and setting under SPECKV_HOME")
    policy_refresh_s: float = Field(5.0, gt=0, description="how often a router checks the controller's predictor "
                                    "version")
    default_policy: str = Field("adaptive", description="policy when a request names none")
    torch_threads: int | None = Field(None, ge=1, description="intra-op threads per model replica")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="largest request body accepted")
    max_concurrent_generations: int = Field(
        32, ge=1, description="generations in flight per router replica; beyond it requests get 429 + Retry-After")
    retry_after_s: int = Field(2, ge=0, description="Retry-After seconds sent with 429/503 overload answers")
    retry_deadline_s: float = Field(
        120.0, gt=0, description="how long a step whose replica went away is retried (while Serve restarts or "
        "reroutes) before the request fails: 503 + Retry-After before the first token, an error event after it")
    max_stop_strings: int = Field(8, ge=0)
    added_ms_per_call: dict[str, float] = Field(
        default_factory=dict, description="for tests: milliseconds added to every model call of a deployment "
        "(`draft`, `target-<tier>`), so a call is reliably in flight when a test kills its replica")
    api_keys_env: str = Field(
        "SPECKV_API_KEYS",
        description="environment variable holding comma-separated API keys (e.g. from a Kubernetes Secret); "
        "when it is set and non-empty, /v1/* requires `Authorization: Bearer <key>`; /healthz stays open",
    )
    deployment_options: dict[str, dict] = Field(
        default_factory=dict,
        description="Serve options per deployment name (router, controller, draft, target-<tier>) for "
        "programmatic use; a serve_config.yaml `deployments:` entry overrides these",
    )

    @field_validator("default_policy")
    @classmethod
    def _served_policy(cls, spec: str) -> str:
        spec = validate_policy_spec(spec)
        if not policy_kind(spec).in_engine:
            raise ValueError(f"{spec} is not served over HTTP; choose one of {', '.join(SERVED_POLICIES)}")
        return spec

    @field_validator("device")
    @classmethod
    def _a_torch_device(cls, device: str | None) -> str | None:
        """A device torch can name (whether this machine has it is each replica's to check: speckv.models)."""
        if device is not None:
            try:
                parse_device(device)
            except ModelError as e:
                raise ValueError(str(e)) from None
        return device

    @field_validator("tiers")
    @classmethod
    def _tiers_unique(cls, tiers: list[Tier]) -> list[Tier]:
        if not tiers or len(set(tiers)) != len(tiers):
            raise ValueError("tiers must be a non-empty list without repeats")
        return tiers

    def model_ids(self) -> dict[str, Tier]:
        """OpenAI model id -> tier: `speckv-<tier>` each, and `speckv` for the default tier."""
        ids = {f"speckv-{t.value}": t for t in self.tiers}
        ids["speckv"] = self.default_tier if self.default_tier in self.tiers else self.tiers[0]
        return ids


def target_deployment_name(tier: Tier | str) -> str:
    return f"target-{Tier(tier).value}"
