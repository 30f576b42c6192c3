"""`vitslim eval`: top-1 of a run directory, an ONNX file (no run needed) or an engine on a data
set, and with a run, agreement with its masked reference; run as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from vitslim.cli import main
from vitslim.core.errors import EXIT_BAD_INPUT, EXIT_OK


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    assert main(["export", str(tiny_run), "--out", str(root / "m.onnx")]) == EXIT_OK
    return root


def test_eval_of_an_onnx_needs_no_run_and_agrees_with_the_run(tiny_run, exported, tmp_path):
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "vitslim",
            "eval",
            str(exported / "m.onnx"),
            "--data",
            "digits",
            "--json",
            str(tmp_path / "e.json"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == EXIT_OK, completed.stderr
    alone = json.loads((tmp_path / "e.json").read_text())
    assert alone["images"] == 359 and 0 <= alone["top1"] <= 100 and "agreement_with_reference" not in alone
    assert "top-1" in completed.stdout and "359 validation images of digits" in completed.stdout
    assert main(["eval", str(tiny_run), "--data", "digits", "--json", str(tmp_path / "run.json")]) == EXIT_OK
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["top1"] == pytest.approx(alone["top1"], abs=0.6)  # at most two images of 359 differ
    with_run = ["eval", str(exported / "m.onnx"), "--data", "digits", "--run", str(tiny_run), "--batch", "50"]
    assert main([*with_run, "--json", str(tmp_path / "both.json")]) == EXIT_OK
    both = json.loads((tmp_path / "both.json").read_text())
    assert both["agreement_with_reference"] >= 0.99 and both["made_from"].endswith(
        "exported from this run (weights and plan digests match its export report)"
    )
    assert both["reference_top1"] == pytest.approx(run["top1"], abs=1e-9) and both["batch"] == 50


def test_eval_refuses_data_the_artifact_was_not_made_for(exported, tmp_path, capsys):
    from PIL import Image

    for name in ("a", "b"):
        (tmp_path / "photos" / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (16, 16), (40 * i, 0, 0)).save(tmp_path / "photos" / name / f"{i}.png")
    assert main(["eval", str(exported / "m.onnx"), "--data", str(tmp_path / "photos")]) == EXIT_BAD_INPUT
    assert "was made for" in capsys.readouterr().err  # its preprocessing is digits'
    assert main(["eval", str(tmp_path / "none.onnx"), "--data", "digits"]) == EXIT_BAD_INPUT
    assert "does not exist" in capsys.readouterr().err


def test_compare_an_onnx_against_another_without_a_run(tiny_run, exported, tmp_path, capsys):
    """An fp16 export held to the fp32 export (the reference, onnxruntime on the CPU)."""
    assert main(["export", str(tiny_run), "--precision", "fp16", "--out", str(tmp_path / "h.onnx")]) == EXIT_OK
    capsys.readouterr()
    argv = ["compare", "--reference", str(exported / "m.onnx"), "--onnx", str(tmp_path / "h.onnx")]
    assert main([*argv, "--data", "digits", "--json", str(tmp_path / "c.json")]) == EXIT_OK
    rows = json.loads((tmp_path / "c.json").read_text())["rows"]
    assert [(r["candidate"], r["precision"], r["batch"]) for r in rows] == [
        ("onnxruntime", "fp16", 1),
        ("onnxruntime", "fp16", 8),
    ]
    assert all(r["passed"] and r["top1_agreement"] >= 0.99 for r in rows)
    assert main([*argv]) == EXIT_OK and "seeded standard-normal images" in capsys.readouterr().out
    assert main(["compare", "--reference", str(exported / "m.onnx")]) == EXIT_BAD_INPUT
    assert "needs a candidate" in capsys.readouterr().err
    assert (
        main(["compare", str(tiny_run), "--reference", str(exported / "m.onnx"), "--onnx", str(tmp_path / "h.onnx")])
        == EXIT_BAD_INPUT
    )
    assert "not both" in capsys.readouterr().err


def test_an_artifact_given_to_the_wrong_option_names_the_right_one(exported, tmp_path, capsys):
    (tmp_path / "m.engine").write_bytes(b"engine")
    argv = ["compare", "--reference", str(exported / "m.onnx"), "--onnx", str(tmp_path / "m.engine")]
    assert main(argv) == EXIT_BAD_INPUT
    assert "is a TensorRT engine (.engine), not an ONNX file (.onnx): give it with --engine" in capsys.readouterr().err
