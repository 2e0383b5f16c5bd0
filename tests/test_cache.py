"""The preprocessing cache: hits on unchanged files, misses on changed content or settings."""

from __future__ import annotations

import numpy as np
from conftest import FAST, blob_volume
from writers import write_nifti

from anomaly3d_core.io import cache
from anomaly3d_core.pipeline import AnomalyDetectionPipeline


def test_cache_hit_miss_and_equality(tmp_path, monkeypatch):
    monkeypatch.setenv("ANOMALY3D_CACHE_DIR", str(tmp_path / "c"))
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    path = write_nifti(blob_volume(), affine, tmp_path, "scan")
    pipe = AnomalyDetectionPipeline(FAST)
    calls = []
    prepare = pipe.prepare

    def counting_prepare(item, mask=None):
        calls.append(item)
        return prepare(item, mask)

    monkeypatch.setattr(pipe, "prepare", counting_prepare)
    first = pipe._prepare_cached(path)
    assert calls == [path] and len(list((tmp_path / "c").glob("*.npz"))) == 1  # a miss, then stored
    again = pipe._prepare_cached(path)
    assert calls == [path]  # unchanged file: served from the cache
    assert np.array_equal(first.array, again.array) and np.array_equal(first.mask, again.mask)
    assert np.array_equal(first.source.array, again.source.array) and first.record == again.record
    other = AnomalyDetectionPipeline({**FAST, "data": {"preprocessing": {"target_spacing": 3.0}}})
    assert cache.content_key(path, {"a": 1}) != cache.content_key(path, {"a": 2})
    assert other._prepare_cached(path).array.shape != first.array.shape
    old_key = cache.content_key(path, {"a": 1})
    assert cache.content_key(path, {"a": 1}) == old_key  # same bytes, same key
    write_nifti(blob_volume(seed=9), affine, tmp_path, "scan")  # same name, new content
    assert cache.content_key(path, {"a": 1}) != old_key
    changed = pipe._prepare_cached(path)
    assert calls == [path, path]  # a miss: the entry for the old content is not served
    assert not np.array_equal(changed.source.array, first.source.array)
    assert len(list((tmp_path / "c").glob("*.npz"))) == 3  # old content, other settings, new content
    pipe._prepare_cached(path)
    assert calls == [path, path]  # and the new content is a hit from now on


def test_cache_can_be_disabled(tmp_path, monkeypatch):
    monkeypatch.setenv("ANOMALY3D_CACHE_DIR", str(tmp_path / "c"))
    monkeypatch.setenv("ANOMALY3D_CACHE", "0")
    path = write_nifti(blob_volume(), np.eye(4), tmp_path, "scan")
    prepared = AnomalyDetectionPipeline(FAST)._prepare_cached(path)
    assert prepared.array.ndim == 3 and prepared.mask.any()  # still prepared, just not stored
    assert not (tmp_path / "c").exists()
