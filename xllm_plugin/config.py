"""The ``xllm`` section of vLLM's ``--additional-config``, validated in one place.

Every engine-side feature of the plugin reads its settings from here, so a
typo or an out-of-range value is caught once, at startup, with a message
that names the key and what it accepts instead of surfacing later as an
obscure failure deep inside the engine.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from xllm_plugin.kvstore.settings import KVStoreConfig

SECTION = "xllm"


class XLLMConfigError(ValueError):
    """A one-line, user-facing description of what is wrong in ``--additional-config``."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RequestClassConfig(_Section):
    """How a request is sorted into the online or offline class.

    A request is offline when its ``vllm_xargs`` say ``request_class: offline``
    or when its OpenAI ``priority`` is at least ``offline_min_priority`` (vLLM
    treats a lower priority value as more urgent).
    """

    offline_min_priority: int = Field(
        default=1,
        description="Smallest `priority` value that marks a request as offline.",
    )
    default_class: Literal["online", "offline"] = Field(
        default="online",
        description="Class of a request that names none.",
    )


class SLOConfig(_Section):
    """Latency targets of online requests, used by the SLO-aware step budget.

    A request may carry its own target in ``vllm_xargs`` (``slo_tpot_ms``); the
    router fills it from the ``x-slo-tpot-ms`` header.
    """

    tpot_ms: float | None = Field(
        default=None, gt=0,
        description="Default TPOT SLO of online requests in ms; none = no step budget.")
    ttft_ms: float | None = Field(
        default=None, gt=0,
        description="TTFT SLO of online requests in ms. While offline work is present and no "
                    "online request decodes, a step stays within headroom * ttft_ms / 2: an "
                    "online arrival then waits for at most that step and its own first one. "
                    "None = such steps take the configured token budget.")
    headroom: float = Field(
        default=0.9, gt=0, le=1,
        description="Fraction of the SLO a predicted step may use.")
    spend_tpot_slack: bool = Field(
        default=False,
        description="TPOT SLOs bound each online request's mean time per output token; a "
                    "request ahead of its SLO lets a step run longer than headroom * tpot_ms "
                    "(never longer than the ttft_ms bound). For hosts whose fixed step cost is "
                    "a large part of the TPOT SLO (CPUs); in the simulator on an H100 step "
                    "model it lowered co-location's offline throughput at the SLO by 2-5%. "
                    "Needs ttft_ms; false = every step within headroom * tpot_ms.")
    min_prefill_tokens: int = Field(
        default=32, ge=1,
        description="Prefill tokens a step may always give online prefill, so it never starves "
                    "(offline prefill gets only what the TPOT SLO leaves).")


class RegistrationConfig(_Section):
    """Self-registration of this ``vllm serve`` in etcd for ``xllm-router --etcd``.

    Registration runs inside the API-server process once it serves; the key
    lives under a lease, so an instance that dies disappears within ``ttl_s``.
    """

    etcd: str | None = Field(
        default=None, description="etcd HOST:PORT; none = do not register.")
    prefix: str = Field(default="/xllm/instances/", description="Key prefix the router watches.")
    advertise_url: str | None = Field(
        default=None, description="URL the router should use; default http://HOST:PORT of the server.")
    instance_id: str | None = Field(
        default=None, description="Key suffix; default host:port of the advertised URL.")
    role: Literal["both", "prefill", "decode", "encode"] = Field(
        default="both", description="Initial role for disaggregated serving.")
    ttl_s: int = Field(default=10, ge=2, le=3600, description="Lease TTL in seconds.")


class SpeculativeConfig(_Section):
    """Adaptive speculation length on top of vLLM's ``--speculative-config`` (xllm_plugin/spec).

    vLLM's ``num_speculative_tokens`` becomes the upper bound; each step the
    scheduler verifies only the drafts expected to pay for their cost.
    """

    adaptive: bool = Field(default=False, description="Choose draft lengths per step and request.")
    window_steps: int = Field(
        default=32, ge=1, description="Memory (steps) of a request's acceptance estimate.")
    prior_weight: float = Field(
        default=4.0, ge=0, description="Weight (observations) of the engine-wide estimate.")
    cost_window_steps: int = Field(
        default=256, ge=2, description="Memory (steps) of the step-cost model.")
    margin: float = Field(
        default=1.0, gt=0, description="A draft must be worth margin x its predicted cost.")
    previous_outcome: bool = Field(
        default=True, description="Estimate acceptance separately by how the request's previous "
                                  "proposal fared (matched so far, broke, none).")
    source_agreement: bool = Field(
        default=True, description="Copying proposers (ngram, suffix): estimate acceptance also "
                                  "by how many tokens before the drafts' source agree with the "
                                  "tokens before them (spec/source.py).")
    source_divergence: bool = Field(
        default=False, description="Copying proposers: estimate acceptance also by the draft "
                                   "position where another earlier source of the same start "
                                   "parts from the drafts (spec/source.py; replay-tested, off "
                                   "until measured in an engine).")
    probe_interval: int = Field(
        default=16, ge=0, description="Async scheduling only: force one draft every N steps.")
    long_run_rate: bool = Field(
        default=True, description="Judge a draft against the engine's recent output rate at this "
                                  "batch size (the throughput optimum) rather than the step's own.")
    row_costs: bool = Field(
        default=True, description="Price drafts also by how decode steps of each query-row count "
                                  "(requests plus drafts) fall off the cost line, learned online: "
                                  "kernels that work in row tiles make some drafts free "
                                  "(spec/cost.py).")
    step_log: str | None = Field(
        default=None, description="Append one JSON line per step (shape, verified lengths, "
                                  "measured ms) to this file, to fit or check step costs.")


class MoEConfig(_Section):
    """Expert-load statistics and the dynamic EPLB policy (xllm_plugin/moe)."""

    load_window_steps: int = Field(
        default=256, ge=1, description="Forward passes in the per-layer expert-load window.")
    drift_threshold: float = Field(
        default=0.1, gt=0, le=1,
        description="Rebalance when the load distribution moved this far (total variation).")
    min_improvement: float = Field(
        default=0.05, ge=0, lt=1,
        description="Rebalance only if max/mean rank load drops by this fraction.")


class BatchingConfig(_Section):
    """Phase-aware batching in XLLMScheduler (xllm_plugin/scheduler/phases.py)."""

    phase_aware: bool = Field(
        default=False,
        description="Serve decodes, then unfinished prefills, then new requests' encoder "
                    "work; a new multimodal request waits while an admitted prefill is "
                    "unfinished.")
    max_encode_hold_steps: int = Field(
        default=8, ge=0, le=10_000,
        description="Most steps a new multimodal request is held back (starvation cap).")


class XTensorConfig(_Section):
    """xTensor KV memory (xllm_plugin/memory); read only when ``xtensor`` is true."""

    reusable_views: int = Field(
        default=16, ge=0, le=4096,
        description="Virtual ranges of finished or preempted requests kept mapped for reuse.")
    map_budget_fraction: float = Field(
        default=0.5, gt=0, le=0.9,
        description="Share of vm.max_map_count (less the process's own mappings) xTensor may use.")
    premap: bool = Field(
        default=True,
        description="Map pages known ahead on a background thread (XLLMScheduler allocates "
                    "the next block one token early).")
    native_decode: bool = Field(
        default=True,
        description="Decode rows in one native kernel call per layer (built with the system C "
                    "compiler on first use); false = PyTorch SDPA per request.")
    native_prefill: bool = Field(
        default=True,
        description="Prefill chunks in the native kernel on the AMX tile unit where the CPU "
                    "has one and the KV cache is bf16; false (or no AMX) = PyTorch SDPA per "
                    "request.")
    v_pairs: bool = Field(
        default=True,
        description="Store V in token pairs (element n of tokens 2i and 2i+1 side by side, the "
                    "AMX tile unit's operand layout) where both native kernels run (bf16 KV, "
                    "AMX, head size a multiple of 64), so attention reads V without repacking "
                    "it; false = token-major V everywhere.")


class RecommendConfig(_Section):
    """Generative recommendation: POST /xllm/v1/recommend and the catalog mask
    (xllm_plugin/recommend, see its README)."""

    catalogs: dict[str, str] = Field(
        default_factory=dict,
        description="Catalog name -> item file (.npy or text) that requests may name.")
    catalog_dir: str | None = Field(
        default=None,
        description="Directory whose catalog files requests may name by path; none = names only.")
    sessions: bool = Field(
        default=True,
        description="Keep each beam as a live vLLM session between steps; false = resubmit "
                    "every beam every step, as stock vLLM beam search does.")
    max_beam_width: int = Field(default=256, ge=1, le=4096, description="Largest beam width.")
    max_live_beams: int | None = Field(
        default=None, ge=1,
        description="Beams alive in the engine at once over all requests; none = max_num_seqs.")


class XLLMConfig(_Section):
    """Root of the ``xllm`` section; every field has an off or neutral default."""

    # Every publish builds and writes the snapshot inside the engine's step loop: 0.29 ms
    # per step on average at 100 ms with ~80 ms steps (2-core Xeon, 2026-12-06), about 0.4%
    # of a step. The router scrapes every 0.5 s, so 250 ms keeps what it reads at most half
    # a scrape old for about half the cost (0.16 ms per step, measured the same way).
    status_interval_ms: int = Field(
        default=250,
        ge=1,
        le=60_000,
        description="How often the scheduler publishes its live state for /xllm/status.",
    )
    request_classes: RequestClassConfig = Field(default_factory=RequestClassConfig)
    slo: SLOConfig = Field(default_factory=SLOConfig)
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    registration: RegistrationConfig = Field(default_factory=RegistrationConfig)
    speculative: SpeculativeConfig = Field(default_factory=SpeculativeConfig)
    moe: MoEConfig = Field(default_factory=MoEConfig)
    kv_store: KVStoreConfig = Field(default_factory=KVStoreConfig)
    recommend: RecommendConfig = Field(default_factory=RecommendConfig)
    xtensor: bool = Field(
        default=False,
        description="KV memory contiguous per request (needs --worker-cls "
                    "xllm_plugin.memory.XTensorCPUWorker).")
    xtensor_options: XTensorConfig = Field(default_factory=XTensorConfig)


def _field_at(path: Sequence[str | int]) -> tuple[type[BaseModel], Any]:
    """Walk ``path`` through the nested sections: (section model, field info or None)."""
    model: type[BaseModel] = XLLMConfig
    for part in path[:-1]:
        annotation = model.model_fields[str(part)].annotation
        assert isinstance(annotation, type) and issubclass(annotation, BaseModel)
        model = annotation
    return model, model.model_fields.get(str(path[-1]))


_BOUND_SYMBOLS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def _describe_allowed(info: Any) -> str:
    """What a leaf field accepts, in words: literal choices or typed bounds."""
    annotation = info.annotation
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "an object with keys " + ", ".join(sorted(annotation.model_fields))
    if get_origin(annotation) is Literal:
        return "one of " + ", ".join(json.dumps(a) for a in get_args(annotation))
    names = [getattr(a, "__name__", str(a)) for a in (get_args(annotation) or (annotation,))]
    text = " or ".join("null" if n == "NoneType" else n for n in names)
    bounds = [f"{_BOUND_SYMBOLS[kind]} {getattr(m, kind)}" for m in info.metadata
              for kind in _BOUND_SYMBOLS if hasattr(m, kind) and getattr(m, kind) is not None]
    return f"{text} {' and '.join(bounds)}".strip()


def _format_error(error: ValidationError) -> str:
    first = error.errors()[0]
    path = list(first["loc"])
    dotted = ".".join([SECTION, *map(str, path)])
    section, info = _field_at(path)
    if first["type"] == "extra_forbidden" or info is None:
        return (f"unknown key '{dotted}' in --additional-config; allowed keys: "
                + ", ".join(sorted(section.model_fields)))
    return (f"bad value {json.dumps(first.get('input'), default=str)} for '{dotted}' in "
            f"--additional-config; allowed: {_describe_allowed(info)}")


def parse_xllm_config(additional_config: Mapping[str, Any] | None) -> XLLMConfig:
    """Validate the ``xllm`` section of vLLM's additional config.

    Other sections belong to other plugins and are left alone.
    """
    section = (additional_config or {}).get(SECTION, {})
    if not isinstance(section, Mapping):
        raise XLLMConfigError(
            f"'{SECTION}' in --additional-config must be a JSON object, got {type(section).__name__}")
    try:
        return XLLMConfig.model_validate(dict(section))
    except ValidationError as error:
        raise XLLMConfigError(_format_error(error)) from None


def additional_config_from_argv(argv: Sequence[str]) -> dict[str, Any] | None:
    """Pick ``--additional-config`` out of a ``vllm serve`` command line.

    Used to reject a bad ``xllm`` section in the API-server process before
    vLLM spends half a minute loading the model in the engine process.
    """
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--additional-config", "--additional_config", dest="additional_config")
    known, _ = parser.parse_known_args(list(argv))
    if known.additional_config is None:
        return None
    try:
        loaded = json.loads(known.additional_config)
    except json.JSONDecodeError as error:
        raise XLLMConfigError(f"--additional-config is not valid JSON: {error}") from None
    if not isinstance(loaded, dict):
        raise XLLMConfigError("--additional-config must be a JSON object")
    return loaded
