"""Plugin packages installed for real, outside the project tree, and used through the command line.

``examples/anomaly3d-example-plugin`` (one component of each family) is built and installed with
pip into a temporary folder (``pip install --no-deps --no-build-isolation --target``: no network,
and the project's venv is left as it is), put on ``PYTHONPATH`` and then:

- passes the conformance kit in its own test suite (run as its authors would);
- appears in ``anomaly3d plugins -v`` with its parameters;
- runs fit, score, evaluate and serving (pyfunc, a ``.mgz`` payload), and a saved model records it
  (``requirements.txt``, ``plugins.json``, MLflow ``plugin.*`` params, its loader included);
- once "uninstalled" (off ``PYTHONPATH``), loading that model names the package to install.

A second folder holds a package broken in each way ``tests/test_plugin_faults.py`` lists, as
real distributions on disk: ``plugins`` lists each with the reason, and every other command works.
"""

from __future__ import annotations

import base64
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from test_plugin_faults import BROKEN

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "anomaly3d-example-plugin"
PACKAGE = "anomaly3d-example-plugin"
FAST = [
    "--set",
    "training.num_epochs=2",
    "--set",
    "patches.max_patches=300",
    "--set",
    "data.preprocessing.target_spacing=4",
    "--set",
    "patches.patch_size=4",
    "--set",
    "patches.stride=2",
]
pytestmark = pytest.mark.slow


def _env(*paths: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "ANOMALY3D_DISABLE_PLUGINS")}
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(str(p) for p in paths)
    return {**env, **extra}


def _run(args: list[str], env: dict[str, str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def _cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return _run(["-m", "anomaly3d_core", *args], env, cwd)


@pytest.fixture(scope="module")
def example_site(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The example package built from a copy of its sources and installed into a private folder."""
    base = tmp_path_factory.mktemp("example_plugin")
    src = base / "src"
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    site = base / "site"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(site),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (site / "anomaly3d_example_plugin").is_dir()
    return site, src


@pytest.fixture(scope="module")
def broken_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One installed distribution per way of breaking (METADATA + entry_points.txt + module)."""
    site = tmp_path_factory.mktemp("broken_site")
    for kind, (source, _) in BROKEN.items():
        name, module = f"pkg-{kind}", f"broken_{kind.replace('-', '_')}"
        info = site / f"{name.replace('-', '_')}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
        target = module if source is not None else f"{module}_missing"
        (info / "entry_points.txt").write_text(f"[anomaly3d]\nmain = {target}\n")
        if source is not None:
            (site / f"{module}.py").write_text(source)
    return site


def _as_mgz(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for path in sorted(src.glob("*.nii.gz")):
        img = nib.load(path)
        data = np.asarray(img.dataobj, dtype=np.float32)
        nib.save(nib.MGHImage(data, img.affine), str(dst / path.name.replace(".nii.gz", ".mgz")))


def test_example_package_passes_the_kit_in_its_own_tests(example_site):
    site, src = example_site
    proc = _run(["-m", "pytest", "-q", "-p", "no:cacheprovider", str(src / "tests")], _env(site), src)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout


def test_example_package_end_to_end(example_site, broken_site, demo_dir, tmp_path):
    site, _ = example_site
    env = _env(site, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlruns.db'}")

    # listed, with each component's parameters
    proc = _cli(["plugins", "-v"], env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for name in ("filterbank", "pca", "top_fraction", "mgh"):
        assert f"  {name} " in out and f"{PACKAGE} 0.1.0" in out, name
    assert "n_components: int, default 8" in out
    assert "fraction: float, default 0.001  fraction of normal scores above the threshold" in out
    assert "sigmas: list[float], default [1.0, 2.0]  scales in voxels" in out
    assert "reads: .mgz, .mgh" in out and "fit_closed_form (no gradient loop)" in out
    assert "layers: bank, coarse (default: bank)" in out

    # fit on .mgz scans with all four components, then score, evaluate
    train, test = tmp_path / "train", tmp_path / "test"
    _as_mgz(demo_dir / "train", train)
    _as_mgz(demo_dir / "test", test)
    model = tmp_path / "model"
    components = [
        "--set",
        "extractor.type=filterbank",
        "--set",
        "extractor.args.sigmas=[1.0]",
        "--set",
        "autoencoder.type=pca",
        "--set",
        "threshold.type=top_fraction",
    ]
    proc = _cli(["fit", "--train", str(train), "--out", str(model), *FAST, *components], env, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 epochs" in proc.stdout  # closed form: no gradient loop
    inner = model / "artifacts" / "pipeline"
    provenance = {(e["family"], e["name"]): e for e in json.loads((inner / "plugins.json").read_text())}
    for key in (("extractors", "filterbank"), ("autoencoders", "pca"), ("thresholds", "top_fraction")):
        assert provenance[key]["package"] == PACKAGE and provenance[key]["required"], key
    assert provenance[("loaders", "mgh")] == {
        "family": "loaders",
        "name": "mgh",
        "package": PACKAGE,
        "version": "0.1.0",
        "required": False,
        "extensions": [".mgz", ".mgh"],
    }
    assert f"{PACKAGE}==0.1.0" in (model / "requirements.txt").read_text().splitlines()

    scores = tmp_path / "scores"
    proc = _cli(["score", "--model", str(model), "--input", str(test), "--out", str(scores)], env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    score_map = nib.load(scores / "sub-101_score.nii.gz")  # named without the loader's extension
    source = nib.load(test / "sub-101.mgz")
    assert score_map.shape == source.shape and np.allclose(score_map.affine, source.affine)

    evaluation = tmp_path / "evaluation"
    proc = _cli(
        ["evaluate", "--model", str(model), "--input", str(test), "--masks", str(demo_dir / "test_masks")]
        + ["--out", str(evaluation)],
        env,
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads((evaluation / "metrics.json").read_text())["pixel_auc"] > 0.5

    # serving: the pyfunc model scores an .mgz payload named by its format; MLflow params carry every plugin
    payload = base64.b64encode((test / "sub-101.mgz").read_bytes()).decode()
    (tmp_path / "payload.txt").write_text(payload)
    serve = f"""
import json, mlflow, pandas as pd
from anomaly3d_core.mlops.serving import decode_nifti
model = mlflow.pyfunc.load_model({str(model)!r})
payload = open("payload.txt").read()
out = model.predict(pd.DataFrame({{"volume": [payload], "format": ["mgz"]}}))
img = decode_nifti(out.loc[0, "score_map"])
try:
    model.predict(pd.DataFrame({{"volume": [payload]}}))
    unnamed = "accepted"
except Exception as exc:
    unnamed = str(exc)
[run] = mlflow.search_runs(
    experiment_names=["anomaly3d"], filter_string="tags.`anomaly3d.command` = 'fit'", output_format="list"
)
print(json.dumps({{"shape": list(img.shape), "affine": img.affine.tolist(), "unnamed": unnamed,
                  "params": {{k: v for k, v in run.data.params.items() if k.startswith("plugin.")}}}}))
"""
    proc = _run(["-c", serve], env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    served = json.loads(proc.stdout.strip().splitlines()[-1])
    assert served["shape"] == list(source.shape) and np.allclose(served["affine"], source.affine)
    assert "'format' field" in served["unnamed"] and "mgh (.mgz .mgh)" in served["unnamed"]
    assert served["params"] == {
        "plugin.extractors.filterbank": f"{PACKAGE}==0.1.0",
        "plugin.autoencoders.pca": f"{PACKAGE}==0.1.0",
        "plugin.thresholds.top_fraction": f"{PACKAGE}==0.1.0",
        "plugin.thresholds.sigma": f"anomaly3d=={importlib.metadata.version('anomaly3d')}",
        "plugin.loaders.mgh": f"{PACKAGE}==0.1.0",
    }

    # a second, broken package in each way leaves all of this working, and is listed with the reason
    both = _env(site, broken_site, MLFLOW_TRACKING_URI=env["MLFLOW_TRACKING_URI"])
    proc = _cli(["plugins"], both, tmp_path)
    assert proc.returncode == 0, proc.stderr
    listing = proc.stdout.split("broken plugin packages (skipped; everything else works):", 1)[1]
    for kind, (_, words) in BROKEN.items():
        line = next(line for line in listing.splitlines() if f"package 'pkg-{kind}' 0.1" in line)
        assert all(word in line for word in words), line
    assert "  filterbank " in proc.stdout
    proc = _cli(
        ["score", "--model", str(model), "--input", str(test), "--out", str(tmp_path / "s2")], both, tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("skipped, everything else works") == len(BROKEN)
    assert "Traceback" not in proc.stderr
    proc = _cli(
        ["evaluate", "--model", str(model), "--input", str(test), "--masks", str(demo_dir / "test_masks")]
        + ["--out", str(tmp_path / "e2"), "-p", "no:pkg-misspelt-hook"],
        both,
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "pkg-misspelt-hook" not in proc.stderr  # turned off, so not even warned about

    # "uninstalled": the model says what to install
    proc = _cli(
        ["score", "--model", str(model), "--input", str(test), "--out", str(tmp_path / "s3")],
        _env(),
        tmp_path,
    )
    assert proc.returncode == 2
    assert (
        f"needs the extractor plugin 'filterbank' from package '{PACKAGE}' 0.1.0, which is not installed here; "
        f"pip install '{PACKAGE}==0.1.0' and retry"
    ) in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
