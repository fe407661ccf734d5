"""xllm-plugin engine layer: loaded into every vLLM process through entry points.

``register`` is the ``vllm.general_plugins`` entry point. vLLM calls it in the
API-server process, the engine-core process and every worker, possibly more
than once per process, so it must be cheap and idempotent.
"""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("xllm-plugin")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"

_registered = False


def register() -> None:
    """Prepare this vLLM process for the plugin's features.

    In the API-server process this is the earliest hook the plugin gets,
    before vLLM loads the model; a bad ``xllm`` config is rejected here so
    startup fails in seconds instead of after the model has loaded.
    """
    global _registered
    if _registered:
        return
    _registered = True

    from xllm_plugin.config import XLLMConfigError, additional_config_from_argv, parse_xllm_config
    from xllm_plugin.status_channel import ensure_status_path

    try:
        config = parse_xllm_config(additional_config_from_argv(sys.argv[1:]))
        if config.xtensor:
            from xllm_plugin.memory.wiring import check_worker, worker_cls_from_argv

            check_worker(config, worker_cls_from_argv(sys.argv[1:]))
        if config.speculative.adaptive and "serve" in sys.argv[1:2]:
            from xllm_plugin.spec import check_command_line

            check_command_line(sys.argv[1:], config.speculative)
        from xllm_plugin.nixl_progress import install_from_env as pause_nixl_progress_thread

        pause_nixl_progress_thread()  # XLLM_NIXL_PROGRESS_DELAY_US (xllm_plugin/nixl_progress.py)
        from xllm_plugin.nixl_affinity import install_from_env as keep_nixl_affinity

        keep_nixl_affinity()  # the engine's compute thread stays on its cores (nixl_affinity.py)
        from xllm_plugin.shm_spin import install_from_env as set_shm_busy_loop

        set_shm_busy_loop()  # XLLM_SHM_POLL_MS: workers sleep, not spin (shm_spin.py)
    except XLLMConfigError as error:
        print(f"xllm-plugin: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    ensure_status_path()
    from xllm_plugin.moe.loader import register_loader, wants_loader

    if wants_loader(sys.argv[1:]):  # --load-format xllm; engine children inherit the argv
        register_loader()
    from xllm_plugin.compat import alias_pixtral_image_processing

    alias_pixtral_image_processing()  # vision models without torchvision (xllm_plugin/compat.py)
