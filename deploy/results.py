"""The benchmark results format (`vitslim bench --json`) and stored baselines (`vitslim gate
--accept`): the one reader and writer of both, with the format's version.

A results file is {"version": RESULT_VERSION, "results": [result, ...], ...}; a result holds
RESULT_FIELDS. A --baseline-dir holds one result per file, named by `baseline_file_name` (never by
anything a file says). Every reader validates before anything uses a value: finite positive
numbers, an integer batch, and a fingerprint_id that is the digest of the result's fingerprint.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Optional

from vitslim.core.files import directory_swap, read_json, write_json_atomic

from .bench import fingerprint_id
from .errors import DeployError

RESULT_VERSION = 1
# The rows `bench ARTIFACT --run RUN_DIR` adds beside the artifact's own: timm's model (the
# baseline of every speed-up), the run's compact module and the compact module of the dense plan.
# They carry "reference_row": true; a gate judges them only where the stored baseline has them too.
TIMM_LABEL, COMPACT_LABEL, DENSE_LABEL = "torch:timm", "torch:compact", "torch:dense"
RESULT_FIELDS = ("label", "batch", "median_ms", "cov", "fingerprint", "fingerprint_id")


def check_result(result, path) -> dict:
    """`result` if it is what 'vitslim bench --json' writes, else a one-line DeployError naming `path`."""
    if not isinstance(result, dict) or any(key not in result for key in RESULT_FIELDS):
        raise DeployError(
            f"{path} holds a result without {', '.join(RESULT_FIELDS)}: write results with 'vitslim bench --json'"
        )
    numbers_ok = all(
        isinstance(result[key], (int, float)) and not isinstance(result[key], bool) and math.isfinite(result[key])
        for key in ("median_ms", "cov")
    )
    if (
        not numbers_ok
        or not isinstance(result["batch"], int)
        or isinstance(result["batch"], bool)
        or result["batch"] < 1
        or result["median_ms"] <= 0
        or result["cov"] < 0
        or not isinstance(result["fingerprint"], dict)
        or not isinstance(result.get("label", ""), str)
    ):
        raise DeployError(
            f"{path} holds a result whose batch, median_ms, cov, label or fingerprint is not what 'vitslim bench --json' "
            "writes (finite, positive numbers; an integer batch): measure again"
        )
    measured = result["fingerprint"]
    if result.get("label", "") != measured.get("label", "") or result["batch"] != measured.get("batch"):
        raise DeployError(
            f"{path} holds a result whose label or batch differs from its fingerprint's (edited?): measure again"
        )
    # the id is bound to what was measured: integrity against mistakes and mixed-up files, not a signature
    if result["fingerprint_id"] != fingerprint_id(measured):
        raise DeployError(
            f"{path} holds a result whose fingerprint_id does not match its fingerprint (edited?): measure again"
        )
    return result


def load_baseline_result(path: Path) -> dict:
    """One result of a --baseline-dir (written there by 'vitslim gate --accept')."""
    data = read_json(path, "baseline", "delete it and store a new one with --accept", DeployError)
    return check_result(data, path)


def load_results(path: Path) -> dict:
    """A 'vitslim bench --json' result file, checked field by field."""
    path = Path(path)
    data = read_json(path, "benchmark results", f"write them with 'vitslim bench ARTIFACT --json {path}'", DeployError)
    if not isinstance(data, dict) or data.get("version") != RESULT_VERSION or not isinstance(data.get("results"), list):
        raise DeployError(
            f"{path} is not a vitslim benchmark result of version {RESULT_VERSION}: write it again with 'vitslim bench --json'"
        )
    if not data["results"]:
        raise DeployError(f"{path} holds no results: a gate needs something measured (vitslim bench --json)")
    for result in data["results"]:
        check_result(result, path)
    return data


def baseline_file_name(result: dict) -> str:
    """The file a stored baseline result goes to in a --baseline-dir: a readable slug of its label
    and batch, then the digest of its comparison key. Derived here, never taken from the file,
    so no label can name a path outside the directory."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", str(result.get("label") or "result")).strip("-.")[:60] or "result"
    return f"{slug}-b{int(result['batch'])}-{fingerprint_id(result['fingerprint'])}.json"


def stored_baselines(directory: Path) -> Optional[list[dict]]:
    """Every result stored in a --baseline-dir, or None when the directory does not exist yet."""
    if not directory.is_dir():
        return None
    return [load_baseline_result(path) for path in _baseline_files(directory)]


TEMPORARY = re.compile(r"\..+\.tmp\.json")  # what core.files.atomic_path names a result being written


def store_baselines(directory: Path, results: list[dict]) -> None:
    """Store `results` in `directory`, one file each, committed whole: the new set (the stored
    results that stay, an older file of the same result, e.g. under an earlier naming, dropped;
    the new results; any other file of the directory) is written into a hidden sibling and swapped
    in at once (core.files.directory_swap), so a gate never reads half an --accept."""
    import shutil

    directory = Path(directory)
    stored = {path: load_baseline_result(path) for path in _baseline_files(directory)} if directory.is_dir() else {}
    replaced = {_baseline_key(result) for result in results}
    with directory_swap(directory) as staging:
        if directory.is_dir():
            for entry in directory.iterdir():
                if TEMPORARY.fullmatch(entry.name) or entry in stored:
                    continue  # an interrupted write's temporary file; baselines are written below
                copy = shutil.copytree if entry.is_dir() and not entry.is_symlink() else shutil.copy2
                copy(entry, staging / entry.name)
        for path, result in stored.items():
            if _baseline_key(result) not in replaced:
                write_json_atomic(staging / path.name, result)
        for result in results:
            write_json_atomic(staging / baseline_file_name(result), result)


def _baseline_key(result: dict) -> tuple:
    return result.get("label", ""), result["batch"], result["fingerprint_id"]


def _baseline_files(directory: Path) -> list[Path]:
    """A --baseline-dir's results; files starting with a dot (an interrupted --accept's temporary
    files) are never read."""
    return sorted(path for path in directory.glob("*.json") if not path.name.startswith("."))
