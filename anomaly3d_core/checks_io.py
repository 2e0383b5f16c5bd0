"""Conformance checks of threshold methods and volume loaders."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from anomaly3d_core.checks_common import (  # noqa: F401
    _EXAMPLE_DIM,
    _NAME,
    _SHAPE,
    ConformanceError,
    _check,
    _ensure,
    _example_params,
    _fail,
    _label,
)
from anomaly3d_core.errors import DataError
from anomaly3d_core.io.volume import Volume


# ----------------------------------------------------------------------------------------- thresholds
@_check
def check_threshold(cls: type) -> None:
    """``fit`` sets a finite ``threshold_`` inside the scores' range; ``predict`` splits; errors are clear."""
    check = "check_threshold"
    _ensure(
        cls.calibration in ("normal", "adaptive"),
        cls,
        check,
        f"calibration must be 'normal' or 'adaptive', got {cls.calibration!r}",
    )
    params = _example_params(cls)
    rng = np.random.default_rng(0)
    scores = np.concatenate([rng.normal(0, 1, 5000), rng.normal(8, 1, 500)])
    method = cls(params).fit(scores)
    _ensure(
        method is not None and hasattr(method, "threshold_"),
        cls,
        check,
        "fit() must return self with threshold_ set",
    )
    _ensure(
        np.isfinite(method.threshold_) and scores.min() < method.threshold_ < scores.max(),
        cls,
        check,
        f"threshold_ {method.threshold_} is not inside the scores' range",
    )
    _ensure(
        method.predict(np.array([scores.min(), scores.max()])).tolist() == [False, True],
        cls,
        check,
        "predict() must flag the highest score and not the lowest",
    )
    for bad, exc_type, words in (
        (lambda: cls(params).fit(np.array([np.nan])), ValueError, "no finite scores"),
        (lambda: cls(params).predict(scores), RuntimeError, "not fitted"),
    ):
        try:
            bad()
        except exc_type as exc:
            _ensure(words in str(exc), cls, check, f"the error should say '{words}', got: {exc}")
        else:
            _fail(cls, check, f"expected {exc_type.__name__} ('{words}')")


# -------------------------------------------------------------------------------------------- loaders
@_check
def check_loader_declaration(cls: type) -> None:
    """Lower-case dotted ``extensions`` (or a folder reader); outputs named without the extension."""
    check = "check_loader_declaration"
    exts = cls.extensions
    _ensure(
        isinstance(exts, tuple | list)
        and all(isinstance(e, str) and e.startswith(".") and e == e.lower() and len(e) > 1 for e in exts),
        cls,
        check,
        f"extensions must be lower-case strings with the dot, e.g. ('.mgz', '.mgh'), got {exts!r}",
    )
    _ensure(
        exts or cls.reads_directories,
        cls,
        check,
        "declares no extensions and does not read folders; set extensions = ('.ext', ...)",
    )
    for ext in exts:
        stem = cls.output_stem(Path(f"dir/sub-01{ext}"))
        _ensure(
            stem == "sub-01",
            cls,
            check,
            f"output_stem('sub-01{ext}') is {stem!r}; outputs are named STEM_score.nii.gz, so it must be 'sub-01'",
        )


def _example_paths(cls: type, folder: Path) -> list[Path]:
    paths = cls.example_file(folder)
    if paths is None:
        _fail(
            cls,
            "check_loader_example",
            "provides no example file; define a classmethod example_file(folder) that writes a small file "
            "of this format into folder and returns its path (and example_volume() with what it holds)",
        )
    paths = [Path(paths)] if isinstance(paths, str | Path) else [Path(p) for p in paths]
    _ensure(paths, cls, "check_loader_example", "example_file() returned no path")
    return paths


@_check
def check_loader_example(cls: type) -> None:
    """The plugin's own example file is chosen for this loader and reads to a valid 3D volume with a RAS+
    affine, equal to ``example_volume()`` when declared."""
    from anomaly3d_core.io.files import check_volume

    check = "check_loader_example"
    loader = cls(_example_params(cls))
    expected = cls.example_volume()
    with tempfile.TemporaryDirectory(prefix="anomaly3d-kit-") as tmp:
        for path in _example_paths(cls, Path(tmp)):
            _ensure(path.exists(), cls, check, f"example_file() returned {path.name}, which does not exist")
            chosen = (
                cls.matches_extension(path) or (cls.reads_directories and path.is_dir()) or cls.sniff(path)
            )
            _ensure(
                chosen,
                cls,
                check,
                f"{path.name} would not be read by this loader: its name matches none of {list(cls.extensions)} "
                "and sniff() does not recognise it",
            )
            try:
                volume = loader.load(path)
            except DataError as exc:
                _fail(cls, check, f"its own example {path.name} is refused: {exc.reason}")
            _ensure(
                isinstance(volume, Volume),
                cls,
                check,
                f"load() must return a Volume, got {type(volume).__name__}",
            )
            array = np.asarray(volume.array)
            _ensure(
                array.ndim == 3,
                cls,
                check,
                f"{path.name} loads as {array.ndim}D {array.shape}; a 3D volume is needed",
            )
            try:
                check_volume(Volume(array.copy(), volume.affine, path.name), allow_constant=True)
            except DataError as exc:
                _fail(cls, check, f"{path.name} does not load as a usable volume: {exc.reason}")
            if expected is None:
                continue
            want = np.asarray(expected.array)
            _ensure(
                array.shape == want.shape,
                cls,
                check,
                f"{path.name}: shape {array.shape}, example_volume() {want.shape}",
            )
            _ensure(
                array.dtype.newbyteorder("=") == want.dtype.newbyteorder("="),  # byte order aside
                cls,
                check,
                f"{path.name}: dtype {array.dtype}, example_volume() {want.dtype}",
            )
            _ensure(
                np.allclose(array, want),
                cls,
                check,
                f"{path.name}: voxel values differ from example_volume()",
            )
            _ensure(
                np.allclose(volume.affine, expected.affine, atol=1e-5),
                cls,
                check,
                f"{path.name}: affine\n{volume.affine}\ndiffers from example_volume()'s\n{expected.affine}",
            )


@_check
def check_loader_rejects_garbage(cls: type) -> None:
    """A file of this format's name that holds no such content raises ``DataError`` (a one-line reason)."""
    check = "check_loader_rejects_garbage"
    loader = cls(_example_params(cls))
    with tempfile.TemporaryDirectory(prefix="anomaly3d-kit-") as tmp:
        folder = Path(tmp) / "garbage"
        folder.mkdir()
        path = folder / f"garbage{cls.extensions[0] if cls.extensions else '.bin'}"
        path.write_bytes(b"this is not a scan\n" * 8)
        target = path if cls.extensions else folder
        try:
            loader.load(target)
        except DataError as exc:
            _ensure(str(exc).strip(), cls, check, "DataError without a reason")
            return
        except Exception as exc:
            _fail(
                cls,
                check,
                f"a garbage {target.name} raises {type(exc).__name__} ({exc}); raise "
                "anomaly3d_core.errors.DataError(path, reason) on bad input",
            )
        _fail(cls, check, f"a garbage {target.name} loads without an error; raise DataError(path, reason)")


# ---------------------------------------------------------------------------------------------- index
