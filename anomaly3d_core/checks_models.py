"""Conformance checks of the network components: feature extractors and autoencoders."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

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
from anomaly3d_core.interfaces import (
    Autoencoder,
    FeatureExtractor,
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
