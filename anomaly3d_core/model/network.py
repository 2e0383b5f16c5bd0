"""The scoring network: extractor -> fused feature map -> patch embedding -> autoencoder.

Scoring is dense and vectorised: the feature map is unfolded into every patch position on a
strided grid (a view, no copy), slabs of positions go through the embedding and autoencoder
as one batch, and the per-patch errors are spread back onto voxels with a Gaussian-weighted
transposed convolution (overlapping windows blended, no Python loop over patches).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from anomaly3d_core.errors import Anomaly3DError, ConfigError, did_you_mean
from anomaly3d_core.interfaces import Autoencoder, FeatureExtractor
from anomaly3d_core.model.embedding import FeatureEmbedding
from anomaly3d_core.model.grid import gaussian_kernel, patch_grid
from anomaly3d_core.model.polarity import channel_signs, combine_channels, is_plain, signed_residual


class AnomalyNet(nn.Module):
    """Holds the three learned parts and the patch geometry that ties them together."""

    def __init__(
        self,
        extractor: FeatureExtractor,
        layers: list[str],
        embedding: FeatureEmbedding,
        autoencoder: Autoencoder,
        patch_size: tuple[int, int, int],
        stride: tuple[int, int, int],
        positional_weight: float = 0.0,
        score_mode: str = "auto",
        signs: tuple[str, ...] | None = None,
        channel_combine: str = "mean",
    ) -> None:
        super().__init__()
        self.positional_weight = float(positional_weight)
        voxel_ok = embedding.method == "flatten" and embedding.scales == (1,)
        if score_mode == "voxel" and not voxel_ok:
            raise ConfigError(
                "patches.score_mode: 'voxel' needs embedding_method 'flatten' and a single scale (per-voxel "
                f"residuals), not '{embedding.method}' with scales {list(embedding.scales)}; use 'patch' or 'auto'"
            )
        if score_mode == "voxel" and not autoencoder.per_feature_residual:
            raise ConfigError(
                f"patches.score_mode: 'voxel' needs per-feature residuals, which autoencoder '{autoencoder.name}' "
                "does not give (per_feature_residual = False); use 'patch' or 'auto'"
            )
        self.voxel_residuals = voxel_ok and autoencoder.per_feature_residual and score_mode != "patch"
        self.extractor = extractor.freeze()
        self.layers = list(layers)
        self.embedding = embedding
        self.autoencoder = autoencoder
        self.feature_stride = min(extractor.layer_strides[name] for name in self.layers)
        self.patch_size = patch_size  # voxels
        self.stride = stride
        self.patch_f = feature_units(patch_size, self.feature_stride)
        self.stride_f = feature_units(stride, self.feature_stride)
        self.signs = tuple(signs) if signs is not None else ("both",) * extractor.in_channels
        self.channel_combine = channel_combine
        if not is_plain(self.signs, channel_combine):
            self._check_signed(extractor, autoencoder)

    def _check_signed(self, extractor: FeatureExtractor, autoencoder: Autoencoder) -> None:
        """Signed residuals need per-voxel residuals of raw intensities, one feature channel per sequence."""
        channels = sum(extractor.layer_channels[name] for name in self.layers)
        if not self.voxel_residuals or self.feature_stride != 1 or channels != len(self.signs):
            raise ConfigError(
                "patches.residual_sign/channel_combine other than both/mean need per-voxel residuals of the "
                f"intensities (score_mode voxel, a flatten embedding and the identity extractor), one channel "
                f"per sequence; got extractor '{extractor.name}' with {channels} feature channel(s) at stride "
                f"{self.feature_stride} for {len(self.signs)} sequence(s), voxel scoring "
                f"{'on' if self.voxel_residuals else 'off'}"
            )

    @staticmethod
    def check_layers(extractor: FeatureExtractor, layers: list[str] | None) -> list[str]:
        chosen = list(layers or extractor.default_layers)
        if not chosen:
            raise ConfigError(
                f"extractor '{extractor.name}' declares no default_layers; set extractor.layers to some of "
                f"{list(extractor.layers) or list(extractor.layer_channels)}, or declare default_layers in the plugin"
            )
        unknown = [name for name in chosen if name not in extractor.layer_channels]
        if unknown:
            raise ConfigError(
                "extractor.layers: " + did_you_mean(unknown[0], extractor.layer_channels, "layer")
            )
        return chosen

    @staticmethod
    def load_checkpoint(extractor: FeatureExtractor, path: str | Path) -> None:
        """Load weights (e.g. MedicalNet ``state_dict``, ``module.`` prefixes allowed) into ``extractor``."""
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"extractor.checkpoint: file not found: {p}")
        state = torch.load(p, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        state = {k.removeprefix("module."): v for k, v in state.items()}
        own = extractor.state_dict()
        usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        if not usable:
            raise ConfigError(
                f"extractor.checkpoint: {p} has no weights matching '{extractor.name}' (keys like {next(iter(state), '?')})"
            )
        extractor.load_state_dict(usable, strict=False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Fused feature map ``(B, C, D/s, H/s, W/s)`` of the selected layers at the finest stride ``s``."""
        maps = self.extractor(x, self.layers)
        target = tuple(math.ceil(n / self.feature_stride) for n in x.shape[2:])
        fused = [
            m
            if tuple(m.shape[2:]) == target
            else F.interpolate(m, size=target, mode="trilinear", align_corners=False)
            for m in (maps[name] for name in self.layers)
        ]
        return torch.cat(fused, dim=1) if len(fused) > 1 else fused[0]

    @staticmethod
    def _rows_per_slab(
        view: torch.Tensor, grid: tuple[int, int, int], max_batch: int, budget_bytes: int = 256 << 20
    ) -> int:
        """Grid rows scored at once: at most ``max_batch`` patches and ``budget_bytes`` of copied patch data."""
        per_patch = 4 * int(np.prod(view.shape[3:]))
        patches = max(1, min(max_batch, budget_bytes // per_patch))
        return max(1, patches // (grid[1] * grid[2]))

    def grid_patches(self, feat: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """All patches of the feature map on the strided grid as a view ``(n0, n1, n2, C, p, p, p)``
        (:func:`~anomaly3d_core.model.grid.patch_grid`; multi-scale: the context patch centred on each)."""
        return patch_grid(feat, self.patch_f, self.stride_f, self.embedding.input_size)

    @property
    def vector_dim(self) -> int:
        """Width of the autoencoder's input: the embedding, plus 3 coordinates when positional."""
        return self.embedding.output_dim + (3 if self.positional_weight else 0)

    @staticmethod
    def patch_centres(
        grid: tuple[int, int, int],
        feat_shape: tuple[int, ...],
        patch: tuple[int, ...],
        stride: tuple[int, ...],
    ) -> torch.Tensor:
        """Centres of all grid patches, normalised to [-1, 1] per axis of the (cropped) map: ``(n0, n1, n2, 3)``."""
        axes = [
            ((torch.arange(g) * s + p / 2) / n) * 2 - 1
            for g, n, p, s in zip(grid, feat_shape, patch, stride, strict=True)
        ]
        return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).float()

    def vectors(self, patches: torch.Tensor, centres: torch.Tensor | None = None) -> torch.Tensor:
        """Embedding vectors, with the weighted patch centres appended when positional."""
        return self.finish(self.embedding.raw(patches), centres)

    def finish(self, raw: torch.Tensor, centres: torch.Tensor | None = None) -> torch.Tensor:
        """Standardise unstandardised embedding vectors and append the positions when positional."""
        v = self.embedding.standardize(raw)
        if self.positional_weight and centres is not None:
            v = torch.cat([v, self.positional_weight * centres.to(v)], dim=1)
        return v

    def score_patches(self, patches: torch.Tensor, centres: torch.Tensor | None = None) -> torch.Tensor:
        vectors = self.vectors(patches, centres)
        return self.autoencoder.anomaly_score(vectors, self.autoencoder(vectors))

    @torch.no_grad()
    def score_grid(self, x: torch.Tensor, max_batch: int = 16384, amp: bool = False) -> torch.Tensor:
        """Per-patch scores on the grid, ``(n0, n1, n2)``."""
        with torch.autocast(x.device.type, enabled=amp and x.device.type == "cuda"):
            feat = self.features(x)
        view, grid = self.grid_patches(feat.float())
        centres = self.patch_centres(grid, feat.shape[2:], self.patch_f, self.stride_f).to(x.device)
        per_slab = self._rows_per_slab(view, grid, max_batch)
        out = []
        for start in range(0, grid[0], per_slab):
            slab = view[start : start + per_slab]
            flat = slab.reshape(-1, *slab.shape[3:])
            where = centres[start : start + per_slab].reshape(-1, 3)
            with torch.autocast(x.device.type, enabled=amp and x.device.type == "cuda"):
                out.append(self.score_patches(flat, where).float().reshape(slab.shape[:3]))
        return torch.cat(out)

    def blend(self, grid_scores: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
        """Spread per-patch scores onto voxels with Gaussian weights; returns ``shape``."""
        size = tuple(pf * self.feature_stride for pf in self.patch_f)
        step = tuple(sf * self.feature_stride for sf in self.stride_f)
        kernel = gaussian_kernel(size).to(grid_scores.device)[None, None]
        num = F.conv_transpose3d(grid_scores[None, None], kernel, stride=step)
        den = F.conv_transpose3d(torch.ones_like(grid_scores)[None, None], kernel, stride=step)
        out = num / den.clamp_min(1e-6)
        pads = [max(0, t - o) for t, o in zip(shape, out.shape[2:], strict=True)]
        if any(pads):
            out = F.pad(out, (0, pads[2], 0, pads[1], 0, pads[0]), mode="replicate")
        return out[0, 0, : shape[0], : shape[1], : shape[2]]

    @torch.no_grad()
    def score_voxels(self, x: torch.Tensor, max_batch: int = 16384, amp: bool = False) -> torch.Tensor:
        """Per-voxel residuals of every patch, overlap-added with Gaussian weights; shape of ``x``.

        Each patch contributes the autoencoder's per-feature residual (``Autoencoder.residual``, a
        squared error unless the plugin says otherwise) at each of its voxels (channel mean, in
        standardised units) plus the per-patch remainder of the autoencoder's score (the VAE's KL
        term), so the map is as sharp as the residuals rather than one value per patch.
        """
        with torch.autocast(x.device.type, enabled=amp and x.device.type == "cuda"):
            feat = self.features(x)
        view, grid = self.grid_patches(feat.float())
        centres = self.patch_centres(grid, feat.shape[2:], self.patch_f, self.stride_f).to(x.device)
        p, s = self.patch_f, self.stride_f
        size = [(g - 1) * st + pk for g, st, pk in zip(grid, s, p, strict=True)]
        num = torch.zeros(size, device=x.device)
        weight = gaussian_kernel(p).to(x.device)
        per_slab = self._rows_per_slab(view, grid, max_batch)
        width = self.embedding.output_dim
        for start in range(0, grid[0], per_slab):
            slab = view[start : start + per_slab]
            k = slab.shape[0]
            flat = slab.reshape(-1, *slab.shape[3:])
            with torch.autocast(x.device.type, enabled=amp and x.device.type == "cuda"):
                v = self.vectors(flat, centres[start : start + per_slab].reshape(-1, 3))
                out = self.autoencoder(v)
                residual = self.autoencoder.residual(v, out).float()
                extra = self.autoencoder.anomaly_score(v, out).float() - residual.mean(1)
            res = self._combine(residual[:, :width].reshape(-1, *slab.shape[3:]), v, out, width)
            res = (res + extra[:, None, None, None]).reshape(k, grid[1], grid[2], *p) * weight
            r0 = start * s[0]
            for u in range(p[0]):
                for w in range(p[1]):
                    for z in range(p[2]):
                        num[
                            r0 + u : r0 + u + k * s[0] : s[0],
                            w : w + grid[1] * s[1] : s[1],
                            z : z + grid[2] * s[2] : s[2],
                        ] += res[..., u, w, z]
        ones = torch.ones(grid, device=x.device)[None, None]
        den = F.conv_transpose3d(ones, weight[None, None], stride=s)[0, 0]
        fmap = (num / den.clamp_min(1e-6))[: feat.shape[2], : feat.shape[3], : feat.shape[4]]
        if self.feature_stride > 1:
            fmap = F.interpolate(
                fmap[None, None], scale_factor=self.feature_stride, mode="trilinear", align_corners=False
            )[0, 0]
        shape = x.shape[2:]
        pads = [max(0, t - o) for t, o in zip(shape, fmap.shape, strict=True)]
        if any(pads):
            fmap = F.pad(fmap[None, None], (0, pads[2], 0, pads[1], 0, pads[0]), mode="replicate")[0, 0]
        return fmap[: shape[0], : shape[1], : shape[2]]

    def _combine(self, res: torch.Tensor, v: torch.Tensor, out: dict, width: int) -> torch.Tensor:
        """Per-voxel residuals ``(N, C, p, p, p)`` -> ``(N, p, p, p)``: signed per channel, then combined."""
        if is_plain(self.signs, self.channel_combine):
            return res.mean(1)
        if "recon" not in out:
            raise ConfigError(
                f"patches.residual_sign: autoencoder '{self.autoencoder.name}' returns no 'recon', so the "
                "residual has no sign; use residual_sign: both"
            )
        diff = (v.float() - out["recon"].float())[:, :width].reshape(res.shape)
        return combine_channels(signed_residual(res, diff, self.signs), self.channel_combine)

    @torch.no_grad()
    def score_map(self, array: np.ndarray, device: torch.device, amp: bool = False) -> np.ndarray:
        """Dense voxel score map of a preprocessed array (``(X, Y, Z)`` or ``(C, X, Y, Z)``), shape ``(X, Y, Z)``."""
        x = as_batch(array).to(device)
        if self.voxel_residuals:
            return self.score_voxels(x, amp=amp).cpu().numpy()
        grid = self.score_grid(x, amp=amp)
        return self.blend(grid, tuple(x.shape[2:])).cpu().numpy()

    @torch.no_grad()
    def sample_patches(
        self,
        array: np.ndarray,
        mask: np.ndarray,
        max_patches: int,
        min_foreground: float,
        strategy: str,
        generator: torch.Generator,
        device: torch.device,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training patches ``(n, C, p, p, p)`` and their centres ``(n, 3)``, mostly inside the foreground."""
        x = as_batch(array).to(device)
        feat = self.features(x).float()
        view, grid = self.grid_patches(feat)
        size = tuple(pf * self.feature_stride for pf in self.patch_f)
        step = tuple(sf * self.feature_stride for sf in self.stride_f)
        fg = torch.from_numpy(mask.astype(np.float32))[None, None]
        need = [g * st + sz - 1 - n + 1 for g, st, sz, n in zip(grid, step, size, mask.shape, strict=True)]
        fg = F.pad(fg, (0, max(0, need[2]), 0, max(0, need[1]), 0, max(0, need[0])))
        frac = F.avg_pool3d(fg, size, stride=step)[0, 0, : grid[0], : grid[1], : grid[2]]
        candidates = torch.nonzero(frac.flatten() >= min_foreground).flatten()
        if candidates.numel() == 0:
            candidates = torch.arange(frac.numel())
        if candidates.numel() > max_patches:
            if strategy == "uniform":
                candidates = candidates[torch.linspace(0, candidates.numel() - 1, max_patches).long()]
            else:
                candidates = candidates[torch.randperm(candidates.numel(), generator=generator)[:max_patches]]
        centres = self.patch_centres(grid, feat.shape[2:], self.patch_f, self.stride_f).reshape(-1, 3)
        # gather only the chosen patches: reshaping the overlapping view would copy every patch
        i, j, k = candidates // (grid[1] * grid[2]), (candidates // grid[2]) % grid[1], candidates % grid[2]
        picked = view[i.to(view.device), j.to(view.device), k.to(view.device)]
        return picked.cpu().clone(), centres[candidates]


def as_batch(array: np.ndarray) -> torch.Tensor:
    """A one-item batch ``(1, C, X, Y, Z)`` of a prepared array (a 3D array is one channel)."""
    t = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    return t[None, None] if t.ndim == 3 else t[None]


def feature_units(voxels: tuple[int, int, int], stride: int) -> tuple[int, int, int]:
    return tuple(max(1, round(v / stride)) for v in voxels)  # type: ignore[return-value]


def build_extractor(cfg: Any, reg: Any, sequences: list[str]) -> FeatureExtractor:
    """The configured extractor with one input channel per sequence (``in_channels`` derived)."""
    cls = reg.get("extractors", cfg.extractor.type)
    want = max(1, len(sequences))
    args = dict(cfg.extractor.args)
    if "in_channels" in cls.Params.model_fields and "in_channels" not in cfg.extractor.args:
        args["in_channels"] = want
    extractor = cls(args)
    if extractor.in_channels != want:
        given = "" if "in_channels" in cls.Params.model_fields else " and has no in_channels parameter"
        raise ConfigError(
            f"extractor '{cfg.extractor.type}' takes {extractor.in_channels} input channel(s){given}, but "
            f"data.sequences gives {want} ({', '.join(sequences) or 'one file per scan'}); leave "
            "extractor.args.in_channels out (it is derived) or choose an extractor with in_channels"
        )
    return extractor


def build_network(cfg: Any, reg: Any, sequences: list[str]) -> AnomalyNet:
    """A fresh, untrained network for a pipeline config (``sequences``: the data's sequences, reference first)."""
    extractor = build_extractor(cfg, reg, sequences)
    if cfg.extractor.checkpoint:
        AnomalyNet.load_checkpoint(extractor, cfg.extractor.checkpoint)
    layers = AnomalyNet.check_layers(extractor, cfg.extractor.layers)
    channels = sum(extractor.layer_channels[name] for name in layers)
    if cfg.embedding.input_channels is not None and cfg.embedding.input_channels != channels:
        raise ConfigError(
            f"embedding.input_channels: {cfg.embedding.input_channels}, but extractor '{cfg.extractor.type}' "
            f"gives {channels} channels on layers {list(layers)}; leave it out (it is derived) or set {channels}"
        )
    stride = min(extractor.layer_strides[name] for name in layers)
    embedding = FeatureEmbedding.from_config(
        cfg.embedding, channels, feature_units(cfg.patches.patch_size, stride), cfg.patches.scales
    )
    vector_dim = embedding.output_dim + (3 if cfg.embedding.positional_weight else 0)
    try:
        autoencoder = reg.get("autoencoders", cfg.autoencoder.type)(vector_dim, cfg.autoencoder.args)
    except ValueError as exc:
        raise Anomaly3DError(str(exc)) from None
    autoencoder.spatial_shape = embedding.spatial_shape
    return AnomalyNet(
        extractor,
        layers,
        embedding,
        autoencoder,
        cfg.patches.patch_size,
        cfg.patches.stride,
        cfg.embedding.positional_weight,
        cfg.patches.score_mode,
        channel_signs(cfg.patches.residual_sign, sequences, extractor.in_channels),
        cfg.patches.channel_combine,
    )
