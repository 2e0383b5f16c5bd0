"""DistributedDataParallel training under torchrun: 2 CPU ranks with gloo end with identical weights."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch


@pytest.mark.slow
def test_two_gloo_ranks_end_identical(tmp_path):
    worker = Path(__file__).with_name("ddp_worker.py")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port=0",
        "--nnodes=1",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=127.0.0.1:0",
        str(worker),
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{i}.pt", weights_only=False) for i in (0, 1))
    assert r0["world"] == r1["world"] == 2
    for key, value in r0["state"].items():
        assert torch.equal(value, r1["state"][key]), key
    assert r0["history"]["val_loss"] == r1["history"]["val_loss"]
    assert r0["history"]["train_loss"][-1] < r0["history"]["train_loss"][0]
    assert (tmp_path / "ckpt" / "last.pt").is_file()  # written once, by rank 0
