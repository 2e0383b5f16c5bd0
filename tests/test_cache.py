"""The preprocessing cache: hits on unchanged files, misses on changed content or settings."""

from __future__ import annotations

import numpy as np
from conftest import FAST, blob_volume
from writers import write_nifti

from anomaly3d_core.io import cache
from anomaly3d_core.pipeline import AnomalyDetectionPipeline


def test_cache_hit_miss_and_equality(tmp_path, monkeypatch):
    monkeypatch.setenv("ANOMALY3D_CACHE_DIR", str(tmp_path / "c"))
    path = write_nifti(blob_volume(), np.diag([2.0, 2.0, 2.0, 1.0]), tmp_path, "scan")
    pipe = AnomalyDetectionPipeline(FAST)
    first = pipe._prepare_cached(path)
    assert len(list((tmp_path / "c").glob("*.npz"))) == 1
    calls = []
    monkeypatch.setattr(pipe, "prepare", lambda item: calls.append(item))
    again = pipe._prepare_cached(path)
    assert calls == []  # served from the cache
    assert np.array_equal(first.array, again.array) and np.array_equal(first.mask, again.mask)
    assert np.array_equal(first.source.array, again.source.array) and first.record == again.record
    other = AnomalyDetectionPipeline({**FAST, "data": {"preprocessing": {"target_spacing": 3.0}}})
    assert cache.content_key(path, {"a": 1}) != cache.content_key(path, {"a": 2})
    assert other._prepare_cached(path).array.shape != first.array.shape
    write_nifti(
        blob_volume(seed=9), np.diag([2.0, 2.0, 2.0, 1.0]), tmp_path, "scan"
    )  # same name, new content
    assert len(calls) == 0 and cache.load(cache.content_key(path, {"x": 0})) is None


def test_cache_can_be_disabled(tmp_path, monkeypatch):
    monkeypatch.setenv("ANOMALY3D_CACHE_DIR", str(tmp_path / "c"))
    monkeypatch.setenv("ANOMALY3D_CACHE", "0")
    path = write_nifti(blob_volume(), np.eye(4), tmp_path, "scan")
    AnomalyDetectionPipeline(FAST)._prepare_cached(path)
    assert not (tmp_path / "c").exists()
