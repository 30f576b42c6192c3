"""deploy/results.py, the one reader and writer of benchmark results and stored baselines."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from vitslim.deploy.bench import fingerprint_id
from vitslim.deploy.errors import DeployError
from vitslim.deploy.results import RESULT_VERSION, check_result, load_results, store_baselines, stored_baselines


def a_result(label: str = "onnxruntime:m.onnx", batch: int = 8, median_ms: float = 2.0) -> dict:
    fingerprint = {
        "host": {"cpu": "x"},
        "runner": {"backend": "onnxruntime"},
        "precision": "fp32",
        "batch": batch,
        "label": label,
    }
    return {
        "label": label,
        "batch": batch,
        "median_ms": median_ms,
        "cov": 0.01,
        "fingerprint": fingerprint,
        "fingerprint_id": fingerprint_id(fingerprint),
    }


def test_stored_baselines_round_trip_and_replace_their_older_files(tmp_path):
    assert stored_baselines(tmp_path / "none") is None
    store_baselines(tmp_path / "b", [a_result(), a_result(batch=1)])
    older = tmp_path / "b" / f"{a_result()['fingerprint_id']}.json"  # an earlier naming of the same result
    older.write_text(json.dumps(a_result()))
    (tmp_path / "b" / ".leftover.tmp.json").write_text("{")
    store_baselines(tmp_path / "b", [a_result(median_ms=3.0)])
    stored = stored_baselines(tmp_path / "b")
    assert sorted((r["batch"], r["median_ms"]) for r in stored) == [(1, 2.0), (8, 3.0)] and not older.exists()


def test_a_results_file_needs_its_version_and_something_measured(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"version": RESULT_VERSION, "results": [a_result()]}))
    assert load_results(path)["results"][0]["median_ms"] == 2.0
    for document, message in (
        ({"version": 0, "results": []}, "of version"),
        ({"version": RESULT_VERSION, "results": []}, "holds no results"),
    ):
        path.write_text(json.dumps(document))
        with pytest.raises(DeployError, match=message):
            load_results(path)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


@given(
    field=st.sampled_from(["label", "batch", "median_ms", "cov", "fingerprint", "fingerprint_id"]),
    value=JSON,
)
def test_any_value_in_any_field_is_accepted_only_when_valid_else_one_error(field, value):
    """Hostile, non-finite or mistyped values never get past the loader and never crash it."""
    result = {**a_result(), field: value}
    try:
        checked = check_result(result, "r.json")
    except DeployError:
        return
    assert math.isfinite(checked["median_ms"]) and checked["median_ms"] > 0 and math.isfinite(checked["cov"])
    assert isinstance(checked["batch"], int) and checked["fingerprint_id"] == fingerprint_id(checked["fingerprint"])


def test_storing_baselines_keeps_the_directory_s_other_entries_mode_and_link(tmp_path):
    """A --baseline-dir may be a git checkout, shared with other users, or a link into a cache."""
    import os
    import stat

    from vitslim.deploy.results import store_baselines

    cache = tmp_path / "cache" / "baselines"
    (cache / ".git").mkdir(parents=True)
    (cache / ".gitignore").write_text("x")
    (cache / ".r.abc.tmp.json").write_text("{")  # an interrupted write's leftover: dropped
    os.chmod(cache, 0o755)
    (tmp_path / "link").symlink_to(cache, target_is_directory=True)
    store_baselines(tmp_path / "link", [])
    assert (tmp_path / "link").is_symlink() and sorted(p.name for p in cache.iterdir()) == [".git", ".gitignore"]
    assert stat.S_IMODE(cache.stat().st_mode) == 0o755
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["baselines"]  # nothing left beside it
