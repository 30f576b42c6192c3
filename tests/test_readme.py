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
