"""The chaos benchmark's bookkeeping (benchmarks/chaos.py): what counts as lost, wrong or
migrated, and how the extra latency of a migrated stream is measured. No engines."""

from __future__ import annotations

import logging

from benchmarks.chaos import (
    Chaos,
    Job,
    MigrationLog,
    Outcome,
    build_workload,
    summarise,
    ttft_after_seams,
)


def _job(idx: int, tokens: int = 4) -> Job:
    return Job(idx, "/v1/completions", {"prompt": "x", "max_tokens": tokens, "stream": True},
               tokens)


def _ok(idx: int, ids: list[int], start: float, times: list[float]) -> Outcome:
    return Outcome(idx, start, end=times[-1], status=200, done=True, ids=ids,
                   token_times=times, completion_tokens=len(ids))


def test_workload_mixes_chat_and_completions_greedy_with_token_ids() -> None:
    jobs = build_workload(40, seed=1, min_tokens=32, max_tokens=96, max_chars=400)
    kinds = {j.path for j in jobs}
    assert kinds == {"/v1/completions", "/v1/chat/completions"}
    assert all(32 <= j.max_tokens <= 96 and j.body["max_tokens"] == j.max_tokens for j in jobs)
    assert all(j.body["temperature"] == 0 and j.body["stream"] and j.body["return_token_ids"]
               for j in jobs)
    assert build_workload(40, seed=1, min_tokens=32, max_tokens=96, max_chars=400)[7].body \
        == jobs[7].body  # same seed, same requests in both phases


def test_workload_can_mix_in_non_streamed_requests() -> None:
    jobs = build_workload(40, seed=1, min_tokens=32, max_tokens=96, max_chars=400,
                          non_streamed_every=4)
    plain = [j for j in jobs if not j.streamed]
    assert [j.idx for j in plain] == [6, 7, 14, 15, 22, 23, 30, 31, 38, 39]
    assert all("stream_options" not in j.body and j.body["return_token_ids"] for j in plain)
    assert {j.path for j in plain} == {"/v1/completions", "/v1/chat/completions"}


def test_complete_needs_200_done_no_error_and_all_tokens() -> None:
    good = _ok(0, [1, 2, 3, 4], 0.0, [1.0, 1.1, 1.2, 1.3])
    assert good.complete(4)
    assert not good.complete(5)
    assert not Outcome(0, 0.0, status=200, done=False, ids=[1, 2, 3, 4],
                       completion_tokens=4).complete(4)
    assert not Outcome(0, 0.0, status=200, done=True, ids=[1, 2, 3, 4], completion_tokens=4,
                       error="upstream failed").complete(4)


def test_summary_counts_lost_wrong_migrated_and_measures_from_the_kill() -> None:
    jobs = [_job(i) for i in range(4)]
    ref = {i: _ok(i, [1, 2, 3, 4], 0.0, [0.1, 0.2, 0.3, 0.4]) for i in range(4)}
    run = {
        0: _ok(0, [1, 2, 3, 4], 100.0, [100.1, 100.2, 100.9, 101.0]),  # migrated at 100.25
        1: _ok(1, [1, 2, 9, 4], 100.0, [100.1, 100.2, 100.3, 100.4]),  # wrong tokens
        2: Outcome(2, 100.0, end=100.3, status=200, done=False, ids=[1, 2],
                   token_times=[100.1, 100.2]),  # lost
        3: _ok(3, [1, 2, 3, 4], 100.5, [100.8, 100.9, 101.0, 101.1]),  # sent after the seam
    }
    log = MigrationLog()
    log.emit(logging.LogRecord("xllm.router", logging.WARNING, __file__, 1,
                               "request %s: migrating from %s to %s after %d generated tokens "
                               "(%s: %s)", ("chaos-0", "e0", "e1", 2, "error", "x"), None,
                               ))
    log.migrated["chaos-0"][0].at = 100.3  # the router saw the break 50 ms after the kill
    log.dead_probes += [(100.28, "e0"),  # e0's outage: a true detection
                        (100.28, "e1"), (130.0, "e0")]  # a live e1, e0 back: false alarms
    chaos = Chaos(every_s=30, first_s=0, min_running=1,
                  kills=[{"engine": "e0", "t_kill": 0.25,
                          "detected_s": 0.1, "engine_up_s": 20.0, "recovery_s": 21.0,
                          "t_back": 21.25}])
    result, details = summarise(jobs, ref, run, log, {"resumed": 1.0}, chaos, 100.0,
                                [10.0, 20.0], 0)
    assert all(isinstance(v, int | float) for v in result.values())  # flat numbers only
    assert result["requests_lost"] == 1 and details["lost_ids"] == [2]
    assert result["streams_with_wrong_tokens"] == 1 and details["wrong_ids"] == [1]
    assert result["non_streamed_requests"] == 0
    assert result["ttft_under_load_p50_ms_reference"] == 100.0  # first token 0.1 s in
    assert result["migrated_requests"] == 1
    assert result["extra_latency_p50_ms"] == 650.0  # kill at 100.25, token 2 at 100.9
    assert result["kill_to_migration_start_p50_ms"] == 50.0
    assert result["migration_start_to_resumed_token_p50_ms"] == 600.0
    assert result["extra_e2e_latency_p50_ms"] == 600.0  # 1.0 s against 0.4 s
    assert result["tokens_before_seam_p50"] == 2
    assert result["ttft_after_seam_requests"] == 1
    assert result["ttft_after_seam_p50_ms"] == 300.0  # request 3: sent 100.5, token at 100.8
    assert result["recovery_time_s"] == 21.0 and result["kills"] == 1
    assert result["liveness_false_alarms"] == 2
    assert result["liveness_false_alarm_moves"] == 0  # the one move was an "error" in e0's outage
    assert chaos.kills[0]["migrated"] == 1


def test_ttft_after_seams_takes_requests_sent_within_the_window_after_a_seam() -> None:
    run = {
        0: _ok(0, [1], 9.9, [10.5]),  # sent before the seam (met the break itself)
        1: _ok(1, [1], 10.2, [10.6]),  # sent 0.2 s after: 400 ms
        2: _ok(2, [1], 10.9, [11.0]),  # sent 0.9 s after: 100 ms
        3: _ok(3, [1], 11.5, [11.6]),  # too late
        4: _ok(4, [1], 10.1, [10.3]),  # in the window but skipped (migrated itself)
        5: Outcome(5, 10.3),  # no token at all
    }
    got = ttft_after_seams(run, [10.0], skip={4}, within_s=1.0)
    assert sorted(round(v) for v in got) == [100, 400]
