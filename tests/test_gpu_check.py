"""experiments/gpu_check.sh runs its CPU fallback on a machine without a GPU (as CI does)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # 20-40 s on 2 shared CPU cores
def test_gpu_check_cpu_fallback_passes(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        ["bash", str(ROOT / "experiments" / "gpu_check.sh"), "--cpu", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["mode"] == "cpu-fallback" and result["passed"]
    steps = result["steps"]
    assert steps["gpu_tests"]["status"] == "skipped" and "needs a CUDA device" in str(steps["gpu_tests"])
    assert steps["amp_fit"]["status"] == "ok" and steps["amp_fit"]["amp_requested"]["scores_finite"]
    assert steps["ddp"]["status"] == "ok" and steps["ddp"]["backend"] == "gloo"
    assert steps["ddp"]["world_size"] == [2, 2] and steps["ddp"]["max_weight_difference_between_ranks"] == 0.0
    assert steps["speed"]["status"] == "skipped"
