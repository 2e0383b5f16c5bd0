"""One short check of everything that needs a GPU; on a machine without one, its CPU fallback.

    experiments/gpu_check.sh [--cpu] [--skip-speed] [--out DIR]      # or python experiments/gpu_check.py

Steps, each timed and recorded (a failing step does not stop the others):

1. ``environment``: torch, CUDA, the GPUs (``nvidia-smi``);
2. ``gpu_tests``: ``pytest -m gpu`` (``tests/test_gpu.py``: AMP fit and scoring on CUDA, the model
   on the GPU, the same scores after loading on the CPU); on the CPU they skip, with the reason;
3. ``amp_fit``: a small pipeline fitted with ``training.use_amp: true`` (and once without, for
   the time), scores finite, parameters on the device; on the CPU AMP is ignored, as documented;
4. ``ddp``: two ranks under ``torchrun`` fit the same pipeline (README "Multi-GPU"): NCCL on two
   GPUs; with fewer than two GPUs (NCCL cannot put two ranks on one GPU) or on the CPU, gloo on
   the CPU. Both ranks must end with identical weights;
5. ``speed``: ``experiments/bench_speed.py`` (GPU only, unless ``--speed-on-cpu``).

Results: ``gpu_check.json`` in ``--out``, else in ``$OUT`` when set, else ``experiments/results``.
Exit status 0 when every step passed or was skipped for a stated reason, 1 otherwise. The CPU
fallback (``--cpu``, or no CUDA) uses tiny sizes and takes about a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

# The conftest FAST sizes: a few seconds to fit on the 4 mm demo grid.
TINY = {
    "data": {"preprocessing": {"target_spacing": 4.0}, "cache": False},
    "training": {"num_epochs": 8, "batch_size": 256, "seed": 0},
    "patches": {"max_patches": 1000, "patch_size": 4, "stride": 2},
    "tracking": {"enabled": False},
}


def tiny_config(**training) -> dict:
    return {**TINY, "training": {**TINY["training"], **training}}


def run_step(results: dict, name: str, fn, *args) -> None:
    t0 = time.perf_counter()
    try:
        out = fn(*args)
        status = out.pop("status", "ok")
    except Exception as exc:  # recorded, and the other steps still run
        out, status = (
            {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]},
            "failed",
        )
    results["steps"][name] = {"status": status, "seconds": round(time.perf_counter() - t0, 1), **out}
    print(f"[gpu_check] {name}: {status} ({results['steps'][name]['seconds']} s)", flush=True)


def environment(cuda: bool) -> dict:
    import torch

    out = {
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cuda_used": cuda,
        "torch_cuda": torch.version.cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "cpu_cores": os.cpu_count(),
        "platform": f"{platform.system()} {platform.machine()}, Python {platform.python_version()}",
    }
    if cuda:
        try:
            out["nccl"] = str(torch.cuda.nccl.version())
        except Exception as exc:  # informative only
            out["nccl"] = f"unknown ({exc})"
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        out["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    return out


def gpu_tests(cuda: bool, env: dict) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-rs", "-p", "no:cacheprovider", "tests"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240, env=env)
    lines = proc.stdout.strip().splitlines()
    out = {"returncode": proc.returncode, "summary": lines[-1] if lines else proc.stderr[-500:]}
    out["skipped_reasons"] = sorted({ln.split(": ", 1)[-1] for ln in lines if ln.startswith("SKIPPED")})
    if proc.returncode != 0:
        out["output"] = (proc.stdout + proc.stderr)[-4000:]
        out["status"] = "failed"
    elif cuda and " passed" not in out["summary"]:
        out["status"] = "failed"  # on a GPU they must run, not skip
    elif not cuda:
        out["status"] = "skipped"
    return out


def amp_fit(cuda: bool, data: Path) -> dict:
    import numpy as np
    import torch

    from anomaly3d_core.io.files import list_inputs
    from anomaly3d_core.pipeline import AnomalyDetectionPipeline

    device = "cuda" if cuda else "cpu"
    train, test = list_inputs(data / "train"), list_inputs(data / "test")
    out: dict = {"device": device, "amp_active": cuda}
    # on the GPU once with and once without AMP, for the time; on the CPU AMP is ignored: one fit
    for name, amp in (("amp", True), ("fp32", False)) if cuda else (("amp_requested", True),):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        pipe = AnomalyDetectionPipeline(tiny_config(use_amp=amp, device=device)).fit(
            train, show_progress=False
        )
        fit_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        result = pipe.score(test[0])
        score_s = time.perf_counter() - t0
        losses = pipe.history_["train_loss"]
        row = {
            "fit_seconds": round(fit_s, 2),
            "score_seconds": round(score_s, 3),
            "epochs": len(losses),
            "train_loss_first_last": [round(float(losses[0]), 5), round(float(losses[-1]), 5)],
            "params_on": sorted({p.device.type for p in pipe.model_.parameters()}),
            "scores_finite": bool(np.isfinite(result.score_map).all() and np.isfinite(result.volume_score)),
        }
        if cuda:
            row["peak_gpu_memory_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        out[name] = row
        ok = row["scores_finite"] and np.isfinite(losses).all() and row["params_on"] == [device]
        if not ok:
            out["status"] = "failed"
        if not cuda:
            out["note"] = "use_amp is ignored off CUDA (documented): the fit ran in float32"
    return out


def ddp_worker(data: str, out: str) -> None:
    """Run by torchrun: every rank fits the same pipeline; each saves its weights."""
    import torch
    import torch.distributed as dist

    from anomaly3d_core.io.files import list_inputs
    from anomaly3d_core.model import distributed
    from anomaly3d_core.pipeline import AnomalyDetectionPipeline

    distributed.init_from_env()
    cuda = torch.cuda.is_available()
    pipe = AnomalyDetectionPipeline(tiny_config(use_amp=cuda, device="cuda" if cuda else "cpu"))
    pipe.fit(list_inputs(Path(data) / "train"), show_progress=False)
    torch.save(
        {
            "state": {k: v.detach().cpu() for k, v in pipe.model_.state_dict().items()},
            "history": pipe.history_,
            "world": distributed.world_size(),
            "backend": dist.get_backend() if dist.is_initialized() else None,
            "device": str(next(pipe.model_.parameters()).device),
        },
        Path(out) / f"rank{distributed.rank()}.pt",
    )
    distributed.shutdown()


def ddp(cuda: bool, data: Path, work: Path, env: dict) -> dict:
    import torch

    gpus = torch.cuda.device_count() if cuda else 0
    out: dict = {}
    env = dict(env)
    if gpus >= 2:
        out["backend_expected"] = "nccl"
        env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0,1")
    else:
        out["backend_expected"] = "gloo"
        if cuda:
            out["note"] = f"NCCL needs one GPU per rank; {gpus} visible, so both ranks run gloo on the CPU"
        env["CUDA_VISIBLE_DEVICES"] = ""
    ranks = work / "ddp"
    ranks.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--nnodes=1",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=127.0.0.1:0",
        str(Path(__file__).resolve()),
        "--ddp-worker",
        str(data),
        str(ranks),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    out["returncode"] = proc.returncode
    if proc.returncode != 0:
        return {**out, "status": "failed", "output": (proc.stdout + proc.stderr)[-4000:]}
    r0, r1 = (torch.load(ranks / f"rank{i}.pt", weights_only=False) for i in (0, 1))
    diff = max(float((r0["state"][k].float() - r1["state"][k].float()).abs().max()) for k in r0["state"])
    out.update(
        {
            "world_size": [r0["world"], r1["world"]],
            "backend": r0["backend"],
            "devices": [r0["device"], r1["device"]],
            "max_weight_difference_between_ranks": diff,
            "epochs": len(r0["history"]["train_loss"]),
            "train_loss_first_last": [
                round(float(r0["history"]["train_loss"][0]), 5),
                round(float(r0["history"]["train_loss"][-1]), 5),
            ],
        }
    )
    ok = r0["world"] == r1["world"] == 2 and r0["backend"] == out["backend_expected"] and diff <= 1e-6
    if not ok:
        out["status"] = "failed"
    elif cuda and gpus < 2:
        out["status"] = "skipped"  # the NCCL part; the gloo run above passed
    return out


def speed(cuda: bool, out_dir: Path, env: dict, on_cpu: bool) -> dict:
    if not cuda and not on_cpu:
        return {"status": "skipped", "reason": "no GPU: the CPU figures come from `make bench` (README)"}
    target = out_dir / "gpu_bench_speed"
    args = ["--n-train", "16", "--repeats", "5"] if cuda else ["--n-train", "3", "--repeats", "1"]
    cmd = [sys.executable, str(HERE / "bench_speed.py"), "--out", str(target), *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=420, env=env)
    if proc.returncode != 0:
        return {
            "status": "failed",
            "returncode": proc.returncode,
            "output": (proc.stdout + proc.stderr)[-4000:],
        }
    return {"results": json.loads((target / "bench_speed.json").read_text()), "folder": str(target)}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, help="results folder (default: $OUT, else experiments/results)")
    parser.add_argument("--cpu", action="store_true", help="the CPU fallback even where CUDA is present")
    parser.add_argument("--skip-speed", action="store_true", help="leave out bench_speed.py")
    parser.add_argument(
        "--speed-on-cpu", action="store_true", help="run a tiny bench_speed.py on the CPU too"
    )
    parser.add_argument("--ddp-worker", nargs=2, metavar=("DATA", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ddp_worker:
        ddp_worker(*args.ddp_worker)
        return 0
    import torch

    cuda = torch.cuda.is_available() and not args.cpu
    env = dict(os.environ)
    if not cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""  # every child, pytest and torchrun included, stays on the CPU
    out_dir = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else HERE / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict = {"mode": "gpu" if cuda else "cpu-fallback", "steps": {}}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        from anomaly3d_core.demo.datasets import make_demo_dataset

        data = make_demo_dataset(Path(tmp) / "data", "tiny", seed=1, voxel_size=4.0)
        run_step(results, "environment", environment, cuda)
        run_step(results, "gpu_tests", gpu_tests, cuda, env)
        run_step(results, "amp_fit", amp_fit, cuda, data)
        run_step(results, "ddp", ddp, cuda, data, Path(tmp), env)
        if args.skip_speed:
            results["steps"]["speed"] = {"status": "skipped", "reason": "--skip-speed"}
        else:
            run_step(results, "speed", speed, cuda, out_dir, env, args.speed_on_cpu)
    results["seconds"] = round(time.perf_counter() - t0, 1)
    results["passed"] = all(s["status"] in ("ok", "skipped") for s in results["steps"].values())
    path = out_dir / "gpu_check.json"
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(
        f"[gpu_check] {results['mode']}: {'passed' if results['passed'] else 'FAILED'} in {results['seconds']} s; "
        + ", ".join(f"{k} {v['status']}" for k, v in results["steps"].items())
        + f"; results in {path}",
        flush=True,
    )
    return 0 if results["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
