"""Start and stop ``mooncake_master`` (Mooncake Store's metadata server) for local runs and tests.

The binary ships in the PyPI wheel ``mooncake-transfer-engine-non-cuda`` (the
``[cpu]`` extra) and is put on PATH next to the venv's python. The master only
keeps metadata (which key lives in which client's memory segment); the bytes
sit in the segments the engines' store clients contribute (``segment_mb``).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from xllm_plugin.launcher.engine import EngineStartError, free_port


def master_binary() -> str:
    exe = shutil.which("mooncake_master") or str(Path(sys.executable).with_name("mooncake_master"))
    if not Path(exe).exists():
        raise EngineStartError("mooncake_master not found: pip install "
                               "mooncake-transfer-engine-non-cuda (the [cpu] extra)")
    return exe


class MooncakeMaster:
    """One ``mooncake_master`` process on loopback (or ``host``); a context manager."""

    def __init__(self, port: int | None = None, host: str = "127.0.0.1",
                 log_path: Path | None = None, extra_args: tuple[str, ...] = ()) -> None:
        self.host = host
        self.port = port or free_port()
        self.metrics_port = free_port()
        self.log_path = log_path or Path(f"/tmp/xllm-mooncake-master-{self.port}.log")
        self.extra_args = extra_args
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        """What ``xllm.kv_store.master`` expects: HOST:PORT."""
        return f"{self.host}:{self.port}"

    def command(self) -> list[str]:
        # Objects stay until memory runs short (no lease-driven churn in a cache).
        return [master_binary(), f"-rpc_port={self.port}", f"-rpc_address={self.host}",
                f"-metrics_port={self.metrics_port}", "-enable_metric_reporting=false",
                *self.extra_args]

    def start(self, timeout_s: float = 20.0) -> MooncakeMaster:
        with open(self.log_path, "w") as log:  # the child keeps its own descriptor
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise EngineStartError(f"mooncake_master exited with {self.process.returncode}: "
                                       f"{self.log_path.read_text()[-2000:]}")
            with socket.socket() as sock:
                sock.settimeout(0.5)
                if sock.connect_ex((self.host, self.port)) == 0:
                    return self
            time.sleep(0.1)
        self.stop()
        raise EngineStartError(f"mooncake_master did not listen on {self.address} "
                               f"within {timeout_s:.0f}s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None

    def __enter__(self) -> MooncakeMaster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
