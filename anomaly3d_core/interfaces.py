"""The contracts a plugin implements, one abstract base per family: the whole of what the core relies on.

Every attribute or method the core reads from a component is declared here with a default and a
docstring, and :mod:`anomaly3d_core.testing` (the conformance kit) checks it. Every component
declares its parameters as a pydantic model ``Params`` (unknown keys are rejected), so a typo in a
plugin's arguments is caught when the config is validated.

**Contract version.** :data:`API_VERSION` numbers this contract. A component may declare the
version it was written for (``api_version = 1``); the host accepts versions from
:data:`MIN_API_VERSION` to :data:`API_VERSION`, warns (naming the package and what to change) for
the versions listed in :data:`DEPRECATED_API_VERSIONS`, and reports a component written for a
newer or a retired version as broken, without taking the other components down. A component that
declares nothing is taken to follow the current version. When the contract changes
incompatibly, ``API_VERSION`` goes up, the old version moves to ``DEPRECATED_API_VERSIONS`` with
the change to make, and it is retired (``MIN_API_VERSION`` raised) no earlier than one minor
release later.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from anomaly3d_core.io.volume import Volume

#: The version of this contract; a component declares the one it was written for in ``api_version``.
API_VERSION = 1
#: The oldest contract version the host still accepts.
MIN_API_VERSION = 1
#: Accepted but deprecated versions -> what a plugin author has to change (shown in the warning).
DEPRECATED_API_VERSIONS: dict[int, str] = {}


def api_version_problem(cls: type) -> tuple[str, str] | None:
    """``("error" | "deprecated", message)`` when ``cls.api_version`` is not the current contract."""
    version = getattr(cls, "api_version", None)
    if version is None:
        return None
    if isinstance(version, bool) or not isinstance(version, int):
        return "error", f"api_version must be an integer such as {API_VERSION}, got {version!r}"
    if version > API_VERSION:
        return "error", (
            f"written for anomaly3d plugin API {version}, but this anomaly3d provides API {API_VERSION}; "
            "upgrade anomaly3d (pip install -U anomaly3d)"
        )
    if version < MIN_API_VERSION:
        return "error", (
            f"written for anomaly3d plugin API {version}, which is no longer supported (oldest: "
            f"{MIN_API_VERSION}); upgrade the plugin package or pin an older anomaly3d"
        )
    if version in DEPRECATED_API_VERSIONS:
        return "deprecated", (
            f"written for the deprecated anomaly3d plugin API {version} (current: {API_VERSION}); "
            f"{DEPRECATED_API_VERSIONS[version]}"
        )
    return None


class Params(BaseModel):
    """Base of every plugin's parameter model: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class Component:
    """Shared by all families: a unique ``name``, a ``Params`` model and the contract version.

    ``name`` is how configs refer to the component (``threshold: {type: NAME}``); it must be unique
    within its family across installed packages (``package:NAME`` picks one when two clash), and
    may not contain ``:`` or whitespace.
    """

    name: ClassVar[str] = ""
    Params: ClassVar[type[Params]] = Params
    #: The :data:`API_VERSION` this component was written for (``None``: the current one).
    api_version: ClassVar[int | None] = None

    @classmethod
    def validate_params(cls, params: Params | Mapping[str, Any] | None = None, **kwargs: Any) -> Params:
        if isinstance(params, BaseModel):
            return params if not kwargs else cls.Params(**{**params.model_dump(), **kwargs})
        return cls.Params(**{**dict(params or {}), **kwargs})

    @classmethod
    def example_params(cls) -> dict[str, Any]:
        """Arguments the conformance kit builds the component with (default: its own defaults).

        Override to keep the checks small and fast (e.g. a narrow network); never needed for
        correctness.
        """
        return {}


class FeatureExtractor(Component, nn.Module):
    """Maps a ``(B, in_channels, D, H, W)`` volume to named feature maps.

    What the core relies on:

    - ``layers``: every layer name, shallow to deep; ``default_layers``: the non-empty subset
      used when ``extractor.layers`` is not set. Both may be set per instance in ``__init__``.
    - ``layer_channels[name]`` and ``layer_strides[name]`` (set in ``__init__``): the channels of
      each layer's map and its stride in voxels; the map of a ``(D, H, W)`` input is
      ``ceil(D / stride)`` (and so on) along each axis.
    - ``forward(x, layers)`` returns exactly the requested layers.
    - ``in_channels``: the channels the input has (``Params.in_channels`` when declared, else 1).
      The pipeline feeds single-channel scans; an extractor with an ``in_channels`` parameter must
      accept that many channels (the kit checks 2).
    - **Frozen.** The pipeline calls :meth:`freeze` and never trains the extractor with the
      autoencoder: its weights come from ``__init__``, ``extractor.checkpoint`` (a ``state_dict``)
      or self-supervised pretraining (``extractor.pretrain_epochs``, which needs gradients to
      flow through the layers when the extractor has parameters). Frozen, ``forward`` must be
      deterministic. Fixed tensors (filters) belong in registered buffers so they move with
      ``.to(device)`` and are saved with the model.
    """

    layers: ClassVar[tuple[str, ...]] = ()
    default_layers: ClassVar[tuple[str, ...]] = ()

    def __init__(self, params: Params | Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        nn.Module.__init__(self)
        self.params = self.validate_params(params, **kwargs)
        self.layer_channels: dict[str, int] = {}
        self.layer_strides: dict[str, int] = {}

    @property
    def in_channels(self) -> int:
        """Input channels this extractor expects."""
        return int(getattr(self.params, "in_channels", 1))

    def freeze(self) -> FeatureExtractor:
        """Evaluation mode, no gradients: how the core uses an extractor. Returns ``self``."""
        self.requires_grad_(False).eval()
        return self

    @abstractmethod
    def forward(self, x: torch.Tensor, layers: tuple[str, ...] | list[str]) -> dict[str, torch.Tensor]:
        """Return the feature map of every requested layer."""


class Autoencoder(Component, nn.Module):
    """Reconstructs embedding vectors ``(N, input_dim)`` and scores them.

    What the core relies on:

    - ``__init__(input_dim, params)``; ``forward(x)`` returns at least ``{'recon': (N, input_dim)}``.
    - **Scores.** :meth:`anomaly_score` gives one non-negative score per vector. In per-voxel
      scoring (``patches.score_mode: voxel``, the default with the ``flatten`` embedding) each
      patch's vector is a flattened ``(C, d, h, w)`` block, and the core spreads
      :meth:`residual` (per feature, channel-averaged per voxel) over the patch's voxels, plus the
      per-vector remainder ``anomaly_score - residual.mean(1)`` (e.g. a KL term) evenly. Set
      ``per_feature_residual = False`` when the residual has no per-feature meaning; per-voxel
      scoring then falls back to one score per patch.
    - ``spatial_shape``: set by the pipeline before training to ``(C, d, h, w)`` when the vector's
      first ``C*d*h*w`` features keep a spatial layout (``flatten``/``adaptive`` embeddings), else
      ``None``; further features (patch positions) may follow.
    - **Training.** ``trainable = True``: the core's gradient loop minimises :meth:`loss` on
      :meth:`corrupt`-ed inputs (early stopping, schedules, DDP, checkpoints). ``trainable = False``:
      the model fits in closed form (a PCA, a Gaussian model): the pipeline calls
      :meth:`fit_closed_form` once on all training vectors instead of the loop.
    - **Saved state.** Everything fitted lives in parameters or registered buffers, so the
      ``state_dict`` saved with the model restores it; in ``eval()`` mode scores are deterministic.
    """

    #: Fitted by the gradient loop (True) or by :meth:`fit_closed_form` (False).
    trainable: ClassVar[bool] = True
    #: Whether :meth:`residual` is meaningful per feature (per-voxel scoring needs it).
    per_feature_residual: ClassVar[bool] = True

    def __init__(
        self, input_dim: int, params: Params | Mapping[str, Any] | None = None, **kwargs: Any
    ) -> None:
        nn.Module.__init__(self)
        self.params = self.validate_params(params, **kwargs)
        self.input_dim = int(input_dim)
        #: ``(C, d, h, w)`` layout of the leading features, set by the pipeline (see the class doc).
        self.spatial_shape: tuple[int, int, int, int] | None = None

    @abstractmethod
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return at least ``{'recon': ...}``."""

    def corrupt(self, x: torch.Tensor) -> torch.Tensor:
        """Input seen during training (denoising variants add noise here)."""
        return x

    def loss(self, x: torch.Tensor, out: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """Training loss and its named parts (``'recon'`` at least); also the validation loss."""
        rec = ((out["recon"].float() - x.float()) ** 2).mean()
        return rec, {"recon": float(rec.detach())}

    def residual(self, x: torch.Tensor, out: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-feature reconstruction error ``(N, input_dim)``, non-negative: squared error by default."""
        return (out["recon"].float() - x.float()) ** 2

    def anomaly_score(self, x: torch.Tensor, out: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-sample anomaly score ``(N,)``: the mean of :meth:`residual` by default."""
        return self.residual(x, out).mean(dim=1)

    def fit_closed_form(self, vectors: torch.Tensor) -> None:
        """Fit on all training vectors ``(N, input_dim)`` at once (``trainable = False`` models only).

        Called under ``torch.no_grad()`` on the training device; store the result in registered
        buffers so it is saved with the model.
        """
        raise NotImplementedError(
            f"autoencoder '{self.name}' sets trainable = False but does not implement fit_closed_form(vectors)"
        )


class ThresholdMethod(Component, ABC):
    """A decision rule on anomaly scores, fitted scikit-learn style (``fit`` sets ``threshold_``).

    ``calibration`` is ``"normal"`` for rules fitted on scores of normal data only (calibrated once
    on held-out normal scans and saved with the model) and ``"adaptive"`` for rules that split a
    score map or mixed distribution (computed per score map). ``_compute`` receives finite 1D
    scores and returns a float inside their range.
    """

    calibration: ClassVar[str] = "normal"

    def __init__(self, params: Params | Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        self.params = self.validate_params(params, **kwargs)

    @abstractmethod
    def _compute(self, scores: np.ndarray) -> float:
        """Threshold for finite, 1D ``scores``."""

    def fit(self, scores: np.ndarray) -> ThresholdMethod:
        values = np.asarray(scores, dtype=np.float64).ravel()
        values = values[np.isfinite(values)]
        if values.size == 0:
            raise ValueError(f"threshold '{self.name}': no finite scores to fit on")
        self.threshold_ = float(self._compute(values))
        return self

    def predict(self, scores: np.ndarray) -> np.ndarray:
        """Boolean mask, ``True`` where a score exceeds the fitted threshold."""
        if not hasattr(self, "threshold_"):
            raise RuntimeError(f"threshold '{self.name}' is not fitted; call fit(scores) first")
        return np.asarray(scores) > self.threshold_


class VolumeLoader(Component, ABC):
    """Reads one format into a :class:`Volume` with a RAS+ affine.

    What the core relies on:

    - **Choice.** A file is read by the loader whose ``extensions`` (lower-case, with the dot,
      e.g. ``(".mgz", ".mgh")``) end its name, else by the first whose :meth:`sniff` recognises
      the content; a folder by a loader with ``reads_directories = True`` whose :meth:`sniff`
      accepts it. The server uses :meth:`sniff` too when a request does not name the format.
    - **Reading.** :meth:`load` returns a 3D :class:`Volume` (any real dtype; the core converts)
      whose affine maps voxel indices to RAS+ millimetres. It checks what the header claims
      against :mod:`anomaly3d_core.io.limits` (``limits.check_claim``) before reading voxel data,
      and raises :class:`~anomaly3d_core.errors.DataError` with the reason on bad input.
    - **Output names.** :meth:`output_stem` is the input's name without the format's extension:
      outputs are ``STEM_score.nii.gz`` and ``STEM_mask.nii.gz`` (always NIfTI, on the input's grid).
    - **Conformance.** :meth:`example_file` writes a small file (or several) of the format, and
      :meth:`example_volume` says what loading it must give; the kit loads it for real.
    """

    extensions: ClassVar[tuple[str, ...]] = ()
    reads_directories: ClassVar[bool] = False

    def __init__(self, params: Params | Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        self.params = self.validate_params(params, **kwargs)

    @classmethod
    def matches_extension(cls, path: Path) -> bool:
        name = Path(path).name.lower()
        return any(name.endswith(ext) for ext in cls.extensions)

    @classmethod
    def sniff(cls, path: Path) -> bool:
        """True when the content (not the name) looks like this format."""
        return False

    @classmethod
    def output_stem(cls, path: str | Path) -> str:
        """The input's name without this format's extension (a folder keeps its name)."""
        name = Path(path).name
        low = name.lower()
        for ext in sorted(cls.extensions, key=len, reverse=True):
            if low.endswith(ext) and len(name) > len(ext):
                return name[: -len(ext)]
        return name

    @classmethod
    def example_file(cls, folder: Path) -> Path | Sequence[Path] | None:
        """Write a small example of this format into ``folder`` and return its path (or paths).

        The conformance kit loads it; a loader without one fails the kit's loader check.
        """
        return None

    @classmethod
    def example_volume(cls) -> Volume | None:
        """What loading :meth:`example_file` gives (array with its dtype, and affine); compared when given."""
        return None

    @abstractmethod
    def load(self, path: str | Path) -> Volume:
        """Read ``path``; raise :class:`~anomaly3d_core.errors.DataError` on bad input."""


class Segmenter(Component, nn.Module):
    """A 3D segmentation network: ``(B, in_channels, D, H, W)`` -> ``(B, 1, D, H, W)`` logits.

    What the core relies on (the synthetic-anomaly detector, :mod:`anomaly3d_core.synthetic`):

    - ``__init__(in_channels, params)``: one input channel per sequence;
    - ``forward(x)`` returns per-voxel logits of the same spatial size as ``x`` for any size that
      is a multiple of :attr:`size_multiple` (the core pads to it); the sigmoid of the logits is the
      fraction of a voxel that is foreign;
    - **Trained** by the core's loop on sampled crops, then run on whole volumes: an output must
      not depend on the batch it is computed in, in ``eval()`` mode;
    - **Saved state.** Everything learnt lives in parameters or registered buffers.
    """

    #: every spatial size given to ``forward`` is a multiple of this (``2 ** levels`` for a U-Net)
    size_multiple: ClassVar[int] = 1

    def __init__(
        self, in_channels: int = 1, params: Params | Mapping[str, Any] | None = None, **kwargs: Any
    ) -> None:
        nn.Module.__init__(self)
        self.params = self.validate_params(params, **kwargs)
        self.in_channels = int(in_channels)

    @abstractmethod
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Per-voxel logits ``(B, 1, D, H, W)``."""


@dataclass(frozen=True)
class StepState:
    """What flows through the preprocessing chain: one scan on its current grid.

    ``array`` is ``(X, Y, Z)`` float32, or channel-last ``(X, Y, Z, C)`` for a subject's sequences;
    ``affine`` maps its voxels to RAS+ millimetres; ``volume`` is the input as read (from the
    ``coregister`` step on, a subject's sequences stacked on the reference grid). ``mask`` is an
    optional label map carried along on the same grid (nearest neighbour); ``foreground`` is set by
    the ``foreground`` step; ``space`` names the template the grid belongs to after registration
    (``None``: the scan's own space). ``records`` holds one entry per step run so far.
    """

    array: np.ndarray
    affine: np.ndarray
    volume: Volume
    mask: np.ndarray | None = None
    foreground: np.ndarray | None = None
    space: str | None = None
    records: tuple[dict[str, Any], ...] = field(default_factory=tuple)

    def evolve(
        self, step: PreprocessingStep, record: Mapping[str, Any] | None = None, **changes: Any
    ) -> StepState:
        """A copy with ``changes`` and ``step``'s ``record`` (JSON values) appended: what its invert gets back."""
        entry = {"name": step.name, "args": step.params.model_dump(mode="json"), "record": dict(record or {})}
        return replace(self, records=(*self.records, entry), **changes)

    def channels(self) -> list[np.ndarray]:
        """The 3D array of each sequence (one for a plain scan)."""
        return (
            [self.array] if self.array.ndim == 3 else [self.array[..., c] for c in range(self.array.shape[3])]
        )


class PreprocessingStep(Component, ABC):
    """One invertible preprocessing step, chained in order from ``data.preprocessing``.

    What the core relies on:

    - ``__call__(state)`` returns the next :class:`StepState`, made with ``state.evolve(self, record,
      **changes)`` so that its record (JSON values: lists, numbers, strings) is kept in the scan's
      :class:`~anomaly3d_core.preprocess.record.PreprocessRecord`;
    - :meth:`invert` maps a 3D array on the step's output grid back onto its input grid, from that
      record alone (``order`` 1: linear, 0: nearest; ``fill`` for voxels the step had cut away). A step
      that changes intensities only keeps the default, which returns the array as it is;
    - :meth:`grid` says, from the header alone, the grid the step makes of a ``(shape, affine)``
      grid: the limits check the working grid before any voxel is resampled (default: unchanged);
    - ``version``: part of the preprocessing cache key; raise it when the step's output changes.
    """

    version: ClassVar[str] = "1"

    def __init__(self, params: Params | Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        self.params = self.validate_params(params, **kwargs)

    @abstractmethod
    def __call__(self, state: StepState) -> StepState:
        """The state after this step, with this step's record appended (``state.evolve``)."""

    def invert(
        self, array: np.ndarray, record: Mapping[str, Any], order: int = 1, fill: float = 0.0
    ) -> np.ndarray:
        """``array`` (on this step's output grid) on its input grid; intensity-only steps return it as is."""
        return array

    def grid(
        self, shape: tuple[int, int, int], affine: np.ndarray
    ) -> tuple[tuple[int, int, int], np.ndarray]:
        """The grid this step makes of ``shape``/``affine``, computed without data (default: unchanged)."""
        return shape, affine

    def key(self) -> dict[str, Any]:
        """What identifies this step's output for the preprocessing cache: name, version, parameters."""
        return {"name": self.name, "version": self.version, "args": self.params.model_dump(mode="json")}


#: The base class of each family, keyed like :data:`anomaly3d_core.hookspecs.FAMILIES`.
FAMILY_BASES: dict[str, type] = {
    "extractors": FeatureExtractor,
    "autoencoders": Autoencoder,
    "thresholds": ThresholdMethod,
    "loaders": VolumeLoader,
    "segmenters": Segmenter,
    "steps": PreprocessingStep,
}


def family_of(cls: Any) -> str | None:
    """The family whose base ``cls`` subclasses, or ``None``."""
    if isinstance(cls, type):
        for family, base in FAMILY_BASES.items():
            if issubclass(cls, base):
                return family
    return None
