"""``--load-format xllm``: vLLM's default loader plus the expert-load hook, installed before compile.

vLLM's worker-extension mechanism only adds methods (it refuses to override
any), so it cannot run code between loading the weights and compiling the
model; a hook installed afterwards is missing from the compiled graph. A model
loader is the documented extension point that runs at exactly that moment
(``register_model_loader``). This one loads weights like ``auto`` and then
attaches an ``ExpertLoadRecorder`` to every MoE router (a no-op for dense
models). Read it with the worker extension ``xllm_plugin.moe.worker.MoEStatsExtension``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

LOAD_FORMAT = "xllm"
logger = logging.getLogger(__name__)
_registered = False


def wants_loader(argv: Sequence[str]) -> bool:
    """True when a ``vllm serve`` command line selects ``--load-format xllm``."""
    args = list(argv)
    for i, arg in enumerate(args):
        if arg in ("--load-format", "--load_format") and i + 1 < len(args):
            if args[i + 1] == LOAD_FORMAT:
                return True
        elif arg in (f"--load-format={LOAD_FORMAT}", f"--load_format={LOAD_FORMAT}"):
            return True
    return False


def register_loader() -> None:
    """Register the ``xllm`` load format with vLLM (idempotent)."""
    global _registered
    if _registered:
        return
    from vllm.model_executor.model_loader import register_model_loader
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

    from xllm_plugin.config import parse_xllm_config
    from xllm_plugin.moe.capture import install_recorder

    class XLLMModelLoader(DefaultModelLoader):
        """Loads like ``auto``, then installs the expert-load recorder on MoE routers."""

        def __init__(self, load_config):  # type: ignore[no-untyped-def]
            super().__init__(dataclasses.replace(load_config, load_format="auto"))

        def load_model(self, vllm_config, model_config, prefix: str = ""):  # type: ignore[no-untyped-def]
            model = super().load_model(vllm_config, model_config, prefix)
            settings = parse_xllm_config(vllm_config.additional_config).moe
            recorder = install_recorder(model, settings.load_window_steps)
            if recorder is not None:
                logger.info("xllm-plugin: expert-load recorder on %d MoE layers x %d experts",
                            len(recorder.layer_ids), recorder.num_experts)
            return model

    register_model_loader(LOAD_FORMAT)(XLLMModelLoader)
    _registered = True
