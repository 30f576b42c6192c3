"""Interrupted runs resume: SIGINT and SIGTERM sent to real `vitslim` processes mid-epoch leave a
checkpoint and no temporary file; rerunning the same command ends with the same bytes as a run
that was never interrupted (same seed, same machine)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vitslim.cli import main
from vitslim.core.errors import EXIT_INTERRUPTED, EXIT_TERMINATED

ROOT = Path(__file__).resolve().parents[1]
# big enough for an epoch to take about a second on one core, so that a signal lands mid-epoch
MODEL = [
    "--model",
    "deit_tiny_patch16_224",
    "--model-kwargs",
    "img_size=32",
    "patch_size=4",
    "embed_dim=64",
    "depth=3",
    "num_heads=2",
    "num_classes=10",
]


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "vitslim", *args]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        _command(*args),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def _as_from_a_terminal() -> None:
    """SIGINT as a terminal's Ctrl-C delivers it. A shell without job control starts background
    commands with SIGINT ignored, and the ignore is inherited (so is Python's choice then not to
    raise KeyboardInterrupt): a suite started with `make test &` would otherwise see the signal
    vanish."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt(args: list[str], checkpoint: Path, signum: int) -> tuple[int, str]:
    """Start `vitslim ARGS`, wait for its first checkpoint, let the next epoch begin, send `signum`.
    A process that ended before the signal could be sent (this test process starved on a busy
    machine, or a fast one ran the remaining epochs first) proves nothing either way: it is run
    again from scratch, at most three times."""
    for _ in range(3):
        process = subprocess.Popen(
            _command(*args),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            preexec_fn=_as_from_a_terminal,
        )
        deadline = time.monotonic() + 300
        while not checkpoint.is_file() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # into the next epoch
        if process.poll() is None:
            process.send_signal(signum)
            _, err = process.communicate(timeout=120)
            return process.returncode, err
        _, err = process.communicate()
        if process.returncode != 0:  # it failed on its own: that is the result
            return process.returncode, err
        shutil.rmtree(checkpoint.parent.parent)  # the output directory of the run that ended too soon
    raise AssertionError(f"{' '.join(args)} ended three times before a signal could be sent: give it more epochs")


def _temporary_files(directory: Path) -> list[Path]:
    return [p for p in directory.rglob("*") if ".tmp" in p.name]


TRAIN = ["train", *MODEL, "--data", "digits", "--epochs", "5", "--batch-size", "32"]


@pytest.fixture(scope="module")
def uninterrupted_train(tmp_path_factory) -> Path:
    """The weights of the train command run without interruption (one run serves both signals)."""
    out = tmp_path_factory.mktemp("reference")
    reference = _run(*TRAIN, "--out", str(out))
    assert reference.returncode == 0, reference.stderr[-2000:]
    return out / "weights.safetensors"


@pytest.mark.slow
@pytest.mark.parametrize(
    "signum, code", [(signal.SIGINT, EXIT_INTERRUPTED), (signal.SIGTERM, EXIT_TERMINATED)], ids=["SIGINT", "SIGTERM"]
)
def test_train_resumes_after_a_signal_with_identical_weights(tmp_path, uninterrupted_train, signum, code):
    args = TRAIN
    run = tmp_path / "run"
    returncode, err = _interrupt([*args, "--out", str(run)], run / "checkpoints" / "train.pt", signum)
    assert returncode == code, err[-2000:]
    assert "rerun the same command to resume" in err
    assert (
        (run / "checkpoints" / "train.pt").is_file()
        and not (run / "weights.safetensors").exists()
        and not _temporary_files(run)
    )
    resumed = _run(*args, "--out", str(run))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stderr + resumed.stdout
    assert (run / "weights.safetensors").read_bytes() == uninterrupted_train.read_bytes()
    assert not (run / "checkpoints").exists()


@pytest.mark.slow
def test_prune_resumes_after_sigterm_with_identical_plan_and_weights(tmp_path):
    dense = tmp_path / "dense"
    assert main(["train", *MODEL, "--data", "digits", "--epochs", "0", "--out", str(dense)]) == 0
    args = [
        "prune",
        str(dense),
        "--method",
        "vtp",
        "--data",
        "digits",
        "--prune-ratio",
        "0.4",
        "--sparsity-epochs",
        "2",
        "--finetune-epochs",
        "3",
        "--batch-size",
        "32",
    ]
    reference = _run(*args, "--out", str(tmp_path / "reference"))
    assert reference.returncode == 0, reference.stderr[-2000:]
    run = tmp_path / "vtp"
    returncode, err = _interrupt([*args, "--out", str(run)], run / "checkpoints" / "finetune.pt", signal.SIGTERM)
    assert returncode == EXIT_TERMINATED, err[-2000:]
    assert {p.name for p in (run / "checkpoints").iterdir()} == {"sparsity.pt", "finetune.pt"} and not _temporary_files(
        run
    )
    resumed = _run(*args, "--out", str(run))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    for name in ("plan.json", "plan.safetensors", "weights.safetensors"):
        assert (run / name).read_bytes() == (tmp_path / "reference" / name).read_bytes(), name


def test_a_checkpoint_of_other_settings_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    tiny = [
        "--model",
        "deit_tiny_patch16_224",
        "--model-kwargs",
        "img_size=16",
        "patch_size=4",
        "embed_dim=32",
        "depth=2",
        "num_heads=2",
        "num_classes=10",
    ]
    from vitslim.pruning.checkpoints import save_state

    save_state(run / "checkpoints" / "train.pt", {"other": "settings"}, {"history": []})
    assert main(["train", *tiny, "--data", "digits", "--epochs", "1", "--out", str(run)]) == 3
    assert "was written with other settings" in capsys.readouterr().err
    assert main(["train", *tiny, "--data", "digits", "--epochs", "1", "--out", str(run), "--restart"]) == 0
    assert (run / "weights.safetensors").is_file() and not (run / "checkpoints").exists()


def test_a_refused_resume_names_the_settings_that_differ():
    from vitslim.pruning.checkpoints import differing_settings, settings_key

    before = {"train": {"lr": 0.001, "epochs": 5}, "data": "digits", "seed": 0}
    now = {"train": {"lr": 0.002, "epochs": 5}, "data": "photos", "seed": 0}
    assert (
        differing_settings(settings_key(before), now)
        == "data 'digits' then, 'photos' now; train.lr 0.001 then, 0.002 now"
    )
    many = {f"k{i}": i for i in range(6)}
    assert differing_settings(settings_key({}), many).endswith("; 2 more")
    assert differing_settings("{not json", now) == "its record of them is unreadable"


def test_a_finished_stage_whose_info_is_missing_or_damaged_runs_again(tmp_path):
    import json

    from vitslim.pipeline import STAGE_FILE, _finished_stage

    stage = {"method": "vtp"}
    (tmp_path / STAGE_FILE).write_text(json.dumps(stage))
    (tmp_path / "plan.json").write_text("{}")
    assert _finished_stage(tmp_path, stage) is None  # no info.json
    (tmp_path / "info.json").write_text("{")
    assert _finished_stage(tmp_path, stage) is None  # damaged
    (tmp_path / "info.json").write_text('{"top1": 90.0}')
    assert _finished_stage(tmp_path, stage) == {"top1": 90.0} and _finished_stage(tmp_path, {"method": "x"}) is None
