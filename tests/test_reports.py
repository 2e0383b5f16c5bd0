"""Overlays and HTML reports: planes named after reorienting to RAS, slices through what matters,
self-contained pages that a real browser renders with the flagged subjects in them."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import matplotlib
import nibabel as nib
import numpy as np
import pytest

from anomaly3d_core.detector import ScoreResult
from anomaly3d_core.evaluation.slices import PLANES, RasGrid, plane_image, targets, to_ras
from anomaly3d_core.io.volume import Volume

matplotlib.use("Agg")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def axcodes_affine(codes: str, spacing=(1.0, 2.0, 3.0)) -> np.ndarray:
    """An affine whose array axes point along ``codes`` (e.g. ``"PSR"``), with ``spacing``."""
    directions = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}
    affine = np.zeros((4, 4))
    affine[3, 3] = 1
    for axis, code in enumerate(codes):
        world, sign = directions[code]
        affine[world, axis] = sign * spacing[axis]
    return affine


def world_coordinate(shape: tuple[int, int, int], affine: np.ndarray, which: int) -> np.ndarray:
    """A volume whose every voxel holds its world coordinate ``which`` (0: x, 1: y, 2: z)."""
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1)
    return (ijk @ affine[:3, :3].T + affine[:3, 3])[..., which]


@pytest.mark.parametrize("codes", ["LAS", "PSR", "RAS", "IPL"])
def test_planes_are_named_after_reorienting_to_ras(codes: str) -> None:
    """Whatever the axis order, a sagittal slice holds one x (left-right), a coronal one y and an
    axial one z; coronal and axial views put the patient's right on the viewer's left."""
    shape = (6, 7, 8)
    affine = axcodes_affine(codes)
    x, y, z = (world_coordinate(shape, affine, w) for w in range(3))
    canonical = nib.as_closest_canonical(nib.Nifti1Image(x.astype(np.float32), affine))
    ras_x, grid = to_ras(x, affine)
    assert np.allclose(ras_x, canonical.get_fdata())
    assert sorted(grid.spacing) == [1.0, 2.0, 3.0] and grid.spacing == tuple(
        float(s) for s in nib.affines.voxel_sizes(canonical.affine)
    )
    for plane, fixed in zip(PLANES, (x, y, z), strict=True):
        image, _ = plane_image(grid.array(fixed), plane, 2, grid.spacing)
        assert np.ptp(image) == 0, f"{codes}: {plane} slice is not at one {plane} position"
    for plane in ("coronal", "axial"):
        image, _ = plane_image(grid.array(x), plane, 2, grid.spacing)
        assert image[0, 0] > image[0, -1]  # leftmost column: the patient's right (largest x)
    sagittal, _ = plane_image(grid.array(y), "sagittal", 2, grid.spacing)
    assert sagittal[0, -1] > sagittal[0, 0]  # anterior on the right
    axial_rows, _ = plane_image(grid.array(y), "axial", 2, grid.spacing)
    assert axial_rows[-1, 0] > axial_rows[0, 0]  # anterior at the top


def test_ras_index_follows_the_voxel() -> None:
    affine = axcodes_affine("PSR")
    data = np.zeros((6, 7, 8))
    data[1, 5, 3] = 1
    grid = RasGrid.from_affine(affine, data.shape)
    assert grid.array(data)[grid.index((1, 5, 3))] == 1


def small_lesion_case() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scores peaking at an edge artefact, a small true lesion elsewhere, a flagged cluster on it."""
    scores = np.zeros((24, 24, 24), np.float32)
    scores[1, 1, 1] = 10.0  # the highest voxel: an artefact at the edge
    truth = np.zeros(scores.shape, bool)
    truth[15:18, 14:17, 9:12] = True  # 27 voxels
    scores[truth] = 2.0
    mask = scores > 1.5
    mask[1, 1, 1] = False
    return scores, mask, truth


def test_slices_go_through_the_small_lesion_not_the_maximum() -> None:
    scores, mask, truth = small_lesion_case()
    found = targets(scores, mask, truth)
    assert found[0].kind == "lesion" and truth[found[0].voxel] and found[0].n_voxels == 27
    assert found[1].kind == "cluster" and mask[found[1].voxel]
    assert all(t.voxel != (1, 1, 1) for t in found)
    assert targets(scores)[0].voxel == (1, 1, 1)  # nothing flagged, no truth: the peak


def test_overlay_draws_every_sequence_a_colour_bar_and_the_decision(tmp_path: Path) -> None:
    from anomaly3d_core.evaluation.plotting import plot_overlay

    scores, mask, truth = small_lesion_case()
    image = np.stack([np.full(scores.shape, 10.0), np.full(scores.shape, 20.0)], axis=-1)
    image[..., 0] += np.random.default_rng(0).random(scores.shape)
    image[..., 1] += np.random.default_rng(1).random(scores.shape)
    fig = plot_overlay(
        image,
        scores,
        mask,
        truth,
        affine=axcodes_affine("LAS"),
        sequences=["T1w", "FLAIR"],
        threshold=1.5,
        title="sub-01",
        decision="ANOMALOUS: scan score 3 > scan threshold 1",
    )
    labels = [ax.get_ylabel() for ax in fig.axes if ax.get_ylabel()]
    assert labels[:3] == ["T1w", "FLAIR", "score on T1w"]
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert [t.split()[0] for t in titles] == ["sagittal", "coronal", "axial"]
    assert any("threshold 1.5" in ax.get_ylabel() for ax in fig.axes)  # the colour bar
    suptitle = fig._suptitle.get_text()
    assert "ANOMALOUS" in suptitle and "true lesion 1 of 1: 27 voxels" in suptitle


def fake_result(path: str, scores: np.ndarray, mask: np.ndarray, score: float, flagged: bool) -> ScoreResult:
    image = np.random.default_rng(0).random(scores.shape).astype(np.float32) + 1
    return ScoreResult(
        volume=Volume(image, axcodes_affine("LAS", (2.0, 2.0, 2.0)), path),
        score_map=scores,
        mask=mask,
        volume_score=score,
        is_anomalous=flagged,
        threshold=1.5,
    )


class FakeDetector:
    channels: list[str] = []
    threshold_ = 1.5
    volume_threshold_ = 1.0
    n_train_volumes_ = 4


def write_reports(out: Path) -> Path:
    from anomaly3d_core.reports import ReportWriter

    scores, mask, truth = small_lesion_case()
    writer = ReportWriter(out, FakeDetector(), "models:/demo@champion")
    rows = []
    for name, score, flagged in (("sub-01", 3.0, True), ("sub-02", 0.4, False)):
        result = fake_result(
            f"{name}.nii.gz", scores if flagged else scores * 0, mask & flagged, score, flagged
        )
        row = {"file": f"{name}.nii.gz", "volume_score": score, "is_anomalous": flagged, "threshold": 1.5}
        row["registration_dice"] = 0.95 if flagged else 0.55  # sub-02: a poor registration
        writer.subject(result, row, name, truth=truth if flagged else None)
        rows.append(row)
    return writer.group(rows, ["sub-01", "sub-02"])


def test_reports_are_self_contained_with_the_flagged_table(tmp_path: Path) -> None:
    group = write_reports(tmp_path)
    text = group.read_text(encoding="utf-8")
    assert 'id="flagged"' in text and ">sub-01</a>" in text.split('id="flagged"')[1].split("</table>")[0]
    assert "poor registration" in text  # sub-02's data-quality flag
    subject = (tmp_path / "sub-01_report.html").read_text(encoding="utf-8")
    assert subject.count('src="data:image/png;base64,') >= 2  # a true lesion and a flagged cluster
    assert not re.search(r'(src|href)="(https?:|//)', subject + text)  # nothing fetched from elsewhere
    assert "ANOMALOUS: scan score 3 &gt; scan threshold 1" in subject
    assert 'href="report.html"' in subject


@pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium on PATH (apt-get install chromium; .ci/run installs it)"
)
def test_a_browser_renders_the_reports(tmp_path: Path) -> None:
    """Headless Chromium loads the pages offline: the DOM it builds holds the decision, the flagged
    subjects and decoded images; a screenshot of the page is not blank."""
    group = write_reports(tmp_path)
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
    script = (
        "<script>addEventListener('load',()=>{document.body.insertAdjacentHTML('beforeend','<p id=\"decoded\">'"
        "+[...document.images].filter(i=>i.naturalWidth>100).length+'</p>')})</script>"
    )
    probe = tmp_path / "probe.html"
    probe.write_text(
        (tmp_path / "sub-01_report.html").read_text(encoding="utf-8").replace("</body>", script + "</body>"),
        encoding="utf-8",
    )
    dom = subprocess.run(
        [*command, "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
        capture_output=True,
        timeout=120,
    ).stdout.decode("utf-8", "replace")
    assert "ANOMALOUS" in dom and 'id="clusters"' in dom
    assert int(re.search(r'id="decoded">(\d+)<', dom).group(1)) >= 2  # PNGs decoded by the browser
    dom = subprocess.run([*command, "--dump-dom", group.as_uri()], capture_output=True, timeout=120).stdout
    dom = dom.decode("utf-8", "replace")
    flagged = dom.split('id="flagged"')[1].split("</table>")[0]
    assert "sub-01" in flagged and "sub-02" not in flagged
    shot = tmp_path / "group.png"
    subprocess.run(
        [*command, "--hide-scrollbars", "--window-size=1000,1400", f"--screenshot={shot}", group.as_uri()],
        capture_output=True,
        timeout=120,
    )
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (1400, 1000) and pixels[..., :3].std() > 0.05


def test_progress_writes_plain_lines_when_not_on_a_terminal(capsys: pytest.CaptureFixture) -> None:
    from anomaly3d_core.progress import PlainProgress, progress

    bar = progress(range(20), desc="scoring", total=20)  # stderr is captured: not a terminal
    assert isinstance(bar, PlainProgress)
    for _ in bar:
        bar.set_postfix({"loss": "0.1"})
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 10 and lines[0].startswith("scoring: 2/20, ") and "s left (loss 0.1)" in lines[0]
    assert lines[-1].startswith("scoring: 20/20, ") and "left" not in lines[-1]
    assert list(progress(range(3), desc="quiet", enabled=False)) == [0, 1, 2]
    assert capsys.readouterr().err == ""


def test_decision_text_says_when_the_decision_is_uncalibrated():
    from anomaly3d_core.reports.subject import decision_text

    row = {"is_anomalous": "True", "volume_score": "8.9", "volume_threshold": "4.87", "p_value": "0.333"}
    calibrated = decision_text({**row, "alpha": "0.05", "decision_rule": "p_value <= alpha"})
    assert calibrated.endswith("(p = 0.333, alpha 0.05)")
    rule = "volume_score > volume_threshold (uncalibrated)"
    assert "uncalibrated decision" in decision_text({**row, "alpha": "0.05", "decision_rule": rule})
