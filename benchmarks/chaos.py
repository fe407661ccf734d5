"""Long-run chaos benchmark (issue #7): kill -9 an engine every T seconds under load.

Two real vLLM CPU engines (tiny model, float32, prefix caching, one core each; with
``--pin-engines`` each engine's whole process tree, not only its compute threads) behind
an in-process xllm-router with live-stream migration on (``--migration-limit``). Four
phases, the middle two with a fresh router each:

1. *prefill*: time to first token of ``--prefill-samples`` of the prompts, one at a time,
   straight on an unloaded engine (each prompt made unique so the prefix cache misses):
   the yardstick of the issue ("extra latency of a migrated request <= one prefill").
2. *reference*: all ``--requests`` requests through the router, ``--concurrency`` in
   flight, no kills. Records every request's greedy token ids and its latency.
3. *chaos*: the same requests, same concurrency; every ``--kill-every-s`` seconds one
   engine (alternating) is killed with SIGKILL and restarted at once on the same port;
   the router takes it back through its health probes. A kill waits until both engines
   are back in rotation, so there is always a survivor to migrate to, and then (at most
   5 s) until the victim reports ``--concurrency``/4 running requests, so that it dies
   while generating.

Requests are greedy (temperature 0, ``ignore_eos``), half chat and half completions,
ShareGPT first turns cut to varied lengths, ``max_tokens`` uniform in [``--min-tokens``,
``--max-tokens``]. Most are streamed; every ``--non-streamed-every``-th pair (one chat,
one completion) asks for a single JSON answer, which the router migrates by streaming in
the client's place.

A request is *lost* unless it answered 200, streamed ``[DONE]`` with no error event (or,
non-streamed, answered one JSON object) and exactly ``max_tokens`` token ids. A request has
*wrong tokens* when its ids differ from the reference run's. A request is *migrated* when
the router logged that it moved it.
*Extra latency* of a migrated request: time from the kill of its engine to the client's
receipt of the first *resumed* token (the token at the index the router logged as the
seam), split into kill -> the router starts the migration (the dead process's sockets
close, the router reads the break) and migration start -> first resumed token (routing,
the resumed prefill on the survivor, one decode step). The end-to-end difference against
the reference run is reported as well (``extra_e2e_*``), but it also holds the queueing
of a cluster that runs on one engine while the other restarts. The idle prefill of
phase 1 is the issue's yardstick; the state a resumed prefill lands in has its own:
``ttft_after_seam_*``, the TTFT of fresh requests sent within 1 s after a migration
started, i.e. one prefill on the same survivor at the same moment.

4. *exit*: with both engines serving again, each is killed once more with 8 streams sent
   straight to it (no router): kill -> those clients read the break
   (``engine_exit_to_break_*``), the floor under any router's detection of a crash.

``--requests`` defaults to 6000, not 1000: under closed-loop load 1000 requests end in
about a minute here, shorter than one engine restart under load (30-130 s on two shared
cores, nearly all of it Python imports), so they would see a single kill; 6000 gave three
kills and the whole run stays under 20 minutes.

    flock /tmp/xllm-vllm.lock python benchmarks/chaos.py --pin-engines   # ~15 min
    flock /tmp/xllm-vllm.lock python benchmarks/chaos.py --requests 100 --kill-every-s 20

Writes benchmarks/results/chaos.json, chaos.md, chaos.png and chaos_timeline.json
(``--out`` changes the name); ``--render-only`` rebuilds the .md and .png from those.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import random
import shlex
import signal
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
MODEL_NAME = "tiny"
# Long enough to outlast the kill; with a prompt of --max-chars it fits max_model_len 2048.
EXIT_PROBE_TOKENS = 1024


@dataclass
class Job:
    """One request of the workload: the same body in the reference and the chaos phase."""

    idx: int
    path: str
    body: dict[str, Any]
    max_tokens: int

    @property
    def streamed(self) -> bool:
        return bool(self.body.get("stream"))


@dataclass
class Outcome:
    """What the client saw for one request."""

    idx: int
    start: float
    end: float = 0.0
    status: int = 0
    done: bool = False
    error: str | None = None
    ids: list[int] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)  # arrival of each token id
    served_by: str | None = None
    completion_tokens: int | None = None

    def complete(self, want_tokens: int) -> bool:
        return (self.status == 200 and self.done and self.error is None
                and len(self.ids) == want_tokens and self.completion_tokens == want_tokens)


def build_workload(n: int, seed: int, min_tokens: int, max_tokens: int,
                   max_chars: int, non_streamed_every: int = 0) -> list[Job]:
    """ShareGPT first turns (cycled if ``n`` > 1000), each cut to a random length; every
    ``non_streamed_every``-th request asks for one JSON answer instead of a stream."""
    from router.bench.prompts import load_prompts

    rng = random.Random(seed)
    try:
        prompts = load_prompts("sharegpt", 1000, max_chars=max_chars)
    except FileNotFoundError:
        words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
        prompts = [" ".join(rng.choice(words) for _ in range(rng.randint(8, 300)))
                   for _ in range(1000)]
    jobs = []
    for i in range(n):
        text = prompts[i % len(prompts)]
        cut = rng.randint(min(len(text), 40), len(text))
        text = text[:cut] if i < len(prompts) else f"({i}) {text[:cut]}"
        want = rng.randint(min_tokens, max_tokens)
        common = {"model": MODEL_NAME, "stream": True, "max_tokens": want, "temperature": 0,
                  "ignore_eos": True, "return_token_ids": True,
                  "stream_options": {"include_usage": True}}
        # by pairs, so that chat (odd i) and completions (even i) both go unstreamed
        if non_streamed_every and (i // 2) % non_streamed_every == non_streamed_every - 1:
            common["stream"] = False
            del common["stream_options"]
        if i % 2:
            jobs.append(Job(i, "/v1/chat/completions",
                            {"messages": [{"role": "user", "content": text}], **common}, want))
        else:
            jobs.append(Job(i, "/v1/completions", {"prompt": text, **common}, want))
    return jobs


async def send(session: aiohttp.ClientSession, url: str, job: Job, phase: str,
               timeout_s: float) -> Outcome:
    """Stream one request, recording token ids and their arrival times."""
    out = Outcome(job.idx, time.perf_counter())
    try:
        async with asyncio.timeout(timeout_s):
            async with session.post(url + job.path, json=job.body,
                                    headers={"X-Request-Id": f"{phase}-{job.idx}"}) as r:
                out.status = r.status
                out.served_by = r.headers.get("x-xllm-instance")
                if r.status != 200:
                    out.error = (await r.text())[:300]
                    return out
                if not job.streamed:
                    answer = await r.json()
                    out.done = True
                    for choice in answer.get("choices") or ():
                        out.ids.extend(choice.get("token_ids") or ())
                    out.completion_tokens = (answer.get("usage") or {}).get("completion_tokens")
                    return out
                async for raw in r.content:
                    line = raw.strip()
                    if not line.startswith(b"data: "):
                        continue
                    if line == b"data: [DONE]":
                        out.done = True
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        out.error = json.dumps(event["error"])[:300]
                        continue
                    now = time.perf_counter()
                    for choice in event.get("choices") or ():
                        ids = choice.get("token_ids") or ()
                        out.ids.extend(ids)
                        out.token_times.extend([now] * len(ids))
                    usage = event.get("usage")
                    if usage:
                        out.completion_tokens = usage.get("completion_tokens")
    except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
        out.error = repr(exc)[:300]
    finally:
        out.end = time.perf_counter()
    return out


# How the router words a break after the first byte (anything else it logs per request
# as "request ID: ..." is a failure before the first byte, which it retries whole).
MID_STREAM = ("mid-stream", "was silent for", "ended the stream before")


@dataclass
class Move:
    """One migration the router logged: when (perf_counter, the router runs in-process)
    and after how many generated tokens (the index of the first resumed token)."""

    at: float
    generated: int
    message: str
    source: str = ""  # the instance it left
    reason: str = ""  # what broke: error, eof, dead (a liveness probe), ...


class MigrationLog(logging.Handler):
    """Collects the router's migration log lines (request id -> what happened)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.migrated: dict[str, list[Move]] = {}
        self.not_migrated: dict[str, str] = {}
        self.retried: dict[str, str] = {}  # failed before the first byte: retried whole
        self.dead_probes: list[tuple[float, str]] = []  # (perf_counter, instance id)

    def emit(self, record: logging.LogRecord) -> None:
        msg = str(record.msg)
        if msg.startswith("request %s: migrating from"):
            assert isinstance(record.args, tuple)
            self.migrated.setdefault(str(record.args[0]), []).append(
                Move(time.perf_counter(), int(record.args[3]), record.getMessage(),
                     source=str(record.args[1]), reason=str(record.args[4])))
        elif msg.startswith("instance %s: liveness probe failed"):
            assert isinstance(record.args, tuple)
            self.dead_probes.append((time.perf_counter(), str(record.args[0])))
        elif msg.startswith("request %s: not migrated"):
            self.not_migrated[str(record.args[0])] = record.getMessage()
        elif msg == "request %s: %s" and isinstance(record.args, tuple) and not any(
                s in str(record.args[1]) for s in MID_STREAM):
            self.retried[str(record.args[0])] = record.getMessage()


class Engines:
    """The two engines, each restartable on its own port and core."""

    def __init__(self, log_dir: Path, pin: bool = False) -> None:
        from xllm_plugin.launcher.engine import EngineSpec, free_port
        from xllm_plugin.models import model_path

        self.log_dir = log_dir
        self.specs = [EngineSpec(model=model_path("tiny"), port=free_port(),
                                 served_model_name=MODEL_NAME, plugin=False, cpu_bind=str(i),
                                 pin_process=pin,
                                 max_model_len=2048,
                                 extra_args=["--dtype", "float32", "--enable-prefix-caching"])
                      for i in range(2)]
        self.procs: list[Any] = [None, None]
        self.starts = [0, 0]
        self.startup_s: list[float] = []

    def ids(self) -> list[str]:
        return [f"e{i}" for i in range(2)]

    def instance_specs(self) -> list[str]:
        return [f"{s.url};id=e{i}" for i, s in enumerate(self.specs)]

    def _process(self, i: int) -> Any:
        """A new process for engine ``i`` (its log file numbered by start)."""
        from xllm_plugin.launcher.engine import EngineProcess

        self.starts[i] += 1
        self.procs[i] = EngineProcess(self.specs[i], log_path=self.log_dir /
                                      f"engine{i}-start{self.starts[i]}.log")
        return self.procs[i]

    def start(self, i: int) -> None:
        """Restart engine ``i``; blocks until it answers /health."""
        proc = self._process(i)
        proc.start(timeout_s=300)
        self.startup_s.append(proc.startup_s or 0.0)

    def start_all(self) -> None:
        from xllm_plugin.launcher.engine import start_engines

        procs = [self._process(i) for i in range(2)]
        start_engines(procs, timeout_s=300)
        self.startup_s.extend(p.startup_s or 0.0 for p in procs)

    def kill(self, i: int) -> float:
        """SIGKILL to the whole process group; returns when (perf_counter) it was reaped."""
        self.procs[i].kill()
        self.procs[i].process.wait(30)
        return time.perf_counter()

    def freeze(self, i: int, core_only: bool = False) -> None:
        """SIGSTOP to the whole process group: a hung engine (a deadlock, a stuck device)
        whose sockets stay open, unlike a killed one's. ``core_only``: to the EngineCore
        and its worker only, so the HTTP server still answers (a hung engine core)."""
        if not core_only:
            self.procs[i].kill(signal.SIGSTOP)
            return
        import psutil

        for child in psutil.Process(self.procs[i].process.pid).children(recursive=True):
            if child.name().startswith(("VLLM::EngineCore", "VLLM::Worker")):
                child.suspend()

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc is not None:
                proc.stop()


def router_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The router settings this command line sets; the rest are the router's defaults."""
    flags = {"migration_limit": args.migration_limit,
             "stall_timeout_multiple": args.stall_multiple,
             "liveness_probe_multiple": args.liveness_multiple,
             "liveness_stuck_s": args.liveness_stuck_s}
    return {name: value for name, value in flags.items() if value is not None}


async def start_router(instances: list[str],
                       overrides: dict[str, Any]) -> tuple[Any, Any, str]:
    """An in-process router on a free port (same settings as the migration test)."""
    from router.config import RouterConfig
    from router.server.app import Router, listen

    settings: dict[str, Any] = {"instances": instances, "scrape_interval_s": 0.2,
                                "unhealthy_after": 2, "first_byte_timeout_s": 120,
                                "idle_timeout_s": 30, **overrides}
    router = Router(RouterConfig.from_args(settings))
    runner, url = await listen(router)
    deadline = time.monotonic() + 60
    while not all(i.healthy for i in router.load.instances.values()):
        if time.monotonic() > deadline:
            raise RuntimeError("router does not see both engines healthy")
        await asyncio.sleep(0.1)
    return router, runner, url


def router_counter(router: Any, name: str, label: str) -> dict[str, float]:
    """One of the router's own counters (or histogram series), summed by ``label``."""
    counts: dict[str, float] = {}
    for line in router.metrics.render().decode().splitlines():
        if line.startswith(name + "{"):
            value = line.split(f'{label}="', 1)[1].split('"', 1)[0]
            counts[value] = counts.get(value, 0.0) + float(line.rsplit(" ", 1)[1])
    return counts


def detection_keys(router: Any) -> dict[str, float | None]:
    """How the chaos phase's breaks were detected, from the router's metrics: a failed
    liveness probe of a silent stream, the dead process's connection closing, or the
    silence limit; and what the probes of live instances cost."""
    reasons = router_counter(router, "xllm_router_migrations_total", "reason")
    probes = router_counter(router, "xllm_router_liveness_probes_total", "outcome")
    seconds = router_counter(router, "xllm_router_liveness_probe_seconds_sum", "outcome")
    alive = probes.get("alive", 0.0)
    return {
        "migrations_after_dead_probe": reasons.get("dead", 0.0),
        "migrations_after_no_progress": reasons.get("stuck", 0.0),
        "migrations_after_broken_connection": reasons.get("error", 0.0) + reasons.get("eof", 0.0),
        "migrations_after_silence_limit": reasons.get("stall", 0.0) + reasons.get("idle", 0.0),
        "liveness_probes_alive": alive,
        "liveness_probes_dead": probes.get("dead", 0.0),
        "liveness_probe_alive_mean_ms": rnd(seconds.get("alive", 0.0) * 1000 / alive)
        if alive else None,
    }


@dataclass
class Chaos:
    """Kill schedule and what it observed (times relative to the phase start)."""

    every_s: float
    first_s: float
    min_running: int  # a kill waits (at most aim_s) until the victim reports this many running
    fault: str = "kill"  # "kill": SIGKILL; "freeze"/"hang_core": SIGSTOP, later SIGKILL
    aim_s: float = 5.0
    kills: list[dict[str, Any]] = field(default_factory=list)


async def chaos_loop(chaos: Chaos, engines: Engines, router: Any, t0: float,
                     stop: asyncio.Event) -> None:
    """Kill one engine every ``every_s`` (alternating), restart it, wait until it serves."""
    victim = 0
    next_kill = t0 + chaos.first_s
    while not stop.is_set():
        wait = next_kill - time.perf_counter()
        if wait > 0:
            try:
                await asyncio.wait_for(stop.wait(), wait)
                return
            except TimeoutError:
                pass
        if not all(i.healthy for i in router.load.instances.values()):
            await asyncio.sleep(0.1)  # a kill needs a survivor: wait for both in rotation
            continue
        instance = router.load.instances[f"e{victim}"]
        aim = time.perf_counter() + chaos.aim_s
        while instance.running < chaos.min_running and time.perf_counter() < aim:
            await asyncio.sleep(0.02)  # kill while the engine itself is generating
        inflight, running = instance.inflight, instance.running
        t_kill = time.perf_counter()
        if chaos.fault in ("freeze", "hang_core"):
            await asyncio.to_thread(engines.freeze, victim, chaos.fault == "hang_core")
        else:  # watched while the kill runs: the router may see the death before the reaping
            killing = asyncio.ensure_future(asyncio.to_thread(engines.kill, victim))
        while instance.healthy:
            await asyncio.sleep(0.02)
        detected = time.perf_counter()
        if chaos.fault != "kill":  # frozen until the router holds no request on it (or 120 s)
            while instance.inflight and time.perf_counter() - t_kill < 120:
                await asyncio.sleep(0.05)
            killing = asyncio.ensure_future(asyncio.to_thread(engines.kill, victim))
        record: dict[str, Any] = {"engine": f"e{victim}", "t_kill": t_kill - t0,
                                  "reaped_ms": (await killing - t_kill) * 1000,
                                  "inflight_on_victim": inflight,
                                  "running_on_victim": running,
                                  "detected_s": detected - t_kill}
        await asyncio.to_thread(engines.start, victim)
        record["engine_up_s"] = time.perf_counter() - t_kill
        while not instance.healthy:
            await asyncio.sleep(0.05)
        record["recovery_s"] = time.perf_counter() - t_kill
        record["t_back"] = time.perf_counter() - t0
        chaos.kills.append(record)
        victim = 1 - victim
        next_kill = max(t_kill + chaos.every_s, time.perf_counter() + 1.0)


async def run_phase(name: str, url: str, jobs: Sequence[Job], concurrency: int,
                    timeout_s: float, router: Any, chaos: Chaos | None,
                    engines: Engines) -> tuple[dict[int, Outcome], list[tuple[float, ...]], float]:
    """All ``jobs`` with ``concurrency`` in flight; the outcomes, a timeline and t0."""
    from tqdm import tqdm

    outcomes: dict[int, Outcome] = {}
    queue = list(reversed(jobs))
    inflight = 0
    timeline: list[tuple[float, ...]] = []
    t0 = time.perf_counter()
    stop = asyncio.Event()
    bar = tqdm(total=len(jobs), desc=name, unit="req", file=sys.stderr, mininterval=2)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=None)) as session:

        async def worker() -> None:
            nonlocal inflight
            while queue:
                job = queue.pop()
                inflight += 1
                outcome = await send(session, url, job, name, timeout_s)
                inflight -= 1
                outcomes[job.idx] = outcome
                bar.update(1)
                if not outcome.complete(job.max_tokens):
                    bar.set_postfix(lost=sum(1 for j in jobs if j.idx in outcomes
                                             and not outcomes[j.idx].complete(j.max_tokens)))

        async def sample() -> None:
            while not stop.is_set():
                loads = [router.load.instances[i] for i in engines.ids()]
                timeline.append((time.perf_counter() - t0, inflight, len(outcomes),
                                 *(float(x.healthy) for x in loads), *(x.inflight for x in loads)))
                await asyncio.sleep(0.25)

        sampler = asyncio.ensure_future(sample())
        killer = (asyncio.ensure_future(chaos_loop(chaos, engines, router, t0, stop))
                  if chaos is not None else None)
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        stop.set()
        await sampler
        if killer is not None:
            await killer  # a restart under way finishes, so its recovery time is known
    bar.close()
    return outcomes, timeline, t0


async def measure_prefill(engine_url: str, jobs: Sequence[Job], samples: int) -> list[float]:
    """TTFT (ms) of ``samples`` workload prompts on an idle engine, one at a time, each made
    unique with a leading tag so the engine's prefix cache cannot serve it."""
    ttfts = []
    async with aiohttp.ClientSession() as session:
        for k, job in enumerate(jobs[:samples]):
            body = json.loads(json.dumps(job.body))
            body["max_tokens"] = 1
            if "prompt" in body:
                body["prompt"] = f"[prefill probe {k}] " + body["prompt"]
            else:
                body["messages"][0]["content"] = (f"[prefill probe {k}] "
                                                  + body["messages"][0]["content"])
            began = time.perf_counter()
            async with session.post(engine_url + job.path, json=body) as r:
                async for raw in r.content:
                    if raw.startswith(b"data: {"):
                        ttfts.append((time.perf_counter() - began) * 1000)
                        break
                await r.read()
    return ttfts


async def measure_exit_to_break(engines: Engines, jobs: Sequence[Job],
                                streams: int = 8) -> list[float]:
    """Per stream, ms from SIGKILL of an engine to a direct client (no router) reading the
    break: each engine in turn is killed once ``streams`` streams run on it (called with
    both serving; the first one killed stays down).

    The floor of any router's detection of a crashed engine (our reading, not traced: the
    kernel closes a killed process's sockets only at the end of its exit, after freeing its
    memory)."""
    breaks: list[float] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        for i, spec in enumerate(engines.specs):
            flowing = asyncio.Event()
            killed_at: list[float] = []

            async def stream(job: Job) -> None:
                body = json.loads(json.dumps(job.body))
                body.update(max_tokens=EXIT_PROBE_TOKENS, stream=True)
                try:
                    async with session.post(spec.url + job.path, json=body) as r:
                        async for _ in r.content:
                            flowing.set()
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    pass
                if killed_at:
                    breaks.append((time.perf_counter() - killed_at[0]) * 1000)

            tasks = [asyncio.ensure_future(stream(job))
                     for job in [j for j in jobs if j.streamed][:streams]]
            await asyncio.wait_for(flowing.wait(), 60)
            await asyncio.sleep(0.5)  # every stream decoding
            killed_at.append(time.perf_counter())
            engines.procs[i].kill()
            await asyncio.gather(*tasks)
            await asyncio.to_thread(engines.procs[i].process.wait, 30)
    return breaks


# A probe outside this benchmark (not committed; one engine, 8 streams, one kill per variant).
EXIT_FLOOR_PROBE = (
    "A probe on 2026-12-05 fits that reading: the break came 166 ms after the SIGKILL with "
    "the engine's processes pinned to one core, 136 ms unpinned, 152 ms with a 4 GiB "
    "instead of a 1 GiB KV cache (worker RSS 4.8 instead of 1.7 GB) and 181 ms with the "
    "API server (728 MB RSS) killed before the rest: the KV cache's size does not lengthen "
    "it, as expected if the API server's own exit sets the floor.")


def pct(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def rnd(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


def ttft_after_seams(run: dict[int, Outcome], seams: Sequence[float], skip: set[int],
                     within_s: float = 1.0) -> list[float]:
    """TTFT (ms) of the requests sent within ``within_s`` after a migration started.

    They meet the survivor in the state the resumed prefill meets it (the kill's streams
    and retries arriving at once, one engine restarting beside it), so their TTFT is "one
    prefill" at that moment, the yardstick an idle-engine prefill is not.
    """
    out = []
    for o in run.values():
        if o.idx in skip or not o.token_times:
            continue
        if any(0.0 <= o.start - seam <= within_s for seam in seams):
            out.append((o.token_times[0] - o.start) * 1000)
    return out


def summarise(jobs: Sequence[Job], ref: dict[int, Outcome], run: dict[int, Outcome],
              migrations: MigrationLog, router_counts: dict[str, float], chaos: Chaos,
              t0: float, prefill_ms: Sequence[float], ref_lost: int,
              ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The flat numeric result keys (see the module docstring for the definitions), and
    the ids behind the failures (for the markdown and the details file)."""
    lost = [j.idx for j in jobs if not run[j.idx].complete(j.max_tokens)]
    migrated = {int(rid.split("-", 1)[1]) for rid in migrations.migrated
                if rid.startswith("chaos-")}
    wrong = [j.idx for j in jobs if j.idx not in lost and run[j.idx].ids != ref[j.idx].ids]
    extra, to_router, resume, extra_e2e, seam_tokens = [], [], [], [], []
    for kill in chaos.kills:
        kill["migrated"] = 0
    for idx in sorted(migrated - set(lost)):
        o, move = run[idx], migrations.migrated[f"chaos-{idx}"][0]
        kills = [k for k in chaos.kills if t0 + k["t_kill"] <= move.at]
        if not kills or move.generated >= len(o.token_times):
            continue
        kill = kills[-1]  # the kill that broke this stream: the last one before the move
        kill["migrated"] += 1
        t_kill, t_resumed = t0 + kill["t_kill"], o.token_times[move.generated]
        extra.append((t_resumed - t_kill) * 1000)
        to_router.append((move.at - t_kill) * 1000)
        resume.append((t_resumed - move.at) * 1000)
        extra_e2e.append(((o.end - o.start) - (ref[idx].end - ref[idx].start)) * 1000)
        seam_tokens.append(move.generated)
    non_streamed = {j.idx for j in jobs if not j.streamed}
    seams = [moves[0].at for rid, moves in migrations.migrated.items() if rid.startswith("chaos-")]
    seam_ttft = ttft_after_seams(run, seams, migrated | non_streamed)
    ttft_ref = [(o.token_times[0] - o.start) * 1000 for o in ref.values() if o.token_times]
    e2e_ref = [(o.end - o.start) * 1000 for o in ref.values()]
    e2e_run = [(o.end - o.start) * 1000 for o in run.values()]
    duration_ref = max(o.end for o in ref.values()) - min(o.start for o in ref.values())
    duration_run = max(o.end for o in run.values()) - t0
    recovery = [k["recovery_s"] for k in chaos.kills]
    # A failed probe outside every kill's outage (kill -> back in rotation) of that engine
    # took a live instance for dead; the streams it moved then moved for nothing.
    def outside_outages(at: float, iid: str) -> bool:
        return not any(k["engine"] == iid and t0 + k["t_kill"] <= at <= t0 + k["t_back"]
                       for k in chaos.kills)
    false_alarms = sum(1 for at, iid in migrations.dead_probes if outside_outages(at, iid))
    false_moves = sum(1 for moves in migrations.migrated.values() for m in moves
                      if m.reason in ("dead", "stuck") and outside_outages(m.at, m.source))
    return {
        "requests_total": len(jobs),
        "requests_lost": len(lost),
        "streams_with_wrong_tokens": len(wrong),
        "streams_with_wrong_tokens_migrated": len(set(wrong) & migrated),
        "migrated_requests": len(migrated),
        "non_streamed_requests": len(non_streamed),
        "non_streamed_migrated": len(migrated & non_streamed),
        "non_streamed_lost": len(set(lost) & non_streamed),
        "retried_before_first_byte": sum(1 for r in migrations.retried if r.startswith("chaos-")),
        "retried_before_first_byte_reference": sum(1 for r in migrations.retried
                                                   if r.startswith("reference-")),
        "migrations_resumed_router_metric": router_counts.get("resumed", 0.0),
        "migrations_failed_router_metric": router_counts.get("failed", 0.0),
        "migrations_refused_router_metric": sum(v for k, v in router_counts.items()
                                                if k not in ("resumed", "failed")),
        "extra_latency_p50_ms": rnd(pct(extra, 50)),
        "extra_latency_p99_ms": rnd(pct(extra, 99)),
        "extra_latency_max_ms": rnd(max(extra) if extra else None),
        "kill_to_migration_start_p50_ms": rnd(pct(to_router, 50)),
        "kill_to_migration_start_p99_ms": rnd(pct(to_router, 99)),
        "migration_start_to_resumed_token_p50_ms": rnd(pct(resume, 50)),
        "migration_start_to_resumed_token_p99_ms": rnd(pct(resume, 99)),
        "extra_e2e_latency_p50_ms": rnd(pct(extra_e2e, 50)),
        "extra_e2e_latency_p99_ms": rnd(pct(extra_e2e, 99)),
        "prefill_time_p50_ms": rnd(pct(prefill_ms, 50)),
        "prefill_time_p99_ms": rnd(pct(prefill_ms, 99)),
        "ttft_under_load_p50_ms_reference": rnd(pct(ttft_ref, 50)),
        "ttft_under_load_p99_ms_reference": rnd(pct(ttft_ref, 99)),
        "ttft_after_seam_p50_ms": rnd(pct(seam_ttft, 50)),
        "ttft_after_seam_p99_ms": rnd(pct(seam_ttft, 99)),
        "ttft_after_seam_requests": len(seam_ttft),
        "tokens_before_seam_p50": pct(seam_tokens, 50),
        "kills": len(chaos.kills),
        "recovery_time_s": rnd(statistics.median(recovery), 2) if recovery else None,
        "recovery_time_max_s": rnd(max(recovery), 2) if recovery else None,
        "liveness_false_alarms": false_alarms,
        "liveness_false_alarm_moves": false_moves,
        "marked_unhealthy_p50_ms": rnd(pct([k["detected_s"] * 1000 for k in chaos.kills], 50)),
        "engine_restart_p50_s": rnd(pct([k["engine_up_s"] for k in chaos.kills], 50), 2),
        "reference_requests_lost": ref_lost,
        "e2e_p50_ms_reference": rnd(pct(e2e_ref, 50)),
        "e2e_p50_ms_chaos": rnd(pct(e2e_run, 50)),
        "e2e_p99_ms_reference": rnd(pct(e2e_ref, 99)),
        "e2e_p99_ms_chaos": rnd(pct(e2e_run, 99)),
        "duration_s_reference": rnd(duration_ref),
        "duration_s_chaos": rnd(duration_run),
    }, {"lost_ids": lost[:50], "wrong_ids": wrong[:50]}


def plot(timeline: Sequence[Sequence[float]], chaos: Chaos, path: Path) -> bool:
    """Completions per second, requests in flight (per engine where sampled) and each
    engine's health over time; kills marked, outages (kill -> back in rotation) shaded."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing (pip install -e '.[plots]'): no plot")
        return False
    t = [row[0] for row in timeline]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 5.2), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 2]})
    rate_t, rate = [], []
    for a, b in zip(timeline, timeline[4:]):  # completions per second over ~1 s windows
        rate_t.append(b[0])
        rate.append((b[2] - a[2]) / (b[0] - a[0]))
    top.plot(rate_t, rate, color="#2a9d5c", lw=1)
    top.set_ylabel("completed req/s", color="#2a9d5c")
    cumulative = top.twinx()
    cumulative.plot(t, [row[2] for row in timeline], color="#555555", lw=1, ls="--")
    cumulative.set_ylabel("completed (total)", color="#555555")
    per_engine = len(timeline[0]) >= 7 if timeline else False  # t, inflight, done, 2 health,
    for i, color in ((0, "#3b7dd8"), (1, "#e08a1e")):  # then 2 per-engine in-flight counts
        if per_engine:
            bottom.plot(t, [row[5 + i] for row in timeline], color=color, lw=1,
                        label=f"e{i} in flight")
        bottom.fill_between(t, [-3 - 3 * i + 2.5 * row[3 + i] for row in timeline],
                            -3 - 3 * i, color=color, alpha=0.5, step="post",
                            label=f"e{i} healthy")
    bottom.plot(t, [row[1] for row in timeline], color="black", lw=1, label="client in flight")
    bottom.set_ylabel("requests in flight")
    bottom.set_xlabel("seconds into the chaos phase")
    bottom.legend(fontsize=7, loc="upper right", ncol=3)
    for ax in (top, bottom):
        for k in chaos.kills:
            ax.axvline(k["t_kill"], color="#d62728", lw=1)
            ax.axvspan(k["t_kill"], k["t_back"], color="#d62728", alpha=0.07)
    top.set_title("kill -9 (red line) until the killed engine is back in rotation (shaded)",
                  fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


FAULTS = {
    "freeze": """ **Fault: freeze** (`--fault freeze`): the engine's process group is
stopped (SIGSTOP), so its sockets stay open and nothing closes a connection, as in a hung
engine; it is killed and restarted only once the router holds no request on it. Below,
"kill" means that freeze, and "reaped" the kill after it.""",
    "hang_core": """ **Fault: hung engine core** (`--fault hang_core`): the engine's
EngineCore and worker processes are stopped (SIGSTOP) while its HTTP server runs on and
answers `/health`; it is killed and restarted only once the router holds no request on it.
Below, "kill" means that hang, and "reaped" the kill after it.""",
}


def write_markdown(result: dict[str, Any], chaos: Chaos, path: Path, png: str | None) -> None:
    rows = "\n".join(f"| `{k}` | {v} |" for k, v in result.items()
                     if k not in ("command", "date", "machine", "lost_ids", "wrong_ids",
                                  "router_code", "not_migrated_log"))
    kills = "\n".join(
        f"| {k['engine']} | {k['t_kill']:.1f} | {k['inflight_on_victim']} "
        f"| {k['running_on_victim']} | {k['migrated']} | {k.get('reaped_ms', float('nan')):.0f} "
        f"| {k['detected_s'] * 1000:.0f} | {k['engine_up_s']:.1f} | {k['recovery_s']:.1f} |"
        for k in chaos.kills)
    gaps = [b["t_kill"] - a["t_kill"] for a, b in zip(chaos.kills, chaos.kills[1:])]
    actual = f" (here one every {statistics.mean(gaps):.0f} s on average)" if gaps else ""
    text = f"""# Chaos: kill -9 an engine again and again under load (`benchmarks/chaos.py`)

Two stock vLLM CPU engines (tiny Llama, float32, prefix caching, one core each) behind an
in-process xllm-router with migration on; {result['requests_total']} greedy requests
(half chat, half completions, ShareGPT prompts of varied length; streamed except
{result.get('non_streamed_requests', 0)} that ask for one JSON answer), {result['concurrency']} in
flight. The same requests run once with no kills (reference: token ids and latency) and once
with one engine killed (SIGKILL) and restarted at once, a kill at most every {chaos.every_s:g} s and
only once both engines serve again{actual}.{FAULTS.get(result.get('fault', 'kill'), '')}

Definitions: *lost* = no 200, no `[DONE]`, an error event, or fewer/more than `max_tokens`
ids; *wrong tokens* = ids differ from the reference run; *migrated* = the router logged the
move; *extra latency* = time from the kill to the client's receipt of the first resumed token
(the token at the seam index the router logged), split into kill -> migration start (the dead
process's sockets close and the router reads the break) and migration start -> first resumed
token (routing + resumed prefill on the survivor + one decode step); *extra e2e* = e2e latency minus
the same request's e2e in the reference run (includes queueing on the one surviving
engine); *prefill time* = TTFT of the prompts one at a time on an idle engine.

| key | value |
|---|---|
{rows}

Kills:

| engine | t kill (s) | streams on it (router) | running (engine metric) | migrated | killed API server reaped (ms) | marked unhealthy (ms) | engine up (s) | back in rotation (s) |
|---|---|---|---|---|---|---|---|---|
{kills}

{f'![in flight and completed over time]({png})' if png else ''}

Rerun: `{result['command']}` ({result['date']}, {result['machine']}). Router code imported
from `{result.get('router_code', '?')}` (a `/tmp/...` path is a `git archive` snapshot of a
commit put first on `PYTHONPATH`, so that work in progress in the tree does not leak in:
`git archive COMMIT | tar -x -C /tmp/snap && PYTHONPATH=/tmp/snap flock ... chaos.py`). Engine
and router logs: `--log-dir` (default `/tmp/xllm-chaos`).

## Discussion

{discussion(result)}
{other_runs(path)}"""
    path.write_text(text)


def other_runs(path: Path) -> str:
    """A table of every chaos*.json beside ``path`` (other sizes and router variants)."""
    rows = []
    for other in sorted(path.parent.glob("chaos*.json")):
        if other.stem.endswith("_timeline"):
            continue
        r = json.loads(other.read_text())
        timeline = other.with_name(f"{other.stem}_timeline.json")
        if timeline.exists():
            r = {**r, **json.loads(timeline.read_text()).get("details", {})}
        rows.append(
            f"| `{other.name}` | {r.get('router_commit', r.get('router_code', '?'))} "
            f"| {r['requests_total']} | {r['kills']} | {r['requests_lost']} "
            f"| {r['streams_with_wrong_tokens']} | {r['migrated_requests']} "
            f"| {r.get('retried_before_first_byte', '-')} "
            f"| {r.get('retried_before_first_byte_reference', '-')} "
            f"| {r['extra_latency_p50_ms']} / {r['extra_latency_p99_ms']} "
            f"| {r['kill_to_migration_start_p50_ms']} | {r['prefill_time_p50_ms']} "
            f"| {r['recovery_time_s']} |")
    if len(rows) < 2:
        return ""
    return """
## All runs in benchmarks/results

| file | router | requests | kills | lost | wrong tokens | migrated | retried before 1st byte (chaos) | same, reference phase | extra latency p50 / p99 ms | kill -> migration start p50 ms | prefill p50 ms | recovery p50 s |
|---|---|---|---|---|---|---|---|---|---|---|---|---|
""" + "\n".join(rows) + "\n"


def detection(r: dict[str, Any]) -> str:
    """How the router learnt of the kills, for the latency split."""
    if r.get("migrations_after_dead_probe") is None:  # runs before liveness probing
        return ("about the time the killed API server takes to exit, see the kills table: its "
                "sockets close only at the end of its exit, and the router acts on the first "
                "read error")
    stuck = r.get("migrations_after_no_progress")
    return (f"{r['migrations_after_dead_probe']:.0f} migrations began when a liveness probe "
            "of the silent instance went unanswered, "
            + (f"{stuck:.0f} when it answered but its engine's token counters stood still, "
               if stuck is not None else "")
            + f"{r['migrations_after_broken_connection']:.0f} when the connection broke (a "
            "killed process's exit closing it, or the router cutting the streams of an "
            "instance its scrapes had failed), "
            f"{r['migrations_after_silence_limit']:.0f} at the silence limit")


def discussion(r: dict[str, Any]) -> str:
    """Plain-language reading of the numbers in ``r`` (no fixed claims about them)."""
    lines = []
    lost, total = r["requests_lost"], r["requests_total"]
    lines.append(f"- **Requests lost: {lost} of {total}**" + (
        " - every stream ended with a 200, `[DONE]` and all its tokens." if not lost else
        f" (ids {r['lost_ids'][:10]}; router log: {r['not_migrated_log'][:3]})."))
    wrong = r["streams_with_wrong_tokens"]
    lines.append(f"- **Streams with wrong tokens: {wrong}**"
                 f" ({r['streams_with_wrong_tokens_migrated']} of them migrated): greedy float32 "
                 "continuations from prompt + generated ids "
                 + ("equal the uninterrupted run." if not wrong else
                    "differ from the reference in those streams (batch-dependent numerics or a "
                    "seam bug: compare migrated and not migrated)."))
    if r["kills"]:
        per_kill = r["migrated_requests"] / r["kills"]
        lines.append(
            f"- {r['migrated_requests']} streams migrated over {r['kills']} kills "
            f"({per_kill:.1f} per kill; {r['migrations_resumed_router_metric']:.0f} resumed by "
            f"the router's own metric, {r['migrations_failed_router_metric']:.0f} failed "
            "attempts). Fewer than the router's in-flight count on the victim: with the "
            "tiny model the engine runs ahead of the relay (router and client share the two "
            "cores with the engines), so some streams were finished at the engine and "
            "completed from bytes already received.")
    if "retried_before_first_byte" in r:
        lines.append(
            f"- {r['retried_before_first_byte']} requests of the chaos phase failed before "
            "their first byte (sent to an engine that was dying or not yet marked unhealthy) "
            "and were retried whole on the other engine, as designed; they are not counted "
            "as migrated. A kill can catch no stream mid-generation at all (a row with 0 "
            "migrated in the kills table).")
        before = r["retried_before_first_byte_reference"]
        lines.append(
            f"- In the reference phase, with no kill, {before} requests failed before the "
            "first byte" + (
                " (`ServerDisconnectedError`) and were retried on the other engine: a router "
                "that keeps idle upstream connections longer than vLLM (which closes them "
                "after 5 s, `VLLM_HTTP_TIMEOUT_KEEP_ALIVE`) sometimes sends on a connection the "
                "engine is closing. With both engines up the retry saves the request; with one "
                "engine down (most of the chaos phase) it has no other instance to go to and "
                "the request would be lost." if before else "."))
    prefill = r["prefill_time_p50_ms"]
    extra = r["extra_latency_p50_ms"]
    if extra is not None and prefill:
        verdict = ("within" if r["extra_latency_p99_ms"] <= prefill else
                   "above")
        lines.append(
            f"- **Extra latency p50 {extra:.0f} ms / p99 {r['extra_latency_p99_ms']:.0f} ms vs "
            f"one prefill p50 {prefill:.0f} ms: {verdict} the issue's target** "
            f"({extra / prefill:.1f}x at p50). Split: kill -> migration start p50 "
            f"{r['kill_to_migration_start_p50_ms']:.0f} ms ({detection(r)}), migration "
            "start -> first resumed token p50 "
            f"{r['migration_start_to_resumed_token_p50_ms']:.0f} ms / p99 "
            f"{r['migration_start_to_resumed_token_p99_ms']:.0f} ms (all of a kill's streams "
            "land at once on the survivor, which prefills them on its one core beside the "
            "streams it already runs" + (
                "; the restarting engine starts on the other core" if r.get("pin_engines") else
                ", while the restarting engine's start-up competes for the same two cores")
            + "). The yardstick is a prefill on an idle engine; a migrated "
            "prompt is also longer (prompt + "
            f"{r['tokens_before_seam_p50']} generated tokens at p50).")
    floor = r.get("engine_exit_to_break_p50_ms")
    if (floor is not None and prefill and r["kill_to_migration_start_p50_ms"] is not None
            and r.get("fault", "kill") == "kill"):  # a frozen engine's sockets stay open
        to_router = r["kill_to_migration_start_p50_ms"]
        lines.append(
            f"- **Detection floor**: after the chaos phase each engine was killed once more "
            "with 8 streams straight on it (no router, no other requests): those clients read "
            f"the break {floor:.0f} ms after the SIGKILL (p50, max "
            f"{r['engine_exit_to_break_max_ms']:.0f} ms), {floor / prefill:.0f}x one idle "
            "prefill. No client of a crashed engine, router or not, hears of it sooner (by "
            "our reading, not traced: the kernel closes a killed process's sockets only at "
            "the end of its exit, after freeing its memory; the API server alone imports "
            "torch and holds hundreds of MB). " + EXIT_FLOOR_PROBE + " Under load the router "
            "started migrating "
            f"{to_router:.0f} ms after the kill ({to_router - floor:+.0f} ms against that "
            "floor). Counted from the kill, the issue's target lies below this floor on this "
            "host.")
    if r["kills"] and r["migrated_requests"]:
        lines.append(
            f"- The migrations come in {r['kills']} bursts, one per kill, and a kill's streams "
            "share one detection time; the percentiles therefore describe a handful of kills "
            "more than many independent events (see `kill_to_migration_start_*` and the kills "
            "table).")
    if r.get("liveness_probes_alive") is not None:
        mean = r["liveness_probe_alive_mean_ms"]
        lines.append(
            f"- Liveness probes: {r['liveness_probes_alive']:.0f} answered (streams that "
            "paused for a few TPOTs on a live engine"
            + (f"; {mean:.0f} ms per answer on average" if mean is not None else "")
            + f"), {r['liveness_probes_dead']:.0f} went unanswered; "
            f"{r['liveness_false_alarms']} of those fell outside a kill's outage (a live "
            "engine taken for dead)" + (
                f" and moved {r['liveness_false_alarm_moves']} streams for nothing (a probe's "
                "answer counts only while the stream is still silent; a chunk that arrives "
                "first wins)." if "liveness_false_alarm_moves" in r else "."))
    if r["extra_e2e_latency_p50_ms"] is not None:
        delta = r["extra_e2e_latency_p50_ms"]
        lines.append(
            f"- End to end, migrated requests took {abs(delta):.0f} ms "
            f"{'more' if delta >= 0 else 'less'} at p50 (p99 "
            f"{r['extra_e2e_latency_p99_ms']:+.0f} ms) than the same request in the reference "
            "run; this holds the seam and the queueing on one engine while the other "
            "restarts, and, when it is less, that the chaos phase repeats the reference "
            "phase's prompts and finds them in the surviving engines' prefix caches. Over "
            f"all requests: e2e p50 {r['e2e_p50_ms_reference']:.0f} "
            f"ms reference vs {r['e2e_p50_ms_chaos']:.0f} ms chaos, p99 "
            f"{r['e2e_p99_ms_reference']:.0f} vs {r['e2e_p99_ms_chaos']:.0f} ms; phase "
            f"{r['duration_s_reference']:.0f} s vs {r['duration_s_chaos']:.0f} s.")
    if r["recovery_time_s"] is not None:
        lines.append(
            f"- Recovery (kill -> back in the router's rotation) p50 {r['recovery_time_s']:.0f}"
            f" s, max {r['recovery_time_max_s']:.0f} s: almost all of it is vLLM's own "
            f"restart (p50 {r['engine_restart_p50_s']:.0f} s on "
            + ("its own core, shared with the router and the client" if r.get("pin_engines")
               else "a core shared with the survivor")
            + "); the router takes the instance back on its next health scrape "
            "(every 0.2 s here). It marked the dead instance unhealthy after "
            f"{r['marked_unhealthy_p50_ms']:.0f} ms (p50). The restart time bounds the kill "
            "rate: a kill waits until both engines serve again, so there is always a "
            "survivor.")
    if r["duration_s_chaos"] <= r["duration_s_reference"] * 1.05:
        lines.append(
            f"- The chaos phase was no slower than the reference ({r['duration_s_chaos']:.0f} s"
            f" vs {r['duration_s_reference']:.0f} s): on these two cores one engine serves "
            "about as fast as two (two engines' Python front ends compete for the same "
            "cores), so losing one barely lowers capacity here; on real accelerators a dead "
            "instance halves it and the survivor's queue would grow.")
    if r.get("non_streamed_requests"):
        lines.append(
            f"- {r['non_streamed_requests']} requests asked for one JSON answer (no stream): "
            f"{r['non_streamed_migrated']} of them were moved mid-generation (the router "
            "streams them from the engine and assembles the answer, so a break resumes like "
            f"a stream), {r['non_streamed_lost']} lost. They have no token arrival times, so "
            "they are left out of the latency keys.")
    else:
        lines.append(
            "- All requests are streamed: at the benchmarked router code non-streamed "
            "requests are not migratable (`migratable()`: \"not streamed\"); a non-streamed "
            "request whose engine dies before answering is retried once whole on another "
            "instance.")
    if r.get("ttft_after_seam_p50_ms") is not None and r.get(
            "migration_start_to_resumed_token_p50_ms") is not None:
        seam, resumed = r["ttft_after_seam_p50_ms"], r["migration_start_to_resumed_token_p50_ms"]
        lines.append(
            f"- **One prefill at the moment of the seam**: the {r['ttft_after_seam_requests']} "
            "requests sent within 1 s after a migration started had TTFT p50 "
            f"{seam:.0f} ms / p99 {r['ttft_after_seam_p99_ms']:.0f} ms on the same survivor; "
            f"a migrated stream's resumed token took p50 {resumed:.0f} ms from migration "
            f"start ({resumed / seam:.2f}x that TTFT at p50)"
            + (": the migration adds no more than one prefill under the load it lands in."
               if resumed <= seam else
               ": above one prefill under that load."))
    if r.get("ttft_under_load_p50_ms_reference"):
        lines.append(
            f"- A fairer yardstick than an idle prefill is the TTFT of a new request under "
            f"the same load (reference phase, no kill): p50 "
            f"{r['ttft_under_load_p50_ms_reference']:.0f} ms, p99 "
            f"{r['ttft_under_load_p99_ms_reference']:.0f} ms; migration start -> first "
            f"resumed token (p50 {r['migration_start_to_resumed_token_p50_ms'] or 0:.0f} ms) "
            "compares with it; the kill -> migration start part is detection.")
    pinned = ("each engine's whole process tree (API server, engine core, worker) is pinned "
              "to one core (`--pin-engines`), the router and the client float"
              if r.get("pin_engines") else
              "the engines are pinned (worker threads) to one core each, everything else "
              "floats")
    lines.append(
        f"- Two cores for two engines, their API servers, the router and the client: {pinned}. "
        "Absolute latencies are this machine's; the counts (lost, wrong) are the point.")
    return "\n".join(lines)


async def amain(args: argparse.Namespace) -> dict[str, Any]:
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    jobs = build_workload(args.requests, args.seed, args.min_tokens, args.max_tokens,
                          args.max_chars, args.non_streamed_every)
    engines = Engines(log_dir, pin=args.pin_engines)
    migrations = MigrationLog()
    router_log = logging.getLogger("xllm.router")
    router_log.addHandler(migrations)
    file_handler = logging.FileHandler(log_dir / "router.log", mode="w")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    router_log.addHandler(file_handler)
    router_log.setLevel(logging.INFO)
    router_log.propagate = False  # hundreds of migration lines would bury the progress bar
    print(f"starting 2 engines (logs in {log_dir})", file=sys.stderr)
    engines.start_all()
    try:
        prefill_ms = await measure_prefill(engines.specs[0].url, jobs, args.prefill_samples)
        print(f"prefill p50 {pct(prefill_ms, 50):.1f} ms", file=sys.stderr)

        router, runner, url = await start_router(engines.instance_specs(),
                                                 router_overrides(args))
        ref, _, _ = await run_phase("reference", url, jobs, args.concurrency, args.timeout_s,
                                    router, None, engines)
        await runner.cleanup()
        ref_lost = sum(1 for j in jobs if not ref[j.idx].complete(j.max_tokens))

        chaos = Chaos(every_s=args.kill_every_s, first_s=args.first_kill_s, fault=args.fault,
                      min_running=max(1, args.concurrency // 4))
        router, runner, url = await start_router(engines.instance_specs(),
                                                 router_overrides(args))
        run, timeline, t0 = await run_phase("chaos", url, jobs, args.concurrency,
                                            args.timeout_s, router, chaos, engines)
        counts = router_counter(router, "xllm_router_migrations_total", "outcome")
        detection = detection_keys(router)
        await runner.cleanup()
        exit_ms = await measure_exit_to_break(engines, jobs)
        print(f"kill -> break without router p50 {pct(exit_ms, 50):.1f} ms", file=sys.stderr)
    finally:
        engines.stop_all()
    result, details = summarise(jobs, ref, run, migrations, counts, chaos, t0, prefill_ms,
                                ref_lost)
    result.update(detection)
    result.update(engine_exit_to_break_p50_ms=rnd(pct(exit_ms, 50)),
                  engine_exit_to_break_max_ms=rnd(max(exit_ms)) if exit_ms else None)
    import router

    details.update(router_code=str(Path(router.__file__).parent), fault=args.fault,
                   not_migrated_log=list(migrations.not_migrated.values())[:10])
    result.update(concurrency=args.concurrency, kill_every_s=args.kill_every_s,
                  pin_engines=int(args.pin_engines),
                  migration_limit=args.migration_limit, min_tokens=args.min_tokens,
                  max_tokens=args.max_tokens, non_streamed_every=args.non_streamed_every,
                  engine_startup_s_p50=rnd(pct(engines.startup_s, 50), 2),
                  command="flock /tmp/xllm-vllm.lock python benchmarks/chaos.py "
                  + shlex.join(sys.argv[1:]),
                  date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  machine=f"{platform.machine()} {os.cpu_count()} cores, "
                  f"{platform.platform()}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{args.out}_timeline.json").write_text(json.dumps(
        {"timeline": [[round(x, 3) for x in row] for row in timeline],
         "columns": ["t_s", "inflight", "completed", *[f"{i}_healthy" for i in engines.ids()],
                     *[f"{i}_inflight" for i in engines.ids()]],
         "kills": chaos.kills, "details": details}) + "\n")
    render(args.out)
    return result


def render(out: str) -> None:
    """chaos.md and chaos.png from chaos.json and chaos_timeline.json."""
    result = json.loads((RESULTS / f"{out}.json").read_text())
    saved = json.loads((RESULTS / f"{out}_timeline.json").read_text())
    result = {**result, **saved.get("details", {})}  # older runs kept the ids in the .json
    chaos = Chaos(every_s=result["kill_every_s"], first_s=0.0, min_running=0,
                  kills=saved["kills"])
    png = f"{out}.png" if plot(saved["timeline"], chaos, RESULTS / f"{out}.png") else None
    write_markdown(result, chaos, RESULTS / f"{out}.md", png)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--requests", type=int, default=6000, help="requests per phase")
    p.add_argument("--concurrency", type=int, default=32, help="requests in flight")
    p.add_argument("--kill-every-s", type=float, default=30.0,
                   help="seconds between kills (a kill also waits for both engines in rotation)")
    p.add_argument("--first-kill-s", type=float, default=10.0,
                   help="seconds into the chaos phase of the first kill")
    p.add_argument("--min-tokens", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--max-chars", type=int, default=1600, help="longest prompt, characters")
    p.add_argument("--prefill-samples", type=int, default=50)
    p.add_argument("--migration-limit", type=int, default=3)
    p.add_argument("--stall-multiple", type=float, default=None,
                   help="router --stall-timeout-multiple (unset: stalls only by idle timeout)")
    p.add_argument("--fault", choices=("kill", "freeze", "hang_core"), default="kill",
                   help="kill: SIGKILL an engine (its sockets close as it exits); freeze: "
                   "SIGSTOP it (sockets stay open, as in a hang), SIGKILL once its streams "
                   "moved; hang_core: SIGSTOP its EngineCore and worker only (its HTTP server "
                   "still answers /health)")
    p.add_argument("--liveness-multiple", type=float, default=None,
                   help="router --liveness-probe-multiple (unset: the router's default; 0: off)")
    p.add_argument("--liveness-stuck-s", type=float, default=None,
                   help="router --liveness-stuck-s (unset: the router's default)")
    p.add_argument("--pin-engines", action="store_true",
                   help="run each engine's whole process tree on its core (taskset), not only "
                   "its compute threads, so a restart's start-up and stock vLLM's busy-polling "
                   "engine core stay off the other engine's core (chaos.json is measured so)")
    p.add_argument("--timeout-s", type=float, default=300.0, help="client timeout per request")
    p.add_argument("--non-streamed-every", type=int, default=4,
                   help="every Nth request asks for one JSON answer (0: all streamed)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--out", default="chaos", help="result file name in benchmarks/results")
    p.add_argument("--log-dir", default="/tmp/xllm-chaos", help="engine logs")
    p.add_argument("--render-only", action="store_true",
                   help="rebuild the .md and .png of --out from its saved results")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render_only:
        render(args.out)
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    result = asyncio.run(amain(args))
    keys = ("requests_total", "requests_lost", "streams_with_wrong_tokens", "migrated_requests",
            "extra_latency_p50_ms", "extra_latency_p99_ms", "prefill_time_p50_ms", "kills",
            "recovery_time_s")
    print(json.dumps({k: result[k] for k in keys}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
