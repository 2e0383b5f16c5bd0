"""The :class:`Detector` contract that every detector (single pipeline, ensemble, ...) implements.

Pipeline, ensemble, tuning, serving, the batch runner and the CLI rely on this surface only:

- ``fit(volumes, val_volumes)`` trains on normal scans and calibrates;
- ``prepare(item)`` reads and preprocesses one scan onto the detector's working grid;
- ``score_prepared(prep)`` gives final voxel scores on that grid (zero outside its foreground);
- ``score(item)`` gives scores, mask, volume score and decision on the input's own grid;
- ``save(path)`` / ``load(path)`` persist it (see :mod:`anomaly3d_core.persistence` for loading
  a model folder of any kind).

Subclasses implement the abstract methods; mapping back to the native grid and the decision are
shared here, so they are written once.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from anomaly3d_core.errors import Anomaly3DError, DataError
from anomaly3d_core.io.data import VolumeLike, as_volume
from anomaly3d_core.io.files import load_volume
from anomaly3d_core.io.volume import Volume
from anomaly3d_core.model.training import EpochCallback
from anomaly3d_core.postprocess.lesions import lesion_table
from anomaly3d_core.postprocess.native import mask_to_native, to_native
from anomaly3d_core.postprocess.postprocessor import PostProcessor
from anomaly3d_core.postprocess.verdict import UNCALIBRATED_RULE, Verdict
from anomaly3d_core.preprocess.preprocessing import Prepared, Preprocessor


@dataclass
class NativeScores:
    """Scores of one scan before any decision: on the working grid and on the input's own grid."""

    prepared: Prepared
    prepared_scores: np.ndarray
    score_map: np.ndarray
    foreground: np.ndarray

    @property
    def volume(self) -> Volume:
        return self.prepared.source


@dataclass
class ScoreResult:
    """One scored scan; ``score_map``, ``mask`` and ``p_map`` lie on the input's own grid.

    ``threshold`` is the calibrated *voxel* score threshold (also ``voxel_threshold``); the scan's
    decision is made by ``decision_rule``: ``p_value <= alpha`` (the same as ``volume_score >
    volume_threshold``, where ``volume_score`` is the statistic named by ``scan_statistic``), or
    ``volume_score > volume_threshold (uncalibrated)`` with too few calibration normals for ``alpha``. ``mask`` is made by
    ``mask_rule`` (``cluster``, ``fdr`` or ``threshold``); ``lesions`` has one row per flagged cluster
    (:mod:`anomaly3d_core.postprocess.lesions`). A model saved before calibration nulls gives
    ``p_value`` NaN and decides on its legacy volume threshold.
    """

    volume: Volume
    score_map: np.ndarray
    mask: np.ndarray
    volume_score: float
    is_anomalous: bool
    threshold: float
    prepared: Prepared | None = None
    prepared_scores: np.ndarray | None = None
    seconds: float = 0.0
    foreground: np.ndarray | None = None
    volume_threshold: float = math.nan
    p_value: float = math.nan
    alpha: float = math.nan
    scan_statistic: str = "top_k_mean"
    mask_rule: str = "threshold"
    n_calibration: int = 0
    p_map: np.ndarray | None = None
    lesions: list[dict[str, Any]] = field(default_factory=list)
    decision_rule: str = UNCALIBRATED_RULE

    @property
    def voxel_threshold(self) -> float:
        return self.threshold


def model_files_dir(path: str | Path) -> Path:
    """The folder holding a detector's files: ``path`` itself, or its MLflow artifact folder."""
    folder = Path(path)
    if not folder.exists():
        raise Anomaly3DError(f"{folder}: model folder not found")
    return folder / "artifacts" / "pipeline" if (folder / "MLmodel").is_file() else folder


class Detector(ABC):
    """Fit on normal scans; score new ones on their own grid. See the module docstring."""

    config: Any
    registry: Any
    postprocessor_: PostProcessor

    # ------------------------------------------------------------------ to implement
    @abstractmethod
    def fit(
        self,
        volumes: Sequence[VolumeLike],
        val_volumes: Sequence[VolumeLike] | None = None,
        callbacks: Sequence[EpochCallback] = (),
        show_progress: bool | None = None,
    ) -> Detector:
        """Train on normal scans and calibrate on held-out normals; returns ``self``."""

    @abstractmethod
    def prepare(self, item: VolumeLike) -> Prepared:
        """Read (if a path) and bring one scan onto this detector's working grid."""

    @abstractmethod
    def score_prepared(self, prep: Prepared) -> np.ndarray:
        """Final voxel scores on the working grid, zero outside ``prep.mask``."""

    @abstractmethod
    def save_files(self, path: str | Path) -> Path:
        """Write everything needed to load the fitted detector into a plain folder."""

    @classmethod
    @abstractmethod
    def load_files(cls, path: str | Path, device: str | None = None, registry: Any = None) -> Detector:
        """Inverse of :meth:`save_files`."""

    @abstractmethod
    def plugin_specs(self) -> list[tuple[str, str]]:
        """``(family, name)`` of every plugin the detector needs."""

    @property
    @abstractmethod
    def foreground_method(self) -> str:
        """How the foreground of a native scan is found (``data.preprocessing.foreground``)."""

    def example_volume(self) -> Volume | None:
        """A scan this detector accepts (kept with a saved model as the MLflow input example)."""
        return None

    # ------------------------------------------------------------------ shared
    @property
    def is_ensemble(self) -> bool:
        """Whether this detector combines others (its config has ``members``)."""
        return False

    def reference(self) -> Detector:
        """The detector whose reading and example scans stand for this one: itself, or an
        ensemble's first member."""
        return self

    @property
    def channels(self) -> list[str]:
        """The sequences a subject gives, reference first; empty for one file per scan."""
        return []

    def read(self, path: Any) -> Volume:
        """Read one scan, or one subject's sequences (detectors with a configured loader override this)."""
        return load_volume(path, registry=self.registry)

    def read_file(self, path: str | Path) -> Volume:
        """Read one file (one sequence of a subject, say) as this detector reads its scans."""
        return load_volume(path, registry=self.registry)

    def set_reading(self, overrides: Sequence[str]) -> None:
        """Change how scans are read (``data.loader=...``, ``data.loader_args.KEY=...``) on a fitted detector.

        Only reading can change after fitting: e.g. choosing one DICOM series at scoring time.
        """
        raise Anomaly3DError(f"{type(self).__name__} reads scans one way only; it takes no reading options")

    def _check_fitted(self, what: str) -> None:
        if not hasattr(self, "postprocessor_"):
            raise Anomaly3DError(
                f"{type(self).__name__} is not fitted; call fit(volumes) or load(path) before {what}()"
            )

    def score_native(self, item: VolumeLike | Prepared) -> NativeScores:
        """Scores on the working grid and on the input's grid; needs no calibration (used mid-training).

        ``item`` may be a scan :meth:`prepare` has already brought onto the working grid."""
        prep = item if isinstance(item, Prepared) else self.prepare(item)
        scores = self.score_prepared(prep)
        native, fg = to_native(scores, prep, self.foreground_method)
        return NativeScores(prep, scores, native, fg)

    def calibrate(self, normal: Sequence[Prepared | VolumeLike]) -> Detector:
        """Fit voxel and volume thresholds, score statistics and the calibration nulls (p-values,
        cluster masses) on held-out normal scans that the model never trained on."""
        self._check_fitted("calibrate")
        prepared = [n if isinstance(n, Prepared) else self.prepare(n) for n in normal]
        self.postprocessor_.calibrate(
            [self.score_prepared(p) for p in prepared],
            [p.mask for p in prepared],
            [p.spacing for p in prepared],
        )
        return self

    def score(self, item: VolumeLike | Prepared) -> ScoreResult:
        """Score one scan (or one :meth:`prepare` gave): score map, p-map, mask, lesion table, volume
        score, p-value and decision, on the input's grid.

        A NaN or infinite score raises :class:`~anomaly3d_core.errors.DataError`: it is never a decision.
        """
        self._check_fitted("score")
        t0 = time.perf_counter()
        r = self.score_native(item)
        prep = r.prepared
        bad = int(r.prepared_scores.size - np.isfinite(r.prepared_scores).sum())
        if bad:  # a NaN is never a decision: the scan fails with the reason
            raise DataError(
                prep.source.path, f"scoring gave {bad} NaN or infinite voxel scores; no decision made"
            )
        v = self.postprocessor_.verdict(r.prepared_scores, prep.mask, prep.spacing, prep.source.path)
        if not np.isfinite(v.volume_score):
            raise DataError(prep.source.path, f"the volume score is {v.volume_score}; no decision made")
        native_mask = mask_to_native(v.mask, prep)
        if self.postprocessor_.config.postprocess.restrict_to_foreground or v.mask_rule != "threshold":
            native_mask &= r.foreground
        p_map, lesions = self._native_maps(v, r)
        return ScoreResult(
            prep.source,
            r.score_map,
            native_mask,
            v.volume_score,
            v.is_anomalous,
            v.voxel_threshold,
            prep,
            r.prepared_scores,
            time.perf_counter() - t0,
            r.foreground,
            v.volume_threshold,
            v.p_value,
            v.alpha,
            v.scan_statistic,
            v.mask_rule,
            v.n_calibration,
            p_map,
            lesions,
            v.decision_rule,
        )

    @staticmethod
    def _native_maps(v: Verdict, r: NativeScores) -> tuple[np.ndarray | None, list[dict[str, Any]]]:
        """The p-map (1 outside the foreground) and the lesion table on the input's grid."""
        prep = r.prepared
        if v.p_map is None or v.labels is None:
            return None, []
        # mapped back as -log10(p), so that voxels no working-grid voxel covers get p = 1, not 0
        p_map = np.power(10.0, -Preprocessor.invert(-np.log10(v.p_map), prep.record, order=0)).astype(
            np.float32
        )
        p_map[~r.foreground] = 1.0
        labels = np.rint(Preprocessor.invert(v.labels.astype(np.float32), prep.record, order=0)).astype(
            np.int32
        )
        labels[~r.foreground] = 0
        registered = prep.record.registration is not None
        lesions = lesion_table(
            labels,
            r.score_map,
            p_map,
            np.asarray(prep.source.affine),
            v.cluster_p,
            v.labels,
            r.prepared_scores,
            np.asarray(prep.affine) if registered else None,
        )
        return p_map, lesions

    # fitted decision state, read through the post-processor
    @property
    def threshold_(self) -> float:
        self._check_fitted("threshold_")
        return self.postprocessor_.threshold_

    @property
    def volume_threshold_(self) -> float:
        """The volume score above which a scan is flagged (the conformal one at ``alpha`` when calibrated)."""
        self._check_fitted("volume_threshold_")
        return self.postprocessor_.scan_threshold

    @property
    def score_stats_(self) -> dict[str, float]:
        return self.postprocessor_.score_stats_

    @property
    def normal_volume_scores_(self) -> list[float]:
        return self.postprocessor_.normal_volume_scores_

    def normalized(self, scores: np.ndarray) -> np.ndarray:
        """Scores as z-values against this detector's normal-validation statistics."""
        return self.postprocessor_.normalized(scores)

    # ------------------------------------------------------------------ seed-style conveniences
    def score_map(self, item: VolumeLike) -> tuple[np.ndarray, dict[str, Any]]:
        """The voxel score map on the input's grid, and metadata."""
        r = self.score(item)
        meta = {
            "volume_score": r.volume_score,
            "is_anomalous": r.is_anomalous,
            "voxel_threshold": r.threshold,
            "volume_threshold": r.volume_threshold,
            "p_value": r.p_value,
            "alpha": r.alpha,
            "affine": r.volume.affine,
            "seconds": r.seconds,
            "preprocessed_shape": r.prepared.array.shape if r.prepared is not None else None,
        }
        return r.score_map, meta

    def get_threshold(self) -> float:
        """The calibrated voxel threshold."""
        return self.threshold_

    def predict(self, item: VolumeLike) -> np.ndarray:
        """The binary anomaly mask on the input's grid."""
        return self.score(item).mask

    def evaluate(
        self, volumes: Sequence[VolumeLike], ground_truth: Sequence[np.ndarray | VolumeLike]
    ) -> dict[str, Any]:
        """Metrics against ground-truth masks (see :func:`anomaly3d_core.evaluation.metrics.comprehensive_evaluation`)."""
        from anomaly3d_core.evaluation.metrics import comprehensive_evaluation  # scikit-learn, on demand

        results = [self.score(v) for v in volumes]
        masks = [
            np.asarray(g) > 0 if isinstance(g, np.ndarray) else self._mask_array(g) for g in ground_truth
        ]
        from anomaly3d_core.evaluation.guarantees import result_guarantees
        from anomaly3d_core.postprocess.calibration import top_k_mean

        metrics = comprehensive_evaluation(
            masks,
            [r.score_map for r in results],
            self.threshold_,
            predicted_masks=[r.mask for r in results],
            volume_scores=[r.volume_score for r in results],
            volume_threshold=self.volume_threshold_,
        )
        top_k = [top_k_mean(r.prepared_scores, r.prepared.mask, 0.01) for r in results]  # type: ignore[union-attr]
        return metrics | result_guarantees(results, masks, top_k)

    def _mask_array(self, item: VolumeLike) -> np.ndarray:
        if isinstance(item, Volume):
            return np.asarray(item.array) > 0
        if isinstance(item, str | Path):
            return load_volume(item, registry=self.registry, allow_constant=True).array > 0
        return as_volume(item).array > 0

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
        """Save as a plain model folder: the detector's files, ``plugins.json`` (the packages behind
        its plugins) and ``metadata`` as ``metadata.json``; written whole or not at all.

        ``anomaly3d_core.mlops.serving.save_pyfunc`` writes the same files as an MLflow model
        (servable with ``mlflow models serve``); :func:`anomaly3d_core.persistence.load_detector`
        loads either.
        """
        from anomaly3d_core.io.files import check_model_target, replace_tree
        from anomaly3d_core.provenance import write_model_files

        out = check_model_target(path)
        return replace_tree(out, lambda new: write_model_files(self, new, metadata), "model folder")

    @classmethod
    def load(cls, path: str | Path, device: str | None = None, registry: Any = None) -> Detector:
        """Load a model saved by :meth:`save` or :meth:`save_files` as this class.

        :func:`anomaly3d_core.persistence.load_detector` loads a folder of any detector kind.
        """
        return cls.load_files(model_files_dir(path), device, registry)
