"""Evidence that an instance loaded an encoder output instead of running its encoder:
vLLM's ECExampleConnector logs every load at DEBUG, and nothing else says so (no metric).
Shared by the engine tests of the E -> PD and E -> P -> D paths."""

from __future__ import annotations

import json
from pathlib import Path

EC_LOGGER = "vllm.distributed.ec_transfer.ec_connector.example_connector"
LOAD_LINE = "Success load encoder cache for hash"


def ec_logging_config(path: Path) -> Path:
    """A ``VLLM_LOGGING_CONFIG_PATH`` file: vLLM at INFO, only the connector at DEBUG."""
    path.write_text(json.dumps({
        "version": 1, "disable_existing_loggers": False,
        "formatters": {"plain": {"format": "%(levelname)s %(asctime)s %(name)s: %(message)s"}},
        "handlers": {"out": {"class": "logging.StreamHandler", "formatter": "plain",
                             "level": "DEBUG", "stream": "ext://sys.stdout"}},
        "loggers": {"vllm": {"handlers": ["out"], "level": "INFO", "propagate": False},
                    EC_LOGGER: {"level": "DEBUG"}}}))
    return path


def encoder_loads(log: Path, key: str) -> int:
    """How often the instance logging to ``log`` loaded the encoder output stored as ``key``."""
    return sum(1 for line in log.read_text(errors="replace").splitlines()
               if LOAD_LINE in line and key in line)
