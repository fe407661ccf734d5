"""An engine spec with ``pin_process`` runs its whole process tree on its cores."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from xllm_plugin.launcher.engine import EngineSpec

# What a child of the pinned process (as vLLM's engine core is) may run on.
CHILD_AFFINITY = ("import os, subprocess, sys; print(subprocess.run([sys.executable, '-c', "
                  "'import os; print(sorted(os.sched_getaffinity(0)))'], capture_output=True, "
                  "text=True).stdout.strip())")


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="needs Linux affinity")
def test_pinned_spec_runs_children_on_its_core() -> None:
    core = min(os.sched_getaffinity(0))
    spec = EngineSpec(model="unused", port=0, cpu_bind=str(core), pin_process=True)
    command = spec.command()
    serve_at = command.index("serve") - 1  # the prefix ends where xllm-vllm begins
    pinned = [*command[:serve_at], sys.executable, "-c", CHILD_AFFINITY]
    result = subprocess.run(pinned, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == f"[{core}]"


def test_unpinned_spec_is_the_plain_serve_command() -> None:
    spec = EngineSpec(model="m", port=1, cpu_bind="0")
    assert spec.command()[1] == "serve"


def test_pinning_without_cores_is_refused() -> None:
    with pytest.raises(ValueError, match="cpu_bind"):
        EngineSpec(model="m", port=1, pin_process=True).command()
