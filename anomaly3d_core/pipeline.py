"""``AnomalyDetectionPipeline``: one network scored on one preprocessed grid (a :class:`Detector`).

The pipeline composes the parts (preprocessing, network, training loop, post-processor); it does
not implement them. Fitted state ends in ``_`` as in scikit-learn.
"""

from __future__ import annotations

import logging
import pickle
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anomaly3d_core.config import (
    PipelineConfig,
    TrackingConfig,
    TuningConfig,
    build_config,
    load_config,
    merge_trees,
    seed_component_sections,
)
from anomaly3d_core.detector import Detector
from anomaly3d_core.errors import Anomaly3DError, ConfigError, DataError
from anomaly3d_core.io import arrays, cache, limits
from anomaly3d_core.io.data import BatchFailures, VolumeLike, as_volume
from anomaly3d_core.io.files import find_loader, load_volume, save_nifti
from anomaly3d_core.io.subjects import Subject, as_subject
from anomaly3d_core.io.volume import Volume
from anomaly3d_core.model.network import AnomalyNet, build_network
from anomaly3d_core.model.pretrain import pretrain_extractor
from anomaly3d_core.model.training import (
    EpochCallback,
    fit_closed_form,
    resolve_device,
    seed_everything,
    train_autoencoder,
)
from anomaly3d_core.postprocess.calibration import last_calibration_warns
from anomaly3d_core.postprocess.postprocessor import STATE_FILE, PostProcessor
from anomaly3d_core.preprocess.augmentation import augment_from_config
from anomaly3d_core.preprocess.preprocessing import Prepared, Preprocessor
from anomaly3d_core.preprocess.sequences import align, read_subject
from anomaly3d_core.registry import get_registry

log = logging.getLogger(__name__)
WEIGHTS_FILE, CONFIG_FILE, EXAMPLE_FILE = "weights.pt", "config.yaml", "example.nii.gz"


class AnomalyDetectionPipeline(Detector):
    """Unsupervised voxel-wise anomaly detection for 3D scans.

    ``config`` is a :class:`PipelineConfig`, a nested dict or a YAML path; the seed's
    per-component dicts (``feature_extractor_config={'type': 'resnet18', 'args': {...}}`` and
    the others) are merged on top.
    """

    def __init__(
        self,
        config: PipelineConfig | Mapping[str, Any] | str | Path | None = None,
        *,
        feature_extractor_config: Mapping | None = None,
        embedding_config: Mapping | None = None,
        autoencoder_config: Mapping | None = None,
        patch_config: Mapping | None = None,
        training_config: Mapping | None = None,
        threshold_config: Mapping | None = None,
        preprocessing_config: Mapping | None = None,
        device: str | None = None,
        registry: Any = None,
    ) -> None:
        if isinstance(config, str | Path):
            config = load_config(config, registry=registry)
        tree = config.model_dump(mode="json") if isinstance(config, PipelineConfig) else dict(config or {})
        seed = seed_component_sections(
            feature_extractor_config,
            embedding_config,
            autoencoder_config,
            patch_config,
            training_config,
            threshold_config,
            preprocessing_config,
        )
        self.config = build_config(merge_trees(tree, seed), registry=registry)
        self.registry = registry
        self.device = resolve_device(device or self.config.training.device)
        self.preprocessor = Preprocessor(
            self.config.data.preprocessing, registry, self.config.data.coregister
        )

    # ---------------------------------------------------------------- building
    def _registry(self) -> Any:
        if self.registry is None:
            self.registry = get_registry()
        return self.registry

    def build_network(self) -> AnomalyNet:
        """A fresh, untrained network for this config."""
        return build_network(self.config, self._registry(), self.channels)

    @property
    def channels(self) -> list[str]:
        """The sequences a subject gives, reference first (empty: one file per scan)."""
        return self.config.data.channels

    def read(self, item: str | Path | Subject | Mapping[str, Any]) -> Volume:
        """Read one scan (a file) or one subject's sequences (each on its own grid: the first preprocessing
        step, ``coregister``, puts them on the reference grid; :meth:`read_aligned` does it here)."""
        if isinstance(item, Subject | Mapping):
            if not self.channels:
                raise DataError(
                    str(as_subject(item)),
                    "a subject with sequences needs data.sequences in the config (e.g. [T1w, FLAIR]); this model "
                    "reads one file per scan",
                )
            return read_subject(as_subject(item), self.channels, self._read_one)
        if len(self.channels) > 1:
            raise DataError(
                item,
                f"one file cannot give the {' and '.join(self.channels)} scans this model takes per subject; give "
                f"a BIDS dataset, a subject,sequence,path manifest or {{'{self.channels[0]}': path, ...}}",
            )
        return self._read_one(item)

    def read_aligned(self, item: str | Path | Subject | Mapping[str, Any]) -> Volume:
        """:meth:`read`, a subject's sequences then co-registered onto the reference grid as preprocessing does."""
        return align(self.read(item), self.config.data.coregister)[0]

    def _read_one(self, item: VolumeLike) -> Volume:
        return self.read_file(item) if isinstance(item, str | Path) else as_volume(item)

    def read_file(self, path: str | Path) -> Volume:
        """Read one file with this pipeline's loader settings (``data.loader``, ``data.loader_args``)."""
        return load_volume(
            path, self.config.data.loader, self.registry, loader_args=self.config.data.loader_args
        )

    def set_reading(self, overrides: Sequence[str]) -> None:
        """Apply ``data.loader``/``data.loader_args`` overrides, validated like the rest of the config."""
        bad = [o for o in overrides if not o.strip().startswith(("data.loader=", "data.loader_args"))]
        if bad:
            raise ConfigError(
                f"--set {bad[0]}: a fitted model keeps its config; only data.loader and data.loader_args "
                "(how scans are read) and tracking.* (where this run is recorded) can be set here; "
                "refit with --set to change anything else"
            )
        self.config.data = build_config(self.config.model_dump(mode="json"), overrides, self.registry).data

    def prepare(self, item: VolumeLike, mask: np.ndarray | None = None) -> Prepared:
        """Load (if needed) and preprocess one scan; a working grid beyond the limits is refused first."""
        volume = self.read(item) if isinstance(item, str | Path | Subject | Mapping) else as_volume(item)
        want = max(1, len(self.channels))
        if volume.channels != want:
            raise DataError(
                volume.path,
                f"{volume.channels} sequence(s) per voxel, but this model takes {want} "
                f"({', '.join(self.channels) or 'one 3D scan'})",
            )
        grid = self.preprocessor.working_grid(volume.shape, volume.affine)
        limits.check_grid(volume.path, grid, volume.spacing)
        return self.preprocessor(volume, mask)

    # ---------------------------------------------------------------- fitting
    def fit(
        self,
        volumes: Sequence[VolumeLike],
        val_volumes: Sequence[VolumeLike] | None = None,
        callbacks: Sequence[EpochCallback] = (),
        show_progress: bool | None = None,
    ) -> AnomalyDetectionPipeline:
        """Train on scans of normal subjects; bad files are skipped and listed in ``failures_``."""
        cfg = self.config
        t0 = time.perf_counter()
        gen, train, val = self._fit_sets(volumes, val_volumes)
        normals = list(train)  # every training normal, before the validation split (for cross-fitting)
        folds = cfg.training.calibration_folds
        if folds and not val_volumes and not 2 <= folds <= len(normals):
            raise ConfigError(
                f"training.calibration_folds: {folds}, but cross-fitting needs 2 to {len(normals)} folds "
                f"(one per training normal at most); use 0 to calibrate on the validation split"
            )
        if not val:
            train, val = self._split(train, gen)
        if cfg.data.augmentation.enabled:
            train = train + self._augmented(train)
        self.model_ = self.build_network().to(self.device)
        if cfg.extractor.pretrain_epochs:
            self.pretrain_history_ = pretrain_extractor(
                self.model_.extractor,
                self.model_.layers,
                [p.array for p in train],
                cfg.extractor.pretrain_epochs,
                crop=cfg.extractor.pretrain_crop,
                seed=cfg.training.seed,
                device=self.device,
            )
        emb = self.model_.embedding
        if emb.projection is not None:  # the MLP projection learns from a bounded sample of raw patches
            per_volume = max(1, min(cfg.patches.max_patches, 20000 // len(train)))
            emb.fit_projection(
                self._collect(train, gen, per_volume, raw=False)[0].float(), seed=cfg.training.seed
            )
        # volumes are reduced to embedding vectors one at a time, so raw patches never pile up in memory
        raw, centres = self._collect(train, gen)
        val_raw, val_centres = self._collect(val, gen)
        emb.fit_standardization(raw)
        train_vec, val_vec = self._finish(raw, centres), self._finish(val_raw, val_centres)
        t = cfg.training
        if self.model_.autoencoder.trainable:
            self.history_ = train_autoencoder(
                self.model_.autoencoder,
                train_vec,
                val_vec,
                t,
                device=self.device,
                callbacks=callbacks,
                show_progress=show_progress,
            )
        else:  # a PCA or Gaussian model fits in closed form, never through the gradient loop
            self.history_ = fit_closed_form(
                self.model_.autoencoder, train_vec, val_vec, t, device=self.device, callbacks=callbacks
            )
        self.model_.eval()
        if cfg.threshold.depth_normalization:
            self.postprocessor_.fit_depth(
                [self._scan_scores(p) for p in train], [p.mask for p in train], [p.spacing for p in train]
            )
        if cfg.threshold.normative:
            self.postprocessor_.fit_normative(
                [
                    self.postprocessor_.transform(self._scan_scores(p), p.mask, spacing=p.spacing)
                    for p in train
                ]
                if cfg.threshold.depth_normalization
                else [self._scan_scores(p) for p in train]
            )
        with last_calibration_warns():  # cross-fitting replaces the validation split's calibration
            self.calibrate(val)
            if folds and not val_volumes:
                self._crossfit_calibrate(normals, folds, gen)
        self.n_train_volumes_, self.n_val_volumes_ = len(train), len(val)
        self.val_volumes_ = [p.source for p in val]
        self.fit_seconds_ = time.perf_counter() - t0
        return self

    def _fit_sets(
        self, volumes: Sequence[VolumeLike], val_volumes: Sequence[VolumeLike] | None
    ) -> tuple[torch.Generator, list[Prepared], list[Prepared]]:
        """Seed the run, prepare the training and validation scans (bad files go to ``failures_``) and
        start the post-processor: the opening of every ``fit`` (this family's and the synthetic one's)."""
        gen = seed_everything(self.config.training.seed)
        self.failures_ = BatchFailures()
        self.loaders_used_: list[str] = []
        train = self._prepare_all(volumes)
        val = self._prepare_all(val_volumes) if val_volumes else []
        if not train:
            raise DataError(
                None,
                "no usable training volumes" + (f":\n{self.failures_.report()}" if self.failures_ else ""),
            )
        self.postprocessor_ = PostProcessor(self.config.threshold, self._registry())
        self.postprocessor_.check_shared_grid([p.shape for p in train + val])
        return gen, train, val

    def _crossfit_calibrate(self, normals: list[Prepared], folds: int, gen: torch.Generator) -> None:
        """Calibrate on every training normal, each scored by a model fitted without its fold.

        The fold models differ from the final one (trained on all normals), so the p-values are
        approximately, not exactly, conformal (cross-conformal prediction, Vovk 2015).
        """
        order = torch.randperm(len(normals), generator=gen).tolist()
        parts = [order[k::folds] for k in range(folds)]
        tree = self.config.model_dump(mode="json")
        tree["training"]["calibration_folds"] = 0
        maps, masks, spacings = [], [], []
        self.crossfit_: list[dict[str, list[str]]] = []
        for part in parts:
            held = set(part)
            fold_model = AnomalyDetectionPipeline(tree, device=str(self.device), registry=self.registry)
            fold_model.fit([normals[i].source for i in order if i not in held], show_progress=False)
            for i in part:
                maps.append(fold_model.score_prepared(normals[i]))
                masks.append(normals[i].mask)
                spacings.append(normals[i].spacing)
            self.crossfit_.append(
                {
                    "scored": [str(normals[i].source.path) for i in part],
                    "trained_on": [str(normals[i].source.path) for i in order if i not in held],
                }
            )
        self.postprocessor_.calibrate(maps, masks, spacings)

    def _prepare_all(self, items: Sequence[VolumeLike] | None) -> list[Prepared]:
        out = []
        for index, item in enumerate(items or []):
            if isinstance(item, Mapping):  # in-memory subjects are named by their position
                item = as_subject(item, index)
            try:
                out.append(self._prepare_cached(item))
                files = as_subject(item).files.values() if isinstance(item, Subject | Mapping) else [item]
                for file in files:  # provenance: the loader plugins this model was fitted with
                    if isinstance(file, str | Path):
                        self._note_loader(file)
            except Exception as exc:  # one bad file never stops the fit, whatever it raises
                self.failures_.record(
                    str(item) if isinstance(item, str | Path | Subject) else "(in-memory volume)", exc
                )
        return out

    def _note_loader(self, path: str | Path) -> None:
        if self.config.data.loader != "auto":
            return  # the named loader is in the config's plugins already
        reg = self._registry()
        try:
            cls = find_loader(path, "auto", reg)
        except Anomaly3DError:
            return
        info = next((i for i in reg.infos("loaders") if i.cls is cls), None)
        if info is None:
            return
        name = info.qualified if info.name in reg.clashes("loaders") else info.name
        if name not in self.loaders_used_:
            self.loaders_used_.append(name)

    def _prepare_cached(self, item: VolumeLike) -> Prepared:
        """:meth:`prepare`, through the on-disk cache for files (see :mod:`anomaly3d_core.io.cache`)."""
        found = cache.prepared(item, self.prepare, self.config.data, self.channels, self.preprocessor.key())
        return self.preprocessor.adopt(found)

    def _split(self, prepared: list[Prepared], gen: torch.Generator) -> tuple[list[Prepared], list[Prepared]]:
        n_val = int(round(len(prepared) * self.config.training.val_fraction))
        if len(prepared) < 3 or n_val == 0:
            log.warning(
                "only %d training volumes: calibrating thresholds on the training volumes themselves",
                len(prepared),
            )
            return prepared, prepared
        order = torch.randperm(len(prepared), generator=gen).tolist()
        return [prepared[i] for i in order[n_val:]], [prepared[i] for i in order[:n_val]]

    def _augmented(self, prepared: list[Prepared]) -> list[Prepared]:
        aug = self.config.data.augmentation
        rng = np.random.default_rng(aug.seed)
        out = []
        for prep in prepared:
            for _ in range(aug.copies):
                array = augment_from_config(prep.array, aug, rng)
                out.append(Prepared(array, prep.mask, prep.affine, prep.record, prep.source))
        return out

    def _collect(
        self, prepared: list[Prepared], gen: torch.Generator, max_patches: int | None = None, raw: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training patches of every volume and their centres; ``raw=True`` returns unstandardised embeddings."""
        p = self.config.patches
        emb = self.model_.embedding
        items, centres = [], []
        for prep in prepared:
            patches, where = self.model_.sample_patches(
                prep.array,
                prep.mask,
                max_patches or p.max_patches,
                p.min_foreground,
                p.sampling_strategy,
                gen,
                self.device,
            )
            if raw:
                with torch.no_grad():
                    patches = torch.cat(
                        [emb.raw(c.to(self.device).float()).cpu() for c in patches.split(4096)]
                    )
            items.append(patches)
            centres.append(where)
        return torch.cat(items), torch.cat(centres)

    def _finish(self, raw: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat(
                [
                    self.model_.finish(r.to(self.device), c.to(self.device)).cpu()
                    for r, c in zip(raw.split(8192), centres.split(8192), strict=True)
                ]
            )

    # ---------------------------------------------------------------- scoring
    @property
    def foreground_method(self) -> str:
        return self.config.data.preprocessing.foreground

    def _check_fitted(self, what: str) -> None:
        if not hasattr(self, "model_"):
            raise Anomaly3DError(
                f"pipeline is not fitted; call fit(volumes) or AnomalyDetectionPipeline.load(path) before {what}()"
            )

    def _scan_scores(self, prep: Prepared) -> np.ndarray:
        scores = self.model_.score_map(prep.array, self.device, amp=self.config.training.use_amp)
        return self.postprocessor_.scan_scores(scores, prep.mask)

    def score_prepared(self, prep: Prepared) -> np.ndarray:
        """Final voxel scores on the preprocessed grid (smoothed, normative when fitted so)."""
        self._check_fitted("score_prepared")
        return self.postprocessor_.transform(
            self._scan_scores(prep), prep.mask, prep.source.path, spacing=prep.spacing
        )

    # ---------------------------------------------------------------- persistence
    def save_files(self, path: str | Path) -> Path:
        """Write config, weights and fitted state into ``path`` (a plain folder)."""
        self._check_fitted("save")
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        self.config.save(out / CONFIG_FILE, detector_only=True)  # tracking and tuning are the run's
        torch.save({k: v.cpu() for k, v in self.model_.state_dict().items()}, out / WEIGHTS_FILE)
        self.postprocessor_.save(
            out,
            {"history": getattr(self, "history_", {}), "loaders_used": getattr(self, "loaders_used_", [])},
        )
        example = self.example_volume()
        if example is not None:  # a scan this model accepts, for the MLflow input example
            for name, array in zip(self._example_files(), self._example_arrays(example), strict=True):
                save_nifti(array, example.affine, out / name)
        return out

    def _example_files(self) -> list[str]:
        """One example file per sequence (all on the reference grid), or ``example.nii.gz``."""
        if len(self.channels) > 1:
            return [EXAMPLE_FILE.replace(".nii.gz", f"_{seq}.nii.gz") for seq in self.channels]
        return [EXAMPLE_FILE]

    @staticmethod
    def _example_arrays(example: Volume) -> list[np.ndarray]:
        return [example.channel(c) for c in range(example.channels)]

    def example_volume(self) -> Volume | None:
        """A held-out normal scan this model was calibrated on (kept with a saved model), if any."""
        volumes = getattr(self, "val_volumes_", None)
        return volumes[0] if volumes else getattr(self, "example_", None)

    @classmethod
    def load_files(
        cls, path: str | Path, device: str | None = None, registry: Any = None
    ) -> AnomalyDetectionPipeline:
        folder = Path(path)
        missing = [f for f in (CONFIG_FILE, WEIGHTS_FILE, STATE_FILE) if not (folder / f).is_file()]
        if missing:
            kind = (
                " (it is an ensemble: use anomaly3d_core.load_detector)"
                if (folder / "ensemble.json").is_file()
                else ""
            )
            raise Anomaly3DError(
                f"{folder}: not a saved anomaly3d pipeline (missing {', '.join(missing)}){kind}"
            )
        pipe = cls(folder / CONFIG_FILE, device=device, registry=registry)
        # where records are written or sent is the user's to say (command line, environment), never
        # a model folder's: a folder from someone else could otherwise send evaluations to its author
        for section, default in (("tracking", TrackingConfig), ("tuning", TuningConfig)):
            if section in type(pipe.config).model_fields:
                setattr(pipe.config, section, default())
        pipe.model_ = pipe.build_network()
        arrays.check_archive(folder / WEIGHTS_FILE)  # what its entries declare bounds what loading allocates
        try:  # tensors only: a pickled object in the file is refused, never run
            weights = torch.load(folder / WEIGHTS_FILE, map_location="cpu", weights_only=True)
            pipe.model_.load_state_dict(weights)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, KeyError, TypeError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
            raise Anomaly3DError(
                f"{folder / WEIGHTS_FILE}: not usable weights of this model's network ({reason[:200]})"
            ) from None
        pipe.model_.to(pipe.device).eval()
        pipe.postprocessor_, state = PostProcessor.load(folder, pipe.config.threshold, pipe._registry())
        pipe.history_ = state.get("history", {})
        pipe.loaders_used_ = [n for n in state.get("loaders_used", []) if isinstance(n, str)]
        files = [folder / name for name in pipe._example_files()]
        if all(f.is_file() for f in files):
            parts = [load_volume(f) for f in files]
            array = parts[0].array if len(parts) == 1 else np.stack([v.array for v in parts], axis=-1)
            pipe.example_ = Volume(array, parts[0].affine, str(files[0]))
        return pipe

    def plugin_specs(self) -> list[tuple[str, str]]:
        """The config's plugins, and the loaders that read the training scans (provenance)."""
        specs = self.config.plugin_specs()
        return specs + [
            ("loaders", n) for n in getattr(self, "loaders_used_", []) if ("loaders", n) not in specs
        ]
