"""Preprocessing with an exact record of every step, so results map back to the input's grid.

Steps, each optional: reorient to RAS+ -> resample (spacing or shape) -> foreground mask ->
intensity normalisation inside the foreground -> crop to the foreground (+ margin) -> pad to
a multiple the network needs. :meth:`Preprocessor.invert` undoes them in reverse order.

A subject with several sequences (a volume with a channel axis last, see
:mod:`~anomaly3d_core.preprocess.sequences`) goes through the same steps: registration and the
foreground come from the reference sequence, every sequence is normalised on its own, and the
prepared array has the channels first, ``(C, X, Y, Z)``, as the network takes them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from nibabel import orientations as ornt
from scipy import ndimage
from skimage.filters import threshold_otsu

from anomaly3d_core.config import PreprocessingConfig
from anomaly3d_core.errors import DataError
from anomaly3d_core.io.volume import Volume
from anomaly3d_core.preprocess import registration as registration_module
from anomaly3d_core.preprocess.survey import in_template_space


@dataclass
class PreprocessRecord:
    """What :meth:`Preprocessor.invert` needs to go back to the native grid."""

    original_shape: tuple[int, int, int]
    original_affine: list[list[float]]
    to_canonical: list[list[float]]
    canonical_shape: tuple[int, int, int]
    resampled_shape: tuple[int, int, int]
    crop_start: tuple[int, int, int]
    crop_stop: tuple[int, int, int]
    pad_before: tuple[int, int, int]
    pad_after: tuple[int, int, int]
    registration: list[float] | None = None  # template -> scan affine transform, when registered
    reference_affine: list[list[float]] | None = None
    registration_dice: float | None = None  # fit quality, see registration.registration_quality
    registration_metric: float | None = None
    deformation: list[float] | None = None  # the deformable step after the affine, when fitted
    registration_displacement_mm: float | None = None  # its mean displacement in the template's brain

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PreprocessRecord:
        """Inverse of :meth:`to_dict` after a JSON round trip (lists back to tuples)."""
        matrices = ("original_affine", "to_canonical", "registration", "reference_affine", "deformation")
        return cls(
            **{k: tuple(v) if isinstance(v, list) and k not in matrices else v for k, v in data.items()}
        )


@dataclass
class Prepared:
    """A preprocessed volume: network-ready array (``(X, Y, Z)``, or ``(C, X, Y, Z)`` for several
    sequences), foreground mask, grid affine and the record."""

    array: np.ndarray
    mask: np.ndarray
    affine: np.ndarray
    record: PreprocessRecord
    source: Volume

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))  # type: ignore[return-value]

    @property
    def shape(self) -> tuple[int, int, int]:
        """The spatial grid (without the channel axis)."""
        return tuple(int(s) for s in self.mask.shape)  # type: ignore[return-value]

    @property
    def channels(self) -> int:
        return int(self.array.shape[0]) if self.array.ndim == 4 else 1


def _each_channel(fn, arr: np.ndarray) -> np.ndarray:  # noqa: ANN001
    """Apply ``fn`` to each 3D channel of a channel-last array (or to a 3D array)."""
    if arr.ndim == 3:
        return fn(arr)
    return np.stack([fn(arr[..., c]) for c in range(arr.shape[3])], axis=-1)


def resize(array: np.ndarray, shape: tuple[int, ...], order: int = 1) -> np.ndarray:
    """Resample to ``shape``: trilinear (``order=1``) for images, nearest (``order=0``) for masks.

    Voxel centres are mapped with ``align_corners=False``, matching :func:`resized_affine`.
    """
    if tuple(array.shape) == tuple(shape):
        return array
    t = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
    if order == 0:
        out = F.interpolate(t, size=tuple(shape), mode="nearest-exact")
    else:
        out = F.interpolate(t, size=tuple(shape), mode="trilinear", align_corners=False)
    return out[0, 0].numpy()


def resized_affine(affine: np.ndarray, old_shape: tuple[int, ...], new_shape: tuple[int, ...]) -> np.ndarray:
    scale = np.asarray(old_shape, dtype=np.float64) / np.asarray(new_shape, dtype=np.float64)
    step = np.eye(4)
    step[:3, :3] = np.diag(scale)
    step[:3, 3] = (scale - 1.0) / 2.0
    return affine @ step


def foreground_mask(array: np.ndarray, method: str) -> np.ndarray:
    if method == "none":
        return np.ones(array.shape, dtype=bool)
    if method == "otsu":
        mask = array > threshold_otsu(array)
        return ndimage.binary_fill_holes(mask)
    # "nonzero" tolerates the tiny values that resampling leaves next to an exact-zero background
    return np.abs(array) > 1e-6 * float(np.abs(array).max())


def normalize(
    array: np.ndarray, mask: np.ndarray, method: str, clip: tuple[float, float] | None
) -> np.ndarray:
    """Normalise with robust statistics taken inside ``mask``; the background gets the lowest value.

    ``clip`` percentiles bound the values the statistics are computed from; the data itself is
    not clipped, so a lesion brighter than any normal tissue keeps its contrast.
    """
    values = array[mask]
    out = array.astype(np.float32, copy=True)
    if clip is not None:
        lo, hi = np.percentile(values, clip)
        values = values[(values >= lo) & (values <= hi)]
    if method == "z_score":
        std = float(values.std())
        out = (out - float(values.mean())) / (std if std > 0 else 1.0)
    elif method in ("min_max", "percentile"):
        # min_max: the (robust) extremes map to 0 and 1; percentile: the clip percentiles do
        lo, hi = (
            (float(values.min()), float(values.max()))
            if method == "min_max"
            else np.percentile(array[mask], clip or (1.0, 99.0))
        )
        out = (out - lo) / ((hi - lo) or 1.0)
    if method != "none":
        out[~mask] = out[mask].min()
    return out.astype(np.float32)


class Preprocessor:
    """Applies a :class:`PreprocessingConfig` to volumes and inverts it on score maps."""

    def __init__(self, config: PreprocessingConfig | None = None) -> None:
        self.config = config or PreprocessingConfig()

    def registration_target(self, volume: Volume) -> str | None:
        """The template this scan is registered to, if any (``auto``: unless it is in MNI152 space already)."""
        target = self.config.register_to
        if target == "none":
            return None
        if target == "auto":
            ref = registration_module.reference("mni152")
            return None if in_template_space(volume.shape, volume.affine, ref) else "mni152"
        return target

    def __call__(self, volume: Volume, mask: np.ndarray | None = None) -> Prepared:
        """Preprocess ``volume``; an optional ``mask`` (e.g. ground truth) is carried along on the same grid."""
        cfg = self.config
        arr, affine = np.asarray(volume.array, dtype=np.float32), volume.affine
        if mask is not None and tuple(mask.shape) != tuple(volume.shape):
            raise DataError(
                volume.path, f"mask grid {tuple(mask.shape)} differs from the scan's {tuple(volume.shape)}"
            )
        registration, reference_affine, quality, deformation = None, None, {}, None
        target = self.registration_target(volume)
        if target is not None:  # the reference sequence is registered; the others follow its transform
            ref = registration_module.reference(target)
            first = Volume(volume.channel(0), volume.affine, volume.path) if volume.channels > 1 else volume
            fit = registration_module.register(first, target, deformable=cfg.deformable)
            arr, registration, quality = fit.array, fit.params, fit.quality
            deformation = fit.deformation
            if deformation is not None:
                quality = {**quality, "registration_displacement_mm": fit.displacement_mm}
            if volume.channels > 1:
                others = [
                    registration_module.apply_transform(
                        volume.channel(c), volume.affine, ref, registration, deformation=deformation
                    )
                    for c in range(1, volume.channels)
                ]
                arr = np.stack([arr, *others], axis=-1)
            affine, reference_affine = ref.affine.copy(), ref.affine.tolist()
            if mask is not None:
                mask = registration_module.register_mask(
                    mask, volume.affine, ref, registration, deformation=deformation
                )
        transform = (
            ornt.ornt_transform(ornt.io_orientation(affine), ornt.axcodes2ornt("RAS"))
            if cfg.reorient and registration is None
            else None
        )
        if transform is None or np.array_equal(transform, [[0, 1], [1, 1], [2, 1]]):
            transform = np.array([[0, 1], [1, 1], [2, 1]], dtype=float)
        else:
            affine = affine @ ornt.inv_ornt_aff(transform, arr.shape[:3])
            arr = np.ascontiguousarray(ornt.apply_orientation(arr, transform))
            mask = None if mask is None else np.ascontiguousarray(ornt.apply_orientation(mask, transform))
        canonical_shape = arr.shape[:3]
        new_shape = self._target_shape(canonical_shape, affine)
        if new_shape != canonical_shape:
            affine = resized_affine(affine, canonical_shape, new_shape)
            arr = _each_channel(lambda a: resize(a, new_shape, order=1), arr)
            mask = None if mask is None else resize(mask.astype(np.float32), new_shape, order=0) > 0.5
        fg = foreground_mask(arr if arr.ndim == 3 else arr[..., 0], cfg.foreground)
        if not fg.any():
            raise DataError(volume.path, f"no foreground found with method '{cfg.foreground}'")
        arr = _each_channel(lambda a: normalize(a, fg, cfg.normalize_method, cfg.clip_percentile), arr)
        start, stop = (0, 0, 0), arr.shape[:3]
        if cfg.crop_foreground:
            idx = np.argwhere(fg)
            start = tuple(int(max(0, v - cfg.crop_margin)) for v in idx.min(axis=0))
            stop = tuple(
                int(min(s, v + 1 + cfg.crop_margin)) for v, s in zip(idx.max(axis=0), fg.shape, strict=True)
            )
            sl = tuple(slice(a, b) for a, b in zip(start, stop, strict=True))
            arr, fg = arr[sl], fg[sl]
            mask = None if mask is None else mask[sl]
            shift = np.eye(4)
            shift[:3, 3] = start
            affine = affine @ shift
        size = np.array(arr.shape[:3])
        total = (-size) % cfg.pad_multiple
        before, after = tuple(int(v) for v in total // 2), tuple(int(v) for v in total - total // 2)
        if total.any():
            widths = list(zip(before, after, strict=True))
            inside = fg.copy()
            arr = _each_channel(
                lambda a: np.pad(
                    a,
                    widths,
                    constant_values=float(a[inside].min()) if cfg.normalize_method != "none" else 0.0,
                ),
                arr,
            )
            fg = np.pad(fg, widths)
            mask = None if mask is None else np.pad(mask, widths)
            shift = np.eye(4)
            shift[:3, 3] = -np.array(before)
            affine = affine @ shift
        record = PreprocessRecord(
            original_shape=tuple(int(s) for s in volume.shape),
            original_affine=volume.affine.tolist(),
            to_canonical=np.asarray(transform).tolist(),
            canonical_shape=tuple(int(s) for s in canonical_shape),
            resampled_shape=tuple(int(s) for s in new_shape),
            crop_start=start,
            crop_stop=tuple(int(s) for s in stop),
            pad_before=before,
            pad_after=after,
            registration=registration,
            reference_affine=reference_affine,
            deformation=deformation,
            **quality,
        )
        if arr.ndim == 4:
            arr = np.moveaxis(arr, -1, 0)
        prepared = Prepared(np.ascontiguousarray(arr, dtype=np.float32), fg, affine, record, volume)
        prepared.target = mask  # type: ignore[attr-defined]
        return prepared

    def _target_shape(self, shape: tuple[int, ...], affine: np.ndarray) -> tuple[int, int, int]:
        cfg = self.config
        if cfg.target_shape is not None:
            return tuple(cfg.target_shape)  # type: ignore[return-value]
        if cfg.target_spacing is None:
            return tuple(shape)  # type: ignore[return-value]
        spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
        return tuple(
            max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, cfg.target_spacing, strict=True)
        )  # type: ignore[return-value]

    @staticmethod
    def invert(array: np.ndarray, record: PreprocessRecord, order: int = 1, fill: float = 0.0) -> np.ndarray:
        """Map an array on the preprocessed grid back onto the original scan's grid."""
        arr = np.asarray(array, dtype=np.float32)
        stop = [s - a for s, a in zip(arr.shape, record.pad_after, strict=True)]
        arr = arr[tuple(slice(b, e) for b, e in zip(record.pad_before, stop, strict=True))]
        full = np.full(record.resampled_shape, fill, dtype=np.float32)
        full[tuple(slice(a, b) for a, b in zip(record.crop_start, record.crop_stop, strict=True))] = arr
        full = resize(full, record.canonical_shape, order=order)
        if record.registration is not None:
            return registration_module.to_native(
                full,
                np.asarray(record.reference_affine),
                record.registration,
                record.original_shape,
                np.asarray(record.original_affine),
                order,
                record.deformation,
            )
        back = ornt.ornt_transform(
            ornt.axcodes2ornt("RAS"), ornt.io_orientation(np.asarray(record.original_affine))
        )
        transform = np.asarray(record.to_canonical)
        if not np.array_equal(transform, [[0, 1], [1, 1], [2, 1]]):
            full = ornt.apply_orientation(full, back)
        assert tuple(full.shape) == tuple(record.original_shape), (full.shape, record.original_shape)
        return np.ascontiguousarray(full)
