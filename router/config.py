"""The router's configuration: one validated object built from the command line.

Every setting is a field with its default, its bounds and one line of
documentation (reused as the ``--help`` text), so validation lives here and
nowhere else. ``RouterConfig.from_args`` turns pydantic's errors into
one-line messages that name the flag.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from router.discovery.records import InstanceRecord, RecordError, parse_instances
from router.discovery.registrar import DEFAULT_PREFIX
from router.server.instance_state import StateRules

if TYPE_CHECKING:
    from router.server.epd_profile import EPDSettings


class ConfigError(ValueError):
    """A bad setting; the message is one line naming the flag."""


class RouterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    host: str = Field("127.0.0.1", description="Address to listen on (loopback unless told "
                      "otherwise).")
    port: int = Field(8000, ge=0, le=65535, description="Port to listen on.")
    instances: tuple[InstanceRecord, ...] = Field(
        (), description="Static instances: URL[;id=NAME][;model=M][;role=R][;kv=ENDPOINT]"
        "[;replay=ENDPOINT][;block_size=N][;capacity=N], comma-separated or repeated.")
    etcd: str | None = Field(None, description="etcd HOST:PORT for cluster discovery; "
                             "instances registered under --etcd-prefix come and go live.")
    etcd_prefix: str = Field(DEFAULT_PREFIX, description="etcd key prefix instances register "
                             "under.")
    policy: str = Field("round_robin", description="Routing policy.")
    api_keys: tuple[str, ...] = Field((), description="Client API keys accepted on /v1/* "
                                      "(Authorization: Bearer KEY); none means open.")
    admin_token: str | None = Field(None, description="Bearer token for /admin/*; admin routes "
                                    "are disabled without it.")
    upstream_api_key: str | None = Field(None, description="API key the router sends to the "
                                         "engines (their --api-key).")
    tokenizer: Path | None = Field(None, description="Tokenizer directory (tokenizer.json, "
                                   "tokenizer_config.json) for KV-aware routing.")
    block_size: int | None = Field(None, gt=0, description="Engines' KV block size "
                                   "(--block-size); needed for KV-aware routing.")
    hash_seed: str | None = Field(None, description="Engines' PYTHONHASHSEED, if they set one "
                                  "(seeds vLLM's block hashes).")
    hash_algo: str = Field("sha256", description="Engines' --prefix-caching-hash-algo.")
    scrape_interval_s: float = Field(0.5, gt=0, le=60, description="Seconds between load "
                                     "scrapes of each instance.")
    scrape_timeout_s: float = Field(2.0, gt=0, le=60, description="Timeout of one scrape "
                                    "request.")
    unhealthy_after: int = Field(3, ge=1, le=100, description="Consecutive failures (scrapes, "
                                 "connection errors, broken or stalled streams) that move an "
                                 "instance from suspect (no new requests while another "
                                 "instance is healthy) to failed.")
    recover_after: int = Field(2, ge=1, le=100, description="Consecutive successful scrapes a "
                               "failed instance needs to become healthy again.")
    failed_hold_s: float = Field(2.0, ge=0, le=3600, description="Least time a failed instance "
                                 "stays out of rotation; doubles each time it fails again "
                                 "within --flap-window-s of recovering.")
    failed_hold_max_s: float = Field(60.0, ge=0, le=86400, description="Cap of the doubling "
                                     "hold of a flapping instance.")
    flap_window_s: float = Field(30.0, ge=0, le=86400, description="Failing again this soon "
                                 "after recovering counts as flapping.")
    remove_after_s: float | None = Field(None, gt=0, description="Failed this long: the "
                                         "instance is removed (no longer scraped) until it "
                                         "registers with a new incarnation or is added again; "
                                         "unset: never.")
    connect_timeout_s: float = Field(5.0, gt=0, description="Upstream connect timeout.")
    first_byte_timeout_s: float = Field(60.0, gt=0, description="Streaming: longest wait for "
                                        "the upstream's first chunk.")
    idle_timeout_s: float = Field(60.0, gt=0, description="Streaming: longest silence between "
                                  "two upstream chunks.")
    request_timeout_s: float = Field(600.0, gt=0, description="Non-streaming: longest wait "
                                     "for the whole upstream response.")
    migration_limit: int = Field(3, ge=0, le=100, description="Times one request (streamed "
                                 "or not) may move to another instance when its instance "
                                 "fails mid-generation (prompt + generated tokens are "
                                 "resubmitted); 0 turns migration off.")
    kv_bytes_per_token: float = Field(131072.0, gt=0, description="KV cache bytes per token "
                                      "of the served model (layers x 2 x KV heads x head dim "
                                      "x dtype bytes; default: Llama-3-8B in bf16), for "
                                      "choosing KV transfer vs recomputation on migration.")
    kv_transfer_gbps: float = Field(10.0, gt=0, description="Bandwidth, Gbit/s, at which an "
                                    "instance fetches KV blocks from a lower tier or the "
                                    "global store (migration cost estimate).")
    stall_timeout_multiple: float | None = Field(None, gt=1, le=10000, description="Streaming: "
                                                 "a silence longer than this many times the "
                                                 "instance's median TPOT (at least 1 s) counts "
                                                 "as a stall and migrates the request; unset: "
                                                 "only --idle-timeout-s.")
    liveness_probe_multiple: float = Field(4.0, ge=0, le=10000, description="A stream "
                                                  "silent this many times the instance's median "
                                                  "TPOT (at least 50 ms) makes the router probe "
                                                  "the instance's /health and token "
                                                  "counters; no answer (see "
                                                  "--liveness-probe-timeout-s), or an engine "
                                                  "that computes nothing for "
                                                  "--liveness-stuck-s, moves its streams at "
                                                  "once (a killed "
                                                  "engine's sockets close only when its exit "
                                                  "ends, a hung one's never); 0 turns probing "
                                                  "off.")
    liveness_probe_timeout_s: float = Field(0.25, gt=0, le=60, description="Least time a "
                                            "liveness probe waits for /health; it waits 2x "
                                            "the longest pause the instance recently came "
                                            "back from (a slow /health answer, a silence "
                                            "within a stream that no /health answer broke) "
                                            "when that is longer: a starved host answers "
                                            "late.")
    # 10 s: on two shared CPU cores, with only the engines' compute threads pinned, a live
    # engine of the chaos benchmark's reference phase computed nothing for 3.1 s (one long
    # step leaves the counters still too) and a 2 s floor took it for stuck.
    liveness_stuck_s: float = Field(10.0, gt=0, le=3600, description="Least time an engine "
                                    "whose HTTP server answers /health may compute no token "
                                    "(vLLM's prompt and generation token counters stand "
                                    "still) while a stream of it is silent before the "
                                    "stream moves (a hung engine core); it waits at least "
                                    "the probe's timeout too. Lower it where no engine step "
                                    "takes that long (GPU engines, short prefill chunks).")
    offline_min_priority: int = Field(1, description="Smallest OpenAI `priority` that makes a "
                                      "request offline (as the engine's xllm config).")
    max_body_mb: float = Field(32.0, gt=0, description="Largest request body accepted, MiB.")
    batch_dir: Path | None = Field(None, description="Directory where the Batch API "
                                   "(/v1/files, /v1/batches) keeps uploaded files, jobs and "
                                   "results; jobs survive a router restart. None disables it.")
    batch_concurrency: int = Field(4, ge=1, le=1024, description="Batch lines in flight at "
                                   "once per job (they run at offline class).")
    slo_ttft_ms: float | None = Field(None, gt=0, description="Default TTFT SLO (ms) of "
                                      "requests without an x-slo-ttft-ms header; SLO-aware "
                                      "policies (dynamic_pd) plan against it.")
    slo_tpot_ms: float | None = Field(None, gt=0, description="Default TPOT SLO (ms) of "
                                      "requests without an x-slo-tpot-ms header.")
    pd_role_dwell_s: float = Field(10.0, gt=0, le=3600, description="dynamic_pd: least time "
                                   "an instance keeps a role the policy gave it, and between "
                                   "two returns home (hysteresis).")
    pd_restore_quiet_s: float = Field(30.0, ge=0, le=3600, description="dynamic_pd: an "
                                      "instance returns to its home role only after this long "
                                      "without SLO pressure of the kind that moved it.")
    pd_mixed_max_batch: int = Field(4, ge=0, le=4096, description="dynamic_pd: the last "
                                    "decode instance may also take prefills (role both) only "
                                    "while it holds at most this many decodes, counting those "
                                    "waiting for their prefill elsewhere.")
    profile_instances: bool = Field(True, description="Measure each new instance with a few "
                                    "isolated requests when the policy predicts latency "
                                    "(dynamic_pd); --no-profile-instances starts from priors.")
    epd_profile: bool = Field(False, description="Profile each model's encode and "
                              "language-model instances (encoder batch and token budget by "
                              "binary search, a probe workload per strategy) and send images "
                              "through an encode instance only while that wins on goodput "
                              "under the SLOs; re-picked as image traffic shifts. Needs "
                              "--slo-ttft-ms and --slo-tpot-ms. Off: images go through an "
                              "encode instance whenever one is healthy.")
    epd_probe_requests: int = Field(8, ge=2, le=1024, description="Image chats per strategy "
                                    "and concurrency level in the EPD profiler's probe "
                                    "workload (at least two per request in flight).")
    epd_probe_concurrency: int = Field(2, ge=1, le=256, description="In flight at once at the "
                                       "probe's first level; each next level doubles it while "
                                       "nine in ten of a level's chats meet both SLOs.")
    epd_probe_max_concurrency: int = Field(16, ge=1, le=256, description="The probe's last "
                                           "level (goodput: the best level within the SLOs).")
    epd_probe_max_tokens: int = Field(16, ge=2, le=4096, description="Tokens each probe chat "
                                      "generates.")
    epd_window: int = Field(32, ge=2, le=100000, description="The EPD profiler re-picks after "
                            "every this many finished image requests of a model, from their "
                            "summary (with hysteresis).")
    epd_probe_image: str | None = Field(None, description="Image for the EPD probes: a file "
                                        "or a data:/http(s): URL like your traffic's images "
                                        "(default: a generated 448x448 PNG).")
    log_level: str = Field("info", description="debug|info|warning|error (debug logs one line "
                           "per routed request).")

    @field_validator("etcd_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not value.startswith("/") or not value.endswith("/"):
            raise ValueError("must start and end with '/' (e.g. /xllm/instances/)")
        return value

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        value = value.lower()
        if value not in ("debug", "info", "warning", "error"):
            raise ValueError("must be debug, info, warning or error")
        return value

    @field_validator("policy")
    @classmethod
    def _policy(cls, value: str) -> str:
        from router.policies import POLICY_FACTORIES

        if value not in POLICY_FACTORIES:
            raise ValueError(f"unknown policy '{value}'; choose one of "
                             f"{', '.join(POLICY_FACTORIES)}")
        return value

    @field_validator("api_keys")
    @classmethod
    def _keys(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if any(not k.strip() for k in value):
            raise ValueError("API keys must not be empty")
        return value

    @model_validator(mode="after")
    def _sources_and_kv(self) -> RouterConfig:
        if not self.instances and not self.etcd and not self.admin_token:
            raise ValueError("no instances: give --instances URL[,URL...] or --etcd HOST:PORT "
                             "(or --admin-token to add them later)")
        from router.server.prefix import PREFIX_POLICIES

        if self.policy in PREFIX_POLICIES and self.block_size is None:
            raise ValueError(f"--policy {self.policy} needs --block-size (the engines' KV "
                             "block size)")
        if self.tokenizer is not None and not self.tokenizer.is_dir():
            raise ValueError(f"--tokenizer {self.tokenizer} is not a directory")
        if self.epd_profile and (self.slo_ttft_ms is None or self.slo_tpot_ms is None):
            raise ValueError("--epd-profile needs --slo-ttft-ms and --slo-tpot-ms (the "
                             "profiler picks by goodput under them)")
        if self.epd_probe_image is not None and not (
                self.epd_probe_image.startswith(("data:image/", "http://", "https://"))
                or Path(self.epd_probe_image).is_file()):
            raise ValueError(f"--epd-probe-image {self.epd_probe_image!r} is neither a file "
                             "nor a data:image/ or http(s) URL")
        if self.epd_probe_max_concurrency < self.epd_probe_concurrency:
            raise ValueError(f"--epd-probe-max-concurrency ({self.epd_probe_max_concurrency}) "
                             "must be at least --epd-probe-concurrency "
                             f"({self.epd_probe_concurrency})")
        if self.failed_hold_max_s < self.failed_hold_s:
            raise ValueError(f"--failed-hold-max-s ({self.failed_hold_max_s:g}) must be at "
                             f"least --failed-hold-s ({self.failed_hold_s:g})")
        return self

    def epd_settings(self) -> EPDSettings:
        """The live EPD profiler's settings (router/server/epd_profile.py)."""
        from router.server.epd_profile import EPDSettings, image_data_url, probe_png

        image = self.epd_probe_image
        if not self.epd_profile:
            url = ""
        elif image is None:
            url = image_data_url(probe_png(), "png")
        elif image.startswith(("data:", "http://", "https://")):
            url = image
        else:
            path = Path(image)
            url = image_data_url(path.read_bytes(), path.suffix.lstrip(".") or "png")
        return EPDSettings(enabled=self.epd_profile, slo_ttft_s=(self.slo_ttft_ms or 0) / 1e3,
                           slo_tpot_s=(self.slo_tpot_ms or 0) / 1e3,
                           probe_requests=self.epd_probe_requests,
                           probe_concurrency=self.epd_probe_concurrency,
                           probe_max_concurrency=self.epd_probe_max_concurrency,
                           probe_max_tokens=self.epd_probe_max_tokens, window=self.epd_window,
                           image_url=url)

    def state_rules(self) -> StateRules:
        """Thresholds of the per-instance health state machine (router/server/instance_state.py)."""
        return StateRules(fail_after=self.unhealthy_after, recover_after=self.recover_after,
                          base_hold_s=self.failed_hold_s, max_hold_s=self.failed_hold_max_s,
                          flap_window_s=self.flap_window_s, remove_after_s=self.remove_after_s)

    def policy_settings(self, name: str) -> dict[str, Any]:
        """Constructor settings the flags give policy ``name`` (``make_policy(name, **...)``)."""
        if name == "dynamic_pd":
            return {"default_slo_ttft_ms": self.slo_ttft_ms,
                    "default_slo_tpot_ms": self.slo_tpot_ms,
                    "role_dwell_s": self.pd_role_dwell_s,
                    "restore_quiet_s": self.pd_restore_quiet_s,
                    "mixed_max_batch": self.pd_mixed_max_batch}
        return {}

    @classmethod
    def from_args(cls, values: dict[str, Any]) -> RouterConfig:
        """Build from argparse values; raise ConfigError with one line naming the flag."""
        values = {k: v for k, v in values.items() if v is not None}
        try:
            values["instances"] = tuple(parse_instances(values.pop("instances", [])))
        except RecordError as exc:
            raise ConfigError(f"--instances: {exc}") from None
        if "api_keys" in values:
            values["api_keys"] = tuple(values["api_keys"])
        try:
            return cls(**values)
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(p) for p in error["loc"])
            flag = f"--{where.replace('_', '-')}: " if where else ""
            message = error["msg"].removeprefix("Value error, ")
            raise ConfigError(f"{flag}{message}") from None
