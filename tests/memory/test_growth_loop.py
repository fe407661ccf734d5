"""The GPU benchmark's growth loop (benchmarks/xtensor_gpu.py), run on the CPU mapper under
Triton's interpreter so that CI checks its bookkeeping before a GPU ever runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

_LOOP = textwrap.dedent("""
    import json
    from benchmarks.xtensor_gpu import growth
    from xllm_plugin.memory.cpu_mapper import CpuMapper
    print(json.dumps({mode: growth(1, 2, 12, mode == "premap", mapper_cls=CpuMapper)
                      for mode in ("premap", "on_demand")}))
""")


def test_growth_loop_premaps_every_page_a_request_grows_into() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", _LOOP], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    modes = json.loads(result.stdout.strip().splitlines()[-1])
    # 4 KiB pages hold 2 tokens of 8 heads x 128 in bf16: both requests cross often.
    for measured in modes.values():
        assert measured["crossing_steps"] >= 6
        assert measured["map_calls"] > 0
        assert measured["step_us_max"] >= measured["step_us_p50"] > 0
    assert modes["premap"]["premap_hit_rate"] == 1.0
    assert modes["on_demand"]["premap_hit_rate"] == 0.0
