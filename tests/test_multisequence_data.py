"""The multi-sequence demo generator: BIDS layout, shared anatomy, contrasts per sequence, native grids."""

from __future__ import annotations

import csv
import hashlib
import json
import re

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from anomaly3d_core.cli import main
from anomaly3d_core.demo.anatomy import make_subject, mni_atlas
from anomaly3d_core.demo.datasets import make_demo_dataset
from anomaly3d_core.demo.multiseq import make_multiseq_subject
from anomaly3d_core.demo.native import make_native_subject
from anomaly3d_core.errors import ConfigError

ALL = ("T1w", "T2w", "FLAIR")
BIDS_ANAT = re.compile(r"^sub-([a-zA-Z0-9]+)_(T1w|T2w|FLAIR)\.(nii\.gz|json)$")


def digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:16]


def contrast(image: np.ndarray, region: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """CNR and relative contrast of ``region`` against ``reference`` voxels."""
    ref, sd = float(image[reference].mean()), float(image[reference].std())
    mean = float(image[region].mean())
    return (mean - ref) / sd, mean / ref - 1.0


@pytest.fixture(scope="module")
def atlas2():
    return mni_atlas(2.0)


@pytest.fixture(scope="module")
def bids_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("ms") / "demo"
    args = [
        "demo-data",
        str(out),
        "--size",
        "tiny",
        "--seed",
        "3",
        "--voxel-size",
        "4",
        "--sequences",
        "T1w,T2w,FLAIR",
    ]
    assert main(args) == 0
    return out


def test_layout_is_bids(bids_dir) -> None:
    rows = list(csv.DictReader(open(bids_dir / "manifest.csv")))
    assert list(rows[0]) == ["subject", "split", "label", "lesion_kind"]
    assert [r["split"] for r in rows].count("train") == 4 and len(rows) == 8
    for split in ("train", "test"):
        root = bids_dir / split
        desc = json.loads((root / "dataset_description.json").read_text())
        assert (
            desc["DatasetType"] == "raw" and desc["Name"] and re.match(r"^1\.\d+\.\d+$", desc["BIDSVersion"])
        )
        assert (root / "README").read_text().strip()
        tsv = (root / "participants.tsv").read_text().splitlines()
        subjects = sorted(p.name for p in root.glob("sub-*"))
        assert tsv[0] == "participant_id" and sorted(tsv[1:]) == subjects
        assert subjects == sorted(r["subject"] for r in rows if r["split"] == split)
        assert json.loads((root / "participants.json").read_text())["participant_id"]
        top = {p.name for p in root.iterdir()}
        assert top == {
            "dataset_description.json",
            "README",
            "participants.tsv",
            "participants.json",
            *subjects,
        }
        for sub in subjects:
            assert [p.name for p in (root / sub).iterdir()] == ["anat"]
            names = sorted(p.name for p in (root / sub / "anat").iterdir())
            assert names == sorted(f"{sub}_{s}.{e}" for s in ALL for e in ("nii.gz", "json"))
            for name in names:
                m = BIDS_ANAT.match(name)
                assert m and f"sub-{m.group(1)}" == sub
                if name.endswith(".json"):
                    assert json.loads((root / sub / "anat" / name).read_text())["RepetitionTime"] > 0
    masks = sorted(p.name for p in (bids_dir / "test_masks").iterdir())
    assert masks == sorted(f"{r['subject']}.nii.gz" for r in rows if r["split"] == "test")
    for r in rows:
        if r["split"] == "test":
            mask = nib.load(bids_dir / "test_masks" / f"{r['subject']}.nii.gz")
            t1 = nib.load(bids_dir / "test" / r["subject"] / "anat" / f"{r['subject']}_T1w.nii.gz")
            assert mask.shape == t1.shape and np.allclose(mask.affine, t1.affine)
            assert bool(np.asarray(mask.dataobj).any()) == (r["label"] == "1")


def test_sequences_share_anatomy(bids_dir) -> None:
    anat = bids_dir / "train" / "sub-000" / "anat"
    brains = {s: np.asarray(nib.load(anat / f"sub-000_{s}.nii.gz").dataobj) > 0 for s in ALL}
    for s in ("T2w", "FLAIR"):
        assert (brains[s] & brains["T1w"]).sum() / (brains[s] | brains["T1w"]).sum() > 0.99
    other = np.asarray(nib.load(bids_dir / "train" / "sub-001" / "anat" / "sub-001_T1w.nii.gz").dataobj) > 0
    assert (other & brains["T1w"]).sum() / (other | brains["T1w"]).sum() < 0.99  # subjects differ


def test_tissue_contrast_per_sequence(atlas2) -> None:
    subject = make_multiseq_subject(atlas2, (7, 0, 2), None, ALL)
    t = subject.tissues
    csf = (t.csf > 0.8) & ndimage.binary_erosion(t.brain, iterations=2)
    wm, gm = t.wm > 0.9, t.gm > 0.8
    ratio = {}  # (CSF, GM) relative to WM
    for s, scan in subject.scans.items():
        ratio[s] = tuple(float(scan.image[r].mean() / scan.image[wm].mean()) for r in (csf, gm))
    assert ratio["FLAIR"][0] < 0.5 < 1.1 < ratio["FLAIR"][1]  # CSF suppressed, grey above white matter
    assert ratio["T2w"][0] > 2.0 and ratio["T2w"][1] > 1.2  # bright CSF
    assert ratio["T1w"][0] < 0.6 and ratio["T1w"][1] < 0.9  # dark CSF, grey below white matter


def test_lesion_contrast_per_sequence(atlas2) -> None:
    ms = make_multiseq_subject(atlas2, (7, 1, 2), "ms", ALL)
    away = ~ndimage.binary_dilation(ms.mask, iterations=3)
    wm = (ms.tissues.wm > 0.9) & away
    cnr = {s: contrast(sc.image, ms.mask, wm) for s, sc in ms.scans.items()}
    assert -0.4 < cnr["T1w"][1] < -0.05  # MS-like lesions: faint in T1w ...
    assert cnr["FLAIR"][1] > 0.3 and cnr["T2w"][1] > 0.3  # ... bright in FLAIR and T2w
    assert cnr["FLAIR"][0] > 2 * abs(cnr["T1w"][0])

    tumour = make_multiseq_subject(atlas2, (7, 2, 2), "tumour", ALL)
    oedema = tumour.parts["oedema"]
    assert oedema.sum() > 20 and not (oedema & (tumour.parts["core"] | tumour.parts["rim"])).any()
    assert np.array_equal(tumour.mask, tumour.parts["core"] | tumour.parts["rim"] | oedema)
    wm = (tumour.tissues.wm > 0.9) & ~ndimage.binary_dilation(tumour.mask, iterations=3)
    flair, t1 = (contrast(tumour.scans[s].image, oedema, wm)[1] for s in ("FLAIR", "T1w"))
    assert flair > 0.4 and abs(t1) < 0.2  # the oedema widens the tumour in FLAIR, not in T1w


def test_native_sequences_have_own_grids(atlas2) -> None:
    subject = make_multiseq_subject(atlas2, (7, 3, 3), "haemorrhage", ALL, space="native")
    spacing = {s: np.sqrt((sc.affine[:3, :3] ** 2).sum(0)) for s, sc in subject.scans.items()}
    assert spacing["T1w"].max() <= 1.2 and spacing["FLAIR"].max() >= 3.0 and spacing["T2w"].max() >= 2.0
    assert len({sc.image.shape for sc in subject.scans.values()}) == 3
    assert subject.reference == "T1w" and subject.scans["T1w"].info["motion_deg"] == 0.0
    for s in ("T2w", "FLAIR"):
        assert (
            1.0 <= subject.scans[s].info["motion_deg"] <= 3.0
            and 1.0 <= subject.scans[s].info["motion_mm"] <= 3.0
        )
    t1 = subject.scans["T1w"]
    assert subject.mask.shape == t1.image.shape and subject.mask.sum() > 100
    # the mask lands on the T1w lesion: a haemorrhage is bright in T1w
    brain = t1.image > 0
    assert t1.image[subject.mask].mean() > 1.2 * t1.image[brain & ~subject.mask].mean()
    # and on the FLAIR lesion, through world coordinates (head motion is a few mm)
    world = t1.affine[:3, :3] @ np.argwhere(subject.mask).mean(0) + t1.affine[:3, 3]
    flair = subject.scans["FLAIR"]
    index = np.linalg.inv(flair.affine) @ np.append(world, 1.0)
    ball = (
        np.linalg.norm(
            (np.indices(flair.image.shape).T - index[:3]) * np.sqrt((flair.affine[:3, :3] ** 2).sum(0)),
            axis=-1,
        ).T
        < 5
    )
    assert flair.image[ball].mean() > 1.2 * flair.image[flair.image > 0].mean()


def test_deterministic_and_independent_of_other_sequences(atlas2) -> None:
    a = make_multiseq_subject(atlas2, (9, 0, 2), "infarct", ("T1w", "FLAIR"))
    b = make_multiseq_subject(atlas2, (9, 0, 2), "infarct", ALL)
    for s in ("T1w", "FLAIR"):
        assert np.array_equal(a.scans[s].image, b.scans[s].image)
    assert np.array_equal(a.mask, b.mask)
    c = make_multiseq_subject(atlas2, (9, 1, 2), "infarct", ("T1w",))
    assert not np.array_equal(a.scans["T1w"].image, c.scans["T1w"].image)


def test_single_sequence_output_unchanged(tmp_path) -> None:
    # digests of the generator before multi-sequence support (commit 3741bf7), same numpy/scipy
    atlas = mni_atlas(4.0)
    image, mask = make_subject(atlas, np.random.default_rng([5, 1]), "tumour", 4.0)
    assert (digest(image), digest(mask)) == ("934ebd2789071a52", "0193b8e69763677f")
    native = make_native_subject(atlas, np.random.default_rng([5, 2, 1]), "ms", 4.0)
    assert (digest(native.image), digest(native.mask), digest(native.affine)) == (
        "7c85d4cffdc8f8ad",
        "4886e714e05421c4",
        "483f282210263d45",
    )
    # the default layout is the single-file one, written from that code path
    out = make_demo_dataset(
        tmp_path / "flat",
        "tiny",
        seed=5,
        voxel_size=4.0,
        n_train=1,
        n_test_normal=0,
        n_test_anomalous=1,
        lesion_kinds=("tumour",),
    )
    assert sorted(p.name for p in out.iterdir()) == ["manifest.csv", "test", "test_masks", "train"]
    written = np.asarray(nib.load(out / "test" / "sub-100.nii.gz").dataobj)
    assert digest(written) == digest(image)


def test_bad_sequences_and_layout(tmp_path) -> None:
    with pytest.raises(ConfigError, match="did you mean 'FLAIR'"):
        make_demo_dataset(tmp_path / "a", "tiny", sequences=("T1w", "FLAIRR"))
    with pytest.raises(ConfigError, match="twice"):
        make_demo_dataset(tmp_path / "b", "tiny", sequences=("T1w", "T1w"))
    with pytest.raises(ConfigError, match="layout='bids'"):
        make_demo_dataset(tmp_path / "c", "tiny", sequences=("T1w", "FLAIR"), layout="flat")
    with pytest.raises(ConfigError, match="layout"):
        make_demo_dataset(tmp_path / "d", "tiny", layout="bidz")
    assert not any(tmp_path.iterdir())
