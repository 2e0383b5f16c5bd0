"""Peak server memory and time while rejecting hostile payloads (issue 12), with the default limits.

    python experiments/bench_limits.py [--out experiments/results]

Fits a tiny model (demo data, 2 mm working grid), serves it with a real ``mlflow models serve``
(one worker) and posts, in this order:

- a header bomb: a gzipped 352-byte NIfTI header claiming 1200^3 float32 voxels (no data);
- a gzip bomb: a ~2.7 MB ``.nii.gz`` whose header claims 1400^3 uint8 and whose stream inflates to
  2.7 GB of zeros;
- a coarse scan: 16^3 voxels of 64 mm (a few KB) that the 2 mm grid would make 512^3;
- trailing zeros: a valid 32^3 scan followed by 2.7 GB of compressed zeros (accepted and scored:
  the stream is only inflated as far as the header declares);
- a normal demo scan;
- (issue 20) a MetaImage header whose data file is a file of the server (absolute path), an NRRD
  header pointing at one through ``../``, a scan with intensities near 3e38, and a scan of 0.001 mm
  voxels.

Then, each in a fresh process (time of the refusal itself, peak RSS of that process, imports
included): a 500-byte YAML alias bomb as a config, a model folder whose ``normative.npz`` claims
2 x 4 GiB, a DICOM series with a duplicated slice, a manifest whose subject is ``../../x``, and a
tracking server that accepts connections but never answers.

After each request it records the HTTP status, the round-trip time and the server's peak RSS so
far (``VmHWM`` of every process of the server, the largest). Peak RSS is a high-water mark, so the
rejections come first and their figures are the peak *while rejecting*. Results go to
``limits.json`` in ``--out``. Goals: rejection under 1 s, peak RSS under 1 GiB.
"""

from __future__ import annotations

import argparse
import base64
import gzip
import io
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

HERE = Path(__file__).resolve().parent
GIB = 1 << 30


def header(shape: tuple[int, ...], dtype=np.uint8) -> bytes:
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(dtype)
    hdr["vox_offset"] = 352
    return hdr.binaryblock + b"\0\0\0\0"


def gzip_stream(head: bytes, zeros_mib: int) -> bytes:
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)
    parts, block = [comp.compress(head)], bytes(1 << 20)
    parts += [comp.compress(block) for _ in range(zeros_mib)]
    parts.append(comp.flush())
    return b"".join(parts)


def payloads(demo_scan: Path) -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(0)
    coarse = nib.Nifti1Image(
        np.where(rng.random((16, 16, 16)) > 0.3, 100 + rng.random((16, 16, 16)), 0).astype(np.float32),
        np.diag([64.0, 64.0, 64.0, 1.0]),
    )
    valid = header((32, 32, 32)) + rng.integers(1, 200, 32**3, np.uint8).tobytes()
    return [
        ("header bomb (1200^3 float32 claimed)", gzip.compress(header((1200, 1200, 1200), np.float32))),
        ("gzip bomb (1400^3 claimed, 2.7 GB of zeros)", gzip_stream(header((1400, 1400, 1400)), 2600)),
        ("coarse scan (16^3 at 64 mm -> 512^3 at 2 mm)", gzip.compress(coarse.to_bytes())),
        ("valid 32^3 scan + 2.7 GB of trailing zeros", gzip_stream(valid, 2600)),
        ("normal demo scan", demo_scan.read_bytes()),
    ]


def trust_payloads(secret: Path, demo_scan: Path) -> list[tuple[str, bytes]]:
    """Issue 20's payloads: headers that name files of the server, and silently wrong numbers."""
    mha = "ObjectType = Image\nNDims = 3\nDimSize = 8 8 4\nElementType = MET_UCHAR\n"
    nrrd = "NRRD0004\ntype: uchar\ndimension: 3\nsizes: 8 8 4\nencoding: raw\n"
    img = nib.load(demo_scan)
    huge = np.array(img.get_fdata(dtype=np.float32))  # a copy: nibabel caches the array
    huge[huge > np.percentile(huge, 90)] = 3e38
    tiny = nib.Nifti1Image(np.asarray(img.dataobj, dtype=np.float32), np.diag([0.001, 0.001, 0.001, 1.0]))
    return [
        ("MetaImage naming a server file", (mha + f"ElementDataFile = {secret}\n").encode()),
        ("NRRD naming ../../ a server file", (nrrd + f"data file: {'../' * 12}{secret}\n\n").encode()),
        ("intensities near 3e38", gzip.compress(nib.Nifti1Image(huge, img.affine).to_bytes())),
        ("0.001 mm voxels", gzip.compress(tiny.to_bytes())),
    ]


LOCAL_CASES = ("yaml alias bomb", "inflating normative.npz", "duplicated DICOM slice", "subject ../../x")


def local_case(name: str, model: Path, work: Path) -> dict:
    """Run one local refusal in this (fresh) process: its seconds, outcome and this process's peak RSS."""
    import resource
    import zipfile

    from anomaly3d_core.errors import Anomaly3DError
    from anomaly3d_core.io.files import load_volume
    from anomaly3d_core.io.subjects import manifest_subjects
    from anomaly3d_core.mlops.tracking import check_store
    from anomaly3d_core.persistence import load_any_config, load_detector
    from anomaly3d_plugins.loaders.dicom import write_series

    work.mkdir(parents=True, exist_ok=True)
    if name == "yaml alias bomb":
        text = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
            f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
            for p, c in zip("abcdefgh", "bcdefghi", strict=True)
        )
        (work / "bomb.yaml").write_text(text)
        action = lambda: load_any_config(work / "bomb.yaml")  # noqa: E731
    elif name == "inflating normative.npz":
        shutil.copytree(model, work / "model")
        inner = next((work / "model").rglob("state.json")).parent
        head = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            head, {"descr": "<f4", "fortran_order": False, "shape": (1 << 15,) * 2}
        )
        with zipfile.ZipFile(inner / "normative.npz", "w", zipfile.ZIP_DEFLATED) as z:
            for key in ("mean", "std"):
                z.writestr(f"{key}.npy", head.getvalue() + bytes(4 << 20))
        action = lambda: load_detector(work / "model")  # noqa: E731
    elif name == "duplicated DICOM slice":
        rng = np.random.default_rng(0)
        series = write_series(100 + 10 * rng.random((32, 32, 24)), np.diag([1.0, 1.0, 2.0, 1.0]), work, "s")
        first = sorted(series.iterdir())[5]
        shutil.copy(first, series / ("zz_" + first.name))
        action = lambda: load_volume(series)  # noqa: E731
    elif name == "subject ../../x":
        (work / "m.csv").write_text("subject,sequence,path\n../../x,T1w,a.nii.gz\n")
        action = lambda: manifest_subjects(work / "m.csv", ["T1w"])  # noqa: E731
    else:  # a tracking server that accepts and never answers
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        os.environ["ANOMALY3D_TRACKING_TIMEOUT"] = "1"
        uri = f"http://127.0.0.1:{listener.getsockname()[1]}"
        action = lambda: check_store(uri)  # noqa: E731
    t0 = time.perf_counter()
    try:
        found = action()
        outcome = "refused: " + str(found[1][0]) if name == "subject ../../x" and found[1] else "accepted"
    except Anomaly3DError as exc:
        outcome = "refused: " + str(exc)
    seconds = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "case": name,
        "seconds": round(seconds, 3),
        "peak_rss_mib": round(rss / (1 << 20), 1),
        "outcome": outcome,
    }


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def peak_rss(pid: int) -> int:
    """The largest ``VmHWM`` (bytes) among the server's processes."""
    best = 0
    for p in tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    best = max(best, int(line.split()[1]) * 1024)
        except OSError:
            pass
    return best


def post(port: int, data: bytes) -> tuple[int, dict, float]:
    body = json.dumps({"dataframe_records": [{"volume": base64.b64encode(data).decode()}]}).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations", body, {"Content-Type": "application/json"}
    )
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=600) as resp:
            status, answer = resp.status, json.load(resp)
    except urllib.error.HTTPError as err:
        status, answer = err.code, json.loads(err.read() or b"{}")
    return status, answer, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--case", help=argparse.SUPPRESS)  # one local case in this process
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(local_case(args.case, Path(args.model), Path(args.work))))
        return

    from anomaly3d_core.demo.datasets import make_demo_dataset
    from anomaly3d_core.io import limits
    from anomaly3d_core.io.files import list_inputs
    from anomaly3d_core.mlops.serving import save_pyfunc
    from anomaly3d_core.pipeline import AnomalyDetectionPipeline

    for var in limits.ENV.values():  # measure the defaults
        os.environ.pop(var, None)
    work = Path(tempfile.mkdtemp(prefix="bench-limits-"))
    data = make_demo_dataset(work / "data", "tiny", seed=1, voxel_size=4.0)
    config = {
        "data": {"preprocessing": {"target_spacing": 2.0}},
        "training": {"num_epochs": 3},
        "patches": {"max_patches": 500},
        "tracking": {"enabled": False},
    }
    model = AnomalyDetectionPipeline(config).fit(list_inputs(data / "train"), show_progress=False)
    save_pyfunc(model, work / "model")  # an MLflow model folder, for `mlflow models serve`
    print("model fitted and saved; starting mlflow models serve ...", flush=True)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlruns.db'}",
        "PATH": f"{mlflow_bin.parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    log = open(work / "serve.log", "w")
    server = subprocess.Popen(
        [str(mlflow_bin), "models", "serve", "-m", str(work / "model"), "--env-manager", "local"]
        + ["--host", "127.0.0.1", "-p", str(port), "-w", "1"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    rows = []
    try:
        deadline = time.time() + 300
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                    break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    raise SystemExit(
                        "server did not start:\n" + (work / "serve.log").read_text()[-3000:]
                    ) from None
                time.sleep(0.5)
        scan = sorted((data / "test").iterdir())[-1]
        secret = work / "secret.bin"
        secret.write_bytes(bytes(range(256)) * 4)
        items = payloads(scan)
        items[-1:-1] = trust_payloads(secret, scan)  # rejections first: peak RSS is a high-water mark
        baseline = peak_rss(server.pid)
        print(f"server ready; peak RSS after start-up: {baseline / (1 << 20):.0f} MiB", flush=True)
        for name, data_bytes in items:
            status, answer, seconds = post(port, data_bytes)
            message = answer.get("message", "") if status != 200 else ""
            row = {
                "payload": name,
                "payload_bytes": len(data_bytes),
                "status": status,
                "seconds": round(seconds, 3),
                "peak_rss_mib": round(peak_rss(server.pid) / (1 << 20), 1),
                "message": message,
            }
            rows.append(row)
            print(
                f"{name:<48} {status}  {seconds:6.3f} s  peak RSS {row['peak_rss_mib']:7.1f} MiB  {message[:90]}"
            )
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()
    local = []
    try:
        for i, case in enumerate((*LOCAL_CASES, "silent tracking server")):
            cmd = [sys.executable, __file__, "--case", case, "--model", str(work / "model")]
            proc = subprocess.run([*cmd, "--work", str(work / f"case{i}")], capture_output=True, text=True)
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            local.append(row)
            print(
                f"{case:<48} {row['seconds']:6.3f} s  peak RSS {row['peak_rss_mib']:7.1f} MiB  {row['outcome'][:90]}"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rejected = [r for r in rows if r["status"] != 200]
    result = {
        "limits": {
            "ANOMALY3D_MAX_VOXELS": limits.Limits().max_voxels,
            "ANOMALY3D_MAX_BYTES": limits.Limits().max_bytes,
            "ANOMALY3D_MAX_GRID_VOXELS": limits.Limits().max_grid_voxels,
        },
        "server": "mlflow models serve --env-manager local -w 1",
        "baseline_peak_rss_mib": round(baseline / (1 << 20), 1),
        "rows": rows,
        "local_cases": local,
        "max_local_refusal_seconds": max(r["seconds"] for r in local),
        "max_local_peak_rss_mib": max(r["peak_rss_mib"] for r in local),
        "max_rejection_seconds": max(r["seconds"] for r in rejected),
        "peak_rss_while_rejecting_mib": max(r["peak_rss_mib"] for r in rejected),
        "goals": {"rejection_seconds": 1.0, "peak_rss_mib": 1024},
        "machine": f"{platform.system()} {platform.machine()}, Python {platform.python_version()}, "
        f"{os.cpu_count()} CPU cores",
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "limits.json").write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"\nrejections: at most {result['max_rejection_seconds']:.3f} s; peak server RSS while rejecting "
        f"{result['peak_rss_while_rejecting_mib']:.0f} MiB (goals: < 1 s, < 1024 MiB); written to {out / 'limits.json'}"
    )


if __name__ == "__main__":
    main()
