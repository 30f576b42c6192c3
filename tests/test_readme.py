"""The README's Python API example is run as written (it is this test's source)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_api_example() -> str:
    text = README.read_text()
    section = text.split("<!-- api-example:start -->", 1)[1].split("<!-- api-example:end -->", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return code


@pytest.mark.slow
def test_readme_api_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_api_example(), str(README) + ":api-example", "exec"), {"__name__": "readme_example"})
    assert (tmp_path / "runs" / "api-example" / "vtp" / "plan.json").is_file()
    assert (tmp_path / "runs" / "api-example" / "vtp.onnx").is_file()


ROOT = README.parent


def test_readme_starts_with_the_two_commands_and_stays_short():
    lines = [line.strip() for line in README.read_text().splitlines()]
    assert [line for line in lines if line.startswith("make ")][:2] == ["make run", "make test"]
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    assert len(lines) <= 170, "README starts people off; the rest belongs in docs/"


@pytest.mark.parametrize(
    "page", [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "BENCHMARKS.md"], ids=lambda p: p.name
)
def test_relative_links_point_at_files_that_exist(page):
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text())
    missing = [link for link in links if "://" not in link and not (page.parent / link).exists()]
    assert not missing, missing
