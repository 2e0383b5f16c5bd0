"""The conformance kit: the checks anomaly3d runs on its own components, for any plugin's test suite.

A plugin package tests its components against the same contract (:mod:`anomaly3d_core.interfaces`)
as the built-ins, as scikit-learn's ``parametrize_with_checks`` does for estimators::

    from anomaly3d_core.testing import parametrize_with_checks
    from my_package import FilterBank, MyLoader, PCAAutoencoder, TopFraction

    @parametrize_with_checks([FilterBank, PCAAutoencoder, TopFraction, MyLoader])
    def test_conformance(component, check):
        check(component)

``check_component(cls)`` runs every check on one class and raises :class:`ConformanceError`
(an ``AssertionError``) at the first failure, naming the component, the check and the fix.

Components are built with their own defaults, or with what their ``example_params()``
classmethod returns (to keep a big network small here); a loader's check reads the example file
its ``example_file(folder)`` classmethod writes. Nothing here depends on pytest except
:func:`parametrize_with_checks`.
"""

from __future__ import annotations

import functools
import math
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError

from anomaly3d_core.errors import DataError
from anomaly3d_core.interfaces import (
    Autoencoder,
    FeatureExtractor,
    Params,
    Segmenter,
    ThresholdMethod,
    VolumeLoader,
    api_version_problem,
    family_of,
)
from anomaly3d_core.io.volume import Volume

Check = Callable[[type], None]
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")
_EXAMPLE_DIM = 24  # autoencoder input width in the checks
_SHAPE = (32, 32, 32)  # extractor input in the checks


class ConformanceError(AssertionError):
    """A component does not meet its contract; the message names it, the check and the fix."""


def _label(cls: type) -> str:
    family = family_of(cls)
    kind = family[:-1] if family else "component"
    return f"{kind} '{getattr(cls, 'name', '?')}' ({cls.__module__}.{cls.__qualname__})"


def _fail(cls: type, check: str, message: str) -> None:
    raise ConformanceError(f"{_label(cls)} fails {check}: {message}")


def _ensure(ok: Any, cls: type, check: str, message: str) -> None:
    if not ok:
        _fail(cls, check, message)


def _check(fn: Check) -> Check:
    """A check whose unexpected exceptions become a :class:`ConformanceError` naming the component."""

    @functools.wraps(fn)
    def run(cls: type) -> None:
        try:
            fn(cls)
        except ConformanceError:
            raise
        except Exception as exc:
            text = " ".join(str(exc).split())
            raise ConformanceError(
                f"{_label(cls)} fails {fn.__name__}: {type(exc).__name__}{': ' + text if text else ''}"
            ) from exc

    return run


def _example_params(cls: type, **override: Any) -> dict[str, Any]:
    """``example_params()`` (or the defaults) with ``override``, validated by the component's ``Params``."""
    params = {**dict(cls.example_params()), **override}
    try:
        cls.Params(**params)
    except ValidationError as exc:
        where = "example_params()" if cls.example_params() else "its default parameters"
        _fail(
            cls,
            "check_params",
            f"cannot be built from {where} {params} ({' '.join(str(exc).split())}); "
            "give every parameter a default or declare a classmethod example_params() returning valid ones",
        )
    return params


# --------------------------------------------------------------------------------------------- common
@_check
def check_declaration(cls: type) -> None:
    """A family base class, a valid unique-able ``name``, a ``Params`` model, the contract version."""
    check = "check_declaration"
    _ensure(
        family_of(cls),
        cls,
        check,
        "it subclasses none of FeatureExtractor, Autoencoder, ThresholdMethod, VolumeLoader, Segmenter "
        "(anomaly3d_core.interfaces)",
    )
    name = getattr(cls, "name", None)
    _ensure(
        isinstance(name, str) and _NAME.fullmatch(name),
        cls,
        check,
        f"name {name!r} is not valid; set a class attribute name = 'my_name' (letters, digits, _ . -)",
    )
    _ensure(
        isinstance(cls.Params, type) and issubclass(cls.Params, Params),
        cls,
        check,
        "Params must subclass anomaly3d_core.interfaces.Params (unknown keys are then rejected)",
    )
    abstract = sorted(
        getattr(cls, "__abstractmethods__", None)
        or [n for n in dir(cls) if getattr(getattr(cls, n, None), "__isabstractmethod__", False)]
    )
    _ensure(not abstract, cls, check, f"abstract methods left unimplemented: {', '.join(abstract)}")
    problem = api_version_problem(cls)
    _ensure(not problem or problem[0] != "error", cls, check, problem[1] if problem else "")
    _ensure(isinstance(cls.example_params(), Mapping), cls, check, "example_params() must return a dict")


@_check
def check_params(cls: type) -> None:
    """The component builds from its defaults or ``example_params()``; unknown parameters are refused."""
    params = _example_params(cls)
    try:
        cls.Params(**{**params, "no_such_parameter_xyz": 1})
    except ValidationError:
        return
    _fail(
        cls,
        "check_params",
        "Params accepts an unknown key; derive Params from anomaly3d_core.interfaces.Params",
    )


# ----------------------------------------------------------------------------------------- extractors
def _extractor(cls: type, **override: Any) -> FeatureExtractor:
    torch.manual_seed(0)
    return cls(_example_params(cls, **override))


@_check
def check_extractor_layers(cls: type) -> None:
    """``layers``, non-empty ``default_layers`` among them, and channels and strides for each layer."""
    check = "check_extractor_layers"
    model = _extractor(cls)
    layers = tuple(model.layers)
    _ensure(
        layers and all(isinstance(n, str) for n in layers),
        cls,
        check,
        "declares no layers; set layers = ('name', ...) (shallow to deep), as a class attribute or in __init__",
    )
    default = tuple(model.default_layers)
    _ensure(
        default,
        cls,
        check,
        f"declares no default_layers; set default_layers to a non-empty subset of {list(layers)} "
        "(the layers used when extractor.layers is not set)",
    )
    _ensure(
        set(default) <= set(layers),
        cls,
        check,
        f"default_layers {list(default)} are not all among layers {list(layers)}",
    )
    for name in layers:
        channels, stride = model.layer_channels.get(name), model.layer_strides.get(name)
        _ensure(
            isinstance(channels, int) and channels > 0,
            cls,
            check,
            f"layer_channels['{name}'] must be a positive int (set it in __init__), got {channels!r}",
        )
        _ensure(
            isinstance(stride, int) and stride >= 1,
            cls,
            check,
            f"layer_strides['{name}'] must be an int >= 1 (set it in __init__), got {stride!r}",
        )


def _check_maps(cls: type, check: str, model: FeatureExtractor, x: torch.Tensor, exact: bool) -> None:
    requests = [list(model.layers), list(model.default_layers)] + [[n] for n in model.layers]
    for layers in requests:
        with torch.no_grad():
            out = model(x, layers)
        _ensure(
            isinstance(out, Mapping) and set(out) == set(layers),
            cls,
            check,
            f"forward(x, {layers}) must return a dict with exactly those layers, got "
            f"{sorted(out) if isinstance(out, Mapping) else type(out).__name__}",
        )
        for name in layers:
            fmap, stride = out[name], model.layer_strides[name]
            want = (x.shape[0], model.layer_channels[name], *(math.ceil(n / stride) for n in x.shape[2:]))
            shape = tuple(fmap.shape)
            ok = (
                shape == want
                if exact
                else len(shape) == 5
                and shape[:2] == want[:2]
                and all(abs(a - b) <= 1 for a, b in zip(shape[2:], want[2:], strict=True))
            )
            _ensure(
                ok,
                cls,
                check,
                f"layer '{name}' of an input {tuple(x.shape)} has shape {shape}, expected {want} "
                "(batch, layer_channels, ceil(size / layer_strides) per axis)",
            )
            _ensure(torch.isfinite(fmap).all(), cls, check, f"layer '{name}' holds NaN or Inf")


@_check
def check_extractor_forward(cls: type) -> None:
    """Every requested layer, with the declared channels, at the declared stride, on cubic and other grids."""
    model = _extractor(cls).freeze()
    channels = model.in_channels
    _check_maps(cls, "check_extractor_forward", model, torch.randn(2, channels, *_SHAPE), exact=True)
    _check_maps(cls, "check_extractor_forward", model, torch.randn(1, channels, 16, 24, 40), exact=False)


@_check
def check_extractor_in_channels(cls: type) -> None:
    """``in_channels`` is honoured: 2-channel input when ``Params`` declares it, else exactly 1 channel."""
    check = "check_extractor_in_channels"
    if "in_channels" not in cls.Params.model_fields:
        model = _extractor(cls)
        _ensure(
            model.in_channels == 1,
            cls,
            check,
            f"in_channels is {model.in_channels} without an in_channels parameter; it must be 1",
        )
        return
    model = _extractor(cls, in_channels=2).freeze()
    _ensure(
        model.in_channels == 2,
        cls,
        check,
        f"built with in_channels=2 it reports in_channels={model.in_channels}",
    )
    try:
        _check_maps(cls, check, model, torch.randn(1, 2, *_SHAPE), exact=True)
    except ConformanceError:
        raise
    except Exception as exc:
        _fail(
            cls,
            check,
            f"a 2-channel input fails ({type(exc).__name__}: {exc}); build the first layer with in_channels",
        )


@_check
def check_extractor_frozen(cls: type) -> None:
    """``freeze()`` leaves no gradients and evaluation mode, and then ``forward`` is deterministic."""
    check = "check_extractor_frozen"
    model = _extractor(cls)
    _ensure(model.freeze() is model, cls, check, "freeze() must return self")
    _ensure(
        not any(p.requires_grad for p in model.parameters()), cls, check, "parameters still need gradients"
    )
    _ensure(not any(m.training for m in model.modules()), cls, check, "modules left in training mode")
    x = torch.randn(1, model.in_channels, *_SHAPE)
    with torch.no_grad():
        a, b = model(x, list(model.layers)), model(x, list(model.layers))
    for name in model.layers:
        _ensure(
            torch.equal(a[name], b[name]), cls, check, f"frozen, layer '{name}' differs between two calls"
        )


@_check
def check_extractor_state(cls: type) -> None:
    """Everything the output depends on is in ``state_dict`` (saved weights, checkpoints), and gradients
    flow through the layers when there are parameters (self-supervised pretraining)."""
    check = "check_extractor_state"
    first = _extractor(cls).freeze()
    torch.manual_seed(1)
    second = cls(_example_params(cls)).freeze()
    try:
        second.load_state_dict(first.state_dict())
    except RuntimeError as exc:
        _fail(
            cls,
            check,
            f"its own state_dict does not load into a second instance ({str(exc).splitlines()[0]})",
        )
    x = torch.randn(1, first.in_channels, *_SHAPE)
    with torch.no_grad():
        a, b = first(x, list(first.layers)), second(x, list(first.layers))
    for name in first.layers:
        _ensure(
            torch.allclose(a[name], b[name]),
            cls,
            check,
            f"layer '{name}' differs after loading the state_dict; keep fixed tensors in registered buffers",
        )
    if any(p.numel() for p in first.parameters()):
        model = first.requires_grad_(True).train()
        x = torch.randn(2, first.in_channels, *_SHAPE, requires_grad=True)  # batch 2: batch norm trains
        out = model(x, list(model.layers))
        out[list(model.layers)[-1]].float().pow(2).mean().backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        _ensure(
            grads and all(torch.isfinite(g).all() for g in grads),
            cls,
            check,
            "no finite gradients reach the parameters (extractor pretraining needs them)",
        )


# --------------------------------------------------------------------------------------- autoencoders
def _vectors(n: int = 64, dim: int = _EXAMPLE_DIM, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    basis = torch.randn(4, dim, generator=gen)
    return torch.randn(n, 4, generator=gen) @ basis + 0.1 * torch.randn(n, dim, generator=gen)


def _autoencoder(cls: type, dim: int = _EXAMPLE_DIM) -> Autoencoder:
    torch.manual_seed(0)
    return cls(dim, _example_params(cls))


def _fitted(cls: type, x: torch.Tensor) -> Autoencoder:
    """A model fitted the way the pipeline fits it: closed form, or a few gradient steps."""
    model = _autoencoder(cls, x.shape[1])
    if not cls.trainable:
        model.eval()
        with torch.no_grad():
            model.fit_closed_form(x)
        return model.eval()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for _ in range(3):
        opt.zero_grad()
        loss, _ = model.loss(x, model(model.corrupt(x)))
        loss.backward()
        opt.step()
    return model.eval()


@_check
def check_autoencoder_forward(cls: type) -> None:
    """``forward`` reconstructs ``(N, input_dim)`` for any width, with or without ``spatial_shape``."""
    check = "check_autoencoder_forward"
    for dim, layout in ((_EXAMPLE_DIM, None), (7, None), (27, (3, 2, 2, 2))):
        model = _autoencoder(cls, dim)
        _ensure(
            hasattr(model, "spatial_shape") and model.spatial_shape is None,
            cls,
            check,
            "spatial_shape must start as None; call super().__init__(input_dim, params, **kwargs) in __init__",
        )
        _ensure(model.input_dim == dim, cls, check, f"input_dim is {model.input_dim}, built with {dim}")
        model.spatial_shape = layout  # 3 x 2³ voxels, then 3 position features, as the pipeline sets it
        x = _vectors(16, dim)
        corrupted = model.corrupt(x)
        _ensure(
            tuple(corrupted.shape) == tuple(x.shape),
            cls,
            check,
            f"corrupt() changes the shape {tuple(x.shape)} to {tuple(corrupted.shape)}",
        )
        out = model(corrupted)
        _ensure(
            isinstance(out, Mapping) and "recon" in out,
            cls,
            check,
            "forward(x) must return a dict with at least 'recon'",
        )
        _ensure(
            tuple(out["recon"].shape) == tuple(x.shape),
            cls,
            check,
            f"'recon' has shape {tuple(out['recon'].shape)}, expected {tuple(x.shape)}",
        )


@_check
def check_autoencoder_fit(cls: type) -> None:
    """A trainable model gets a finite loss and finite gradients; one with ``trainable = False`` fits in
    closed form (``fit_closed_form``), without the gradient loop."""
    check = "check_autoencoder_fit"
    x = _vectors()
    model = _autoencoder(cls)
    if cls.trainable:
        params = [p for p in model.parameters() if p.requires_grad]
        _ensure(
            params,
            cls,
            check,
            "a trainable autoencoder has no trainable parameters; for a closed-form model set "
            "trainable = False and implement fit_closed_form(vectors)",
        )
        model.train()
        loss, parts = model.loss(x, model(model.corrupt(x)))
        _ensure(
            loss.ndim == 0 and torch.isfinite(loss), cls, check, f"loss must be a finite scalar, got {loss}"
        )
        _ensure(
            isinstance(parts, Mapping) and "recon" in parts,
            cls,
            check,
            "loss() must also return its named parts, 'recon' among them",
        )
        loss.backward()
        _ensure(
            all(p.grad is not None and torch.isfinite(p.grad).all() for p in params),
            cls,
            check,
            "some trainable parameters get no finite gradient from the loss",
        )
        return
    _ensure(
        type(model).fit_closed_form is not Autoencoder.fit_closed_form,
        cls,
        check,
        "trainable = False, but fit_closed_form(vectors) is not implemented",
    )
    model.eval()
    with torch.no_grad():
        model.fit_closed_form(x)
        loss, parts = model.loss(x, model(x))
    _ensure(torch.isfinite(loss), cls, check, "after fit_closed_form the loss is not finite")
    _ensure(
        isinstance(parts, Mapping) and "recon" in parts,
        cls,
        check,
        "loss() must return its parts, 'recon' among them",
    )


@_check
def check_autoencoder_scores(cls: type) -> None:
    """Scores ``(N,)`` and per-feature residuals ``(N, D)``: finite, non-negative, deterministic in eval
    mode; per-voxel scoring spreads the residual and the remainder of the score."""
    check = "check_autoencoder_scores"
    x = _vectors()
    model = _fitted(cls, x)
    with torch.no_grad():
        out = model(x)
        score, again = model.anomaly_score(x, out), model.anomaly_score(x, model(x))
        residual = model.residual(x, out)
    _ensure(
        tuple(score.shape) == (len(x),),
        cls,
        check,
        f"anomaly_score has shape {tuple(score.shape)}, expected ({len(x)},)",
    )
    _ensure(
        torch.isfinite(score).all() and (score >= 0).all(),
        cls,
        check,
        "anomaly_score must be finite and >= 0",
    )
    _ensure(
        torch.allclose(score, again), cls, check, "in eval() mode anomaly_score differs between two calls"
    )
    if cls.per_feature_residual:
        _ensure(
            tuple(residual.shape) == tuple(x.shape),
            cls,
            check,
            f"residual has shape {tuple(residual.shape)}, expected {tuple(x.shape)} (or set per_feature_residual = False)",
        )
        _ensure(
            torch.isfinite(residual).all() and (residual >= 0).all(),
            cls,
            check,
            "residual must be finite and >= 0 (or set per_feature_residual = False)",
        )


@_check
def check_autoencoder_state(cls: type) -> None:
    """A fitted model's ``state_dict`` restores it: the saved model scores exactly as the fitted one."""
    check = "check_autoencoder_state"
    x = _vectors()
    model = _fitted(cls, x)
    fresh = _autoencoder(cls)
    try:
        fresh.load_state_dict(model.state_dict())
    except RuntimeError as exc:
        _fail(cls, check, f"its state_dict does not load into a fresh instance ({str(exc).splitlines()[0]})")
    fresh.eval()
    with torch.no_grad():
        a, b = model.anomaly_score(x, model(x)), fresh.anomaly_score(x, fresh(x))
    _ensure(
        torch.allclose(a, b, rtol=1e-5, atol=1e-6),
        cls,
        check,
        "a fresh instance loaded with the fitted state_dict scores differently; keep fitted state in "
        "parameters or registered buffers (register_buffer)",
    )


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


# ----------------------------------------------------------------------------------------- segmenters
def _segmenter(cls: type, in_channels: int = 1) -> Segmenter:
    torch.manual_seed(0)
    return cls(in_channels, _example_params(cls))


@_check
def check_segmenter_forward(cls: type) -> None:
    """Logits ``(B, 1, D, H, W)`` for 1 and 2 input channels and any size that is a multiple of
    ``size_multiple``; finite."""
    check = "check_segmenter_forward"
    for channels in (1, 2):
        model = _segmenter(cls, channels).eval()
        _ensure(
            getattr(model, "in_channels", None) == channels,
            cls,
            check,
            f"in_channels is {getattr(model, 'in_channels', None)!r}, built with {channels}; call "
            "super().__init__(in_channels, params, **kwargs) in __init__",
        )
        m = int(getattr(model, "size_multiple", 1))
        _ensure(m >= 1, cls, check, f"size_multiple must be an int >= 1, got {m!r}")
        for size in ((2 * m, 3 * m, 2 * m), (4 * m, 2 * m, 3 * m)):
            x = torch.randn(2, channels, *size)
            with torch.no_grad():
                out = model(x)
            _ensure(
                tuple(out.shape) == (2, 1, *size),
                cls,
                check,
                f"forward of {tuple(x.shape)} gives {tuple(out.shape)}, expected {(2, 1, *size)}",
            )
            _ensure(torch.isfinite(out).all(), cls, check, "forward gives non-finite logits")


@_check
def check_segmenter_fit(cls: type) -> None:
    """Finite gradients reach the parameters; a few steps lower the loss on a fixed target."""
    check = "check_segmenter_fit"
    model = _segmenter(cls).train()
    m = int(getattr(model, "size_multiple", 1))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 4 * m, 4 * m, 4 * m, generator=gen)
    target = (x > 1).float()
    params = [p for p in model.parameters() if p.requires_grad]
    _ensure(params, cls, check, "it has no trainable parameters")
    opt = torch.optim.Adam(params, lr=1e-2)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), target)
        loss.backward()
        _ensure(
            all(p.grad is None or torch.isfinite(p.grad).all() for p in params),
            cls,
            check,
            "non-finite gradients",
        )
        opt.step()
        losses.append(float(loss))
    _ensure(
        losses[-1] < losses[0],
        cls,
        check,
        f"5 Adam steps do not lower the loss ({losses[0]:.4f} -> {losses[-1]:.4f})",
    )


@_check
def check_segmenter_state(cls: type) -> None:
    """In ``eval()`` mode a voxel's output does not depend on the batch, and ``state_dict`` restores it."""
    check = "check_segmenter_state"
    model = _segmenter(cls).train()
    m = int(getattr(model, "size_multiple", 1))
    x = torch.randn(3, 1, 4 * m, 4 * m, 4 * m, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(x)  # moves running statistics, as training does
    model.eval()
    fresh = _segmenter(cls)
    try:
        fresh.load_state_dict(model.state_dict())
    except RuntimeError as exc:
        _fail(cls, check, f"its state_dict does not load into a fresh instance ({str(exc).splitlines()[0]})")
    fresh.eval()
    with torch.no_grad():
        whole, alone, restored = model(x), model(x[:1]), fresh(x)
    _ensure(
        torch.allclose(whole[:1], alone, atol=1e-5),
        cls,
        check,
        "in eval() mode a sample's output depends on the rest of the batch (batch statistics in eval mode?)",
    )
    _ensure(
        torch.allclose(whole, restored, atol=1e-5),
        cls,
        check,
        "a fresh instance loaded with the state_dict gives other logits; keep learnt state in parameters or buffers",
    )


# ---------------------------------------------------------------------------------------------- index
_CHECKS: dict[type, list[Check]] = {
    FeatureExtractor: [
        check_extractor_layers,
        check_extractor_forward,
        check_extractor_in_channels,
        check_extractor_frozen,
        check_extractor_state,
    ],
    Autoencoder: [
        check_autoencoder_forward,
        check_autoencoder_fit,
        check_autoencoder_scores,
        check_autoencoder_state,
    ],
    ThresholdMethod: [check_threshold],
    VolumeLoader: [check_loader_declaration, check_loader_example, check_loader_rejects_garbage],
    Segmenter: [check_segmenter_forward, check_segmenter_fit, check_segmenter_state],
}


def checks_for(cls: type) -> list[Check]:
    """Every check that applies to ``cls``: the common ones, then its family's."""
    common: list[Check] = [check_declaration, check_params]
    for base, checks in _CHECKS.items():
        if isinstance(cls, type) and issubclass(cls, base):
            return common + checks
    return [check_declaration]


@_check
def check_component(cls: type) -> None:
    """Run every check on ``cls``; raises :class:`ConformanceError` at the first failure."""
    for check in checks_for(cls):
        check(cls)


def _as_class(component: Any) -> type:
    return getattr(component, "cls", component)  # a registry ComponentInfo, or the class itself


def parametrize_with_checks(components: Iterable[Any]) -> Any:
    """A ``pytest.mark.parametrize`` over ``(component, check)`` pairs, one test per check, with ids such
    as ``pca-check_autoencoder_fit``. ``components`` are classes (or registry ``ComponentInfo``)."""
    import pytest

    pairs, ids = [], []
    for component in components:
        cls = _as_class(component)
        label = getattr(component, "qualified", None) or getattr(cls, "name", None) or cls.__qualname__
        for check in checks_for(cls):
            pairs.append((cls, check))
            ids.append(f"{label}-{check.__name__}")
    return pytest.mark.parametrize(("component", "check"), pairs, ids=ids)


def registered_components(
    families: str | Sequence[str] | None = None, package: str | None = None, registry: Any = None
) -> list[Any]:
    """The registered components (``ComponentInfo``) of ``families`` (default: all), optionally of one
    ``package`` only: e.g. ``parametrize_with_checks(registered_components(package='my-package'))``
    checks a package as it is installed, through its entry points."""
    from anomaly3d_core.registry import FAMILIES, get_registry, normalize_package

    reg = registry or get_registry()
    chosen = [families] if isinstance(families, str) else list(families or FAMILIES)
    return [
        info
        for family in chosen
        for info in reg.infos(family)
        if package is None or normalize_package(info.package) == normalize_package(package)
    ]
