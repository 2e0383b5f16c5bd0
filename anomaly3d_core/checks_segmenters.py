"""Conformance checks of segmenters (the synthetic-anomaly detector's networks)."""

from __future__ import annotations

import torch

from anomaly3d_core.checks_common import _check, _ensure, _example_params, _fail
from anomaly3d_core.interfaces import Segmenter


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
