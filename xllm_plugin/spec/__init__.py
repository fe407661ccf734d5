"""Adaptive speculative decoding (paper §4.4.1): how many drafts to verify, per step and request.

Pure parts: ``acceptance`` (online acceptance by draft position), ``cost``
(step-cost model), ``policy`` (the throughput-optimal length rule). The adapter
``adaptive.AdaptiveSpeculation`` applies them to vLLM's scheduler state; it is
driven by ``XLLMScheduler`` when ``xllm.speculative.adaptive`` is on.
"""

from __future__ import annotations

from typing import Any

from xllm_plugin.config import SpeculativeConfig, XLLMConfigError


def adaptive_speculation_for(vllm_config: Any, settings: SpeculativeConfig) -> Any:
    """The controller for this engine, or None when ``adaptive`` is off.

    Raises ``XLLMConfigError`` when adaptive speculation is asked for without a
    ``--speculative-config`` to adapt.
    """
    if not settings.adaptive:
        return None
    spec = getattr(vllm_config, "speculative_config", None)
    if spec is None or not spec.num_speculative_tokens:
        raise XLLMConfigError(
            "'xllm.speculative.adaptive' needs vLLM speculative decoding: pass --speculative-config "
            "with num_speculative_tokens (the upper bound), e.g. "
            "'{\"method\": \"ngram\", \"num_speculative_tokens\": 8, \"prompt_lookup_max\": 4}'")
    from xllm_plugin.spec.adaptive import AdaptiveSpeculation

    return AdaptiveSpeculation(
        max_drafts=int(spec.num_speculative_tokens), method=str(spec.method),
        window_steps=settings.window_steps, prior_weight=settings.prior_weight,
        cost_window_steps=settings.cost_window_steps, margin=settings.margin,
        probe_interval=settings.probe_interval, previous_outcome=settings.previous_outcome,
        long_run_rate=settings.long_run_rate, source_agreement=settings.source_agreement,
        source_divergence=settings.source_divergence, row_costs=settings.row_costs,
        step_log=settings.step_log)


def check_command_line(argv: list[str], settings: SpeculativeConfig) -> None:
    """Fail in the API-server process, before the model loads, when adaptive
    speculation is asked for on a command line without ``--speculative-config``."""
    if settings.adaptive and not any(a.split("=", 1)[0] in ("--speculative-config",
                                                           "--speculative_config", "-sc")
                                     for a in argv):
        raise XLLMConfigError(
            "'xllm.speculative.adaptive' needs vLLM speculative decoding: pass "
            "--speculative-config with num_speculative_tokens (the upper bound)")
