"""A real etcd server (Debian ``etcd-server``) on loopback for the router tests.

One class so that the session fixture and the chaos tests (which stop etcd and start it
again on the same ports and data directory) start it the same way.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import IO


class EtcdServer:
    """One single-member etcd; ``start``/``stop``/``kill`` may repeat, the data stays."""

    def __init__(self, exe: str, client_port: int, peer_port: int) -> None:
        self.exe = exe
        self.client_port = client_port
        self.peer_port = peer_port
        self.data_dir = Path(tempfile.mkdtemp(prefix="xllm-etcd-"))
        self.endpoint = f"127.0.0.1:{client_port}"
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[str] | None = None

    def start(self, timeout_s: float = 20.0) -> None:
        """Start (or restart) and wait until ``/health`` says true."""
        peer = f"http://127.0.0.1:{self.peer_port}"
        self._log = open(self.data_dir / "etcd.log", "a")  # noqa: SIM115
        self.process = subprocess.Popen(
            [self.exe, "--name", "router-test", "--data-dir", str(self.data_dir / "data"),
             "--listen-client-urls", f"http://{self.endpoint}",
             "--advertise-client-urls", f"http://{self.endpoint}",
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"router-test={peer}"],
            stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(f"http://{self.endpoint}/health",  # noqa: S310
                                            timeout=1) as r:
                    if b"true" in r.read():
                        return
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                raise RuntimeError("etcd did not start: "
                                   + (self.data_dir / "etcd.log").read_text()[-3000:])
            time.sleep(0.2)

    def _end(self, sig: signal.Signals) -> None:
        if self.process is not None:
            self.process.send_signal(sig)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def stop(self) -> None:
        """Stop cleanly (SIGTERM)."""
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        """Stop as a crash would (SIGKILL); the data directory survives."""
        self._end(signal.SIGKILL)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)
