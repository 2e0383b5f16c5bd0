"""Which preset each kind of data gets: the candidate with the best cross-fitted validation AP.

    python experiments/recommend.py [--results DIR]

Reads the benchmark results in ``DIR`` (default ``experiments/results``): ``benchmark.json``
(template space, one sequence), ``benchmark_native.json`` (native space, one sequence) and
``benchmark_multiseq[_native].json`` (T1w + FLAIR). For each kind of data it takes the rows that
are shipped presets (:data:`CANDIDATES`), picks the one with the highest validation AP (training
normals only, ``bench_validation``) and prints it next to the test figures, which play no part in
the pick. A candidate without a validation figure is listed and never picked. Writes
``recommendation.json`` and ``recommendation.md``; ``anomaly3d_core.preprocess.survey.RECOMMENDED``
(what ``fit`` advises) must name the same presets (``tests/test_survey.py`` checks it).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

#: kind of data -> (results file, {row name: preset file, or the preset and how the row varies it})
CANDIDATES: dict[str, tuple[str, dict[str, str]]] = {
    "template, one sequence": (
        "benchmark.json",
        {
            "preset (brain_mri.yaml)": "brain_mri.yaml",
            "native preset (brain_mri_native.yaml)": "brain_mri_native.yaml",
            "ensemble (brain_ensemble.yaml)": "brain_ensemble.yaml",
            "multi-scale (brain_mri_multiscale.yaml)": "brain_mri_multiscale.yaml",
            "synthetic anomalies, U-Net (brain_mri_synthetic.yaml)": "brain_mri_synthetic.yaml",
        },
    ),
    "native, one sequence": (
        "benchmark_native.json",
        {
            "native preset (brain_mri_native.yaml)": "brain_mri_native.yaml",
            "registered: brain_mri.yaml (register_to: auto, normative)": "brain_mri.yaml",
            "synthetic anomalies, U-Net (brain_mri_synthetic.yaml)": "brain_mri_synthetic.yaml",
            "ensemble: native preset + synthetic anomalies (brain_mri_native_ensemble.yaml)": (
                "brain_mri_native_ensemble.yaml"
            ),
        },
    ),
    "template, T1w + FLAIR": (
        "benchmark_multiseq.json",
        {  # the preset and variants of its residual signs (the validation chose the preset's)
            "T1w + FLAIR, T1w dark, FLAIR bright": "brain_mri_multiseq.yaml",
            "T1w + FLAIR": "brain_mri_multiseq.yaml, both signs in both",
            "T1w + FLAIR, FLAIR bright": "brain_mri_multiseq.yaml, T1w both signs",
            "T1w + FLAIR, T1w dark, FLAIR bright, max": "brain_mri_multiseq.yaml, channel max",
            "T1w + FLAIR, brain_mri_synthetic.yaml": "brain_mri_synthetic_multiseq.yaml",
        },
    ),
    "native, T1w + FLAIR": (
        "benchmark_multiseq_native.json",
        {
            "T1w + FLAIR, T1w dark, FLAIR bright, brain_mri.yaml": "brain_mri_multiseq.yaml",
            "T1w + FLAIR, FLAIR bright, brain_mri.yaml": "brain_mri_multiseq.yaml, T1w both signs",
            "T1w + FLAIR, brain_mri_native.yaml": "brain_mri_native.yaml",
            "T1w + FLAIR, brain_mri_synthetic.yaml": "brain_mri_synthetic_multiseq.yaml",
        },
    ),
}


def _figure(row: dict[str, Any], section: str, key: str = "pixel_ap") -> float:
    value = row.get(section, {}).get(key)
    return float(value) if isinstance(value, int | float) else float("nan")


def recommend(results: Path) -> list[dict[str, Any]]:
    """One entry per kind of data: the candidates' validation and test figures and the pick."""
    out = []
    for kind, (file, presets) in CANDIDATES.items():
        rows = {r["name"]: r for r in json.loads((results / file).read_text())}
        candidates = [
            {
                "row": name,
                "preset": preset,
                "validation_ap": _figure(rows[name], "validation"),
                "test_ap": _figure(rows[name], "all"),
                "test_sample_auroc": _figure(rows[name], "all", "volume_auroc"),
            }
            for name, preset in presets.items()
            if name in rows
        ]
        scored = [c for c in candidates if not math.isnan(c["validation_ap"])]
        pick = max(scored, key=lambda c: c["validation_ap"]) if scored else None
        best_test = max(candidates, key=lambda c: c["test_ap"]) if candidates else None
        out.append(
            {
                "kind": kind,
                "results": file,
                "preset": pick["preset"] if pick else None,
                "candidates": candidates,
                "test_best_preset": best_test["preset"] if best_test else None,
            }
        )
    return out


def table(entries: list[dict[str, Any]]) -> str:
    head = "| kind of data | candidate preset | validation AP | test AP (pooled) | sample AUROC | picked |"
    lines = [head, "|---|---|---|---|---|---|"]
    for e in entries:
        for c in e["candidates"]:
            lines.append(
                f"| {e['kind']} | {c['preset']} | {c['validation_ap']:.3f} | {c['test_ap']:.3f} "
                f"| {c['test_sample_auroc']:.3f} | {'**yes**' if c['preset'] == e['preset'] else ''} |"
            )
    lines.append("")
    for e in entries:
        test = {c["preset"]: c["test_ap"] for c in e["candidates"]}
        best = e["test_best_preset"]
        if e["preset"] is None:
            lines.append(f"- {e['kind']}: no candidate has a validation figure yet")
        elif e["preset"] == best:
            lines.append(f"- {e['kind']}: the validation picks {best}, the test's best candidate too")
        else:
            lines.append(
                f"- {e['kind']}: the validation picks {e['preset']} (test AP {test[e['preset']]:.3f}); "
                f"the test's best candidate is {best} ({test[best]:.3f})"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--results", type=Path, default=HERE / "results")
    args = parser.parse_args()
    entries = recommend(args.results)
    text = table(entries)
    (args.results / "recommendation.json").write_text(json.dumps(entries, indent=2) + "\n")
    (args.results / "recommendation.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
