"""Which sign of the reconstruction residual counts, per sequence, and how sequences are combined.

MRI physics: pathology is almost always brighter than the tissue it replaces in FLAIR and T2w
(oedema, demyelination, gliosis), mostly darker in T1w (blood, fat and contrast agent aside). A
residual that keeps only the lesion-like sign drops half of the normal variation (every normal
dark spot in FLAIR counts as much as a lesion when the residual is an absolute value).

``bright`` keeps voxels where the scan is above the network's reconstruction, ``dark`` those
below, ``both`` keeps both (the absolute value, as before signed residuals existed).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch

from anomaly3d_core.errors import ConfigError

Sign = Literal["both", "bright", "dark"]
SIGNS: tuple[str, ...] = ("both", "bright", "dark")
COMBINES: tuple[str, ...] = ("mean", "max")

#: ``residual_sign: physics`` defaults by BIDS suffix; any suffix not listed counts both signs.
#: T1w counts both: ``dark`` lost on the cross-fitted synthetic-lesion validation of the
#: multi-sequence benchmark (README "Validation"), as it did on the test.
PHYSICS_SIGN: dict[str, Sign] = {"FLAIR": "bright", "T2w": "bright", "T1w": "both"}


def channel_signs(
    setting: str | Mapping[str, str], channels: Sequence[str], n_channels: int | None = None
) -> tuple[str, ...]:
    """The sign that counts for each input channel.

    ``setting``: ``both``/``bright``/``dark`` for every channel, ``physics`` for
    :data:`PHYSICS_SIGN` by suffix, or a mapping ``{suffix: sign}`` (sequences not named: ``both``).
    ``channels``: the sequences in channel order (empty for one file per scan: one unnamed channel).
    """
    n = n_channels if n_channels is not None else max(1, len(channels))
    if isinstance(setting, Mapping):
        if not channels:
            raise ConfigError(
                "patches.residual_sign: a per-sequence mapping needs data.sequences; for one file per scan "
                "give one of both, bright, dark"
            )
        unknown = [k for k in setting if k not in channels]
        if unknown:
            raise ConfigError(
                f"patches.residual_sign: '{unknown[0]}' is not one of data.sequences {list(channels)}"
            )
        bad = [v for v in setting.values() if v not in SIGNS]
        if bad:
            raise ConfigError(f"patches.residual_sign: '{bad[0]}' is not one of {', '.join(SIGNS)}")
        return tuple(str(setting.get(c, "both")) for c in channels)
    if setting == "physics":
        return tuple(PHYSICS_SIGN.get(c, "both") for c in channels) if channels else ("both",) * n
    if setting not in SIGNS:
        raise ConfigError(
            f"patches.residual_sign: '{setting}' is not one of {', '.join((*SIGNS, 'physics'))} or a mapping"
        )
    return (str(setting),) * n


def is_plain(signs: Sequence[str], combine: str) -> bool:
    """True when scoring is the unsigned channel mean (the behaviour before signed residuals)."""
    return all(s == "both" for s in signs) and combine == "mean"


def signed_residual(residual: torch.Tensor, diff: torch.Tensor, signs: Sequence[str]) -> torch.Tensor:
    """``residual`` ``(N, C, ...)`` with the uncounted sign of ``diff`` (input - reconstruction) zeroed per channel."""
    if residual.shape[1] != len(signs):
        raise ValueError(f"{residual.shape[1]} residual channels but {len(signs)} signs")
    keep = []
    for c, sign in enumerate(signs):
        d = diff[:, c]
        keep.append(torch.ones_like(d) if sign == "both" else (d > 0 if sign == "bright" else d < 0).to(d))
    return residual * torch.stack(keep, dim=1)


def combine_channels(residual: torch.Tensor, how: str) -> torch.Tensor:
    """One value per location from ``(N, C, ...)``: the channel ``mean`` (a scaled sum) or ``max``."""
    if how == "mean":
        return residual.mean(1)
    if how == "max":
        return residual.amax(1)
    raise ConfigError(f"patches.channel_combine: '{how}' is not one of {', '.join(COMBINES)}")
