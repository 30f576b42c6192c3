"""vitslim.core: exit codes, atomic files, settings, metadata — the facts every layer shares."""

from __future__ import annotations

import dataclasses
from typing import Optional

import onnx
import pytest

from vitslim.core import errors
from vitslim.core.files import atomic_path, sha256_of, write_json_atomic
from vitslim.core.metadata import ATTENTION_FORM_KEY, PREPROCESSING_KEY, attention_form_of, preprocessing_of
from vitslim.core.settings import check_value, help_of, setting


def test_exit_codes_are_distinct_and_verdicts_are_never_crashes():
    codes = {name: value for name, value in vars(errors).items() if name.startswith("EXIT_")}
    assert len(set(codes.values())) == len(codes), codes
    assert errors.EXIT_INTERNAL_ERROR not in (errors.EXIT_OK, errors.EXIT_CHECK_FAILED, errors.EXIT_UNDECIDED)


def test_an_interrupted_atomic_write_leaves_the_old_file(tmp_path):
    target = tmp_path / "result.json"
    write_json_atomic(target, {"a": 1})
    with pytest.raises(RuntimeError), atomic_path(target) as temporary:
        temporary.write_text("half")
        raise RuntimeError("interrupted")
    assert target.read_text().strip().startswith("{") and [p.name for p in tmp_path.iterdir()] == ["result.json"]
    assert len(sha256_of(target)) == 64


@dataclasses.dataclass(frozen=True)
class _Settings:
    ratio: float = setting(0.5, "a fraction")
    count: Optional[int] = setting(None, "how many")


def test_settings_carry_their_help_and_check_their_values():
    ratio, count = dataclasses.fields(_Settings)
    assert help_of(ratio) == "a fraction" and _Settings().ratio == 0.5
    assert check_value(ratio, 1) is None and check_value(ratio, "x") == "a number"
    assert check_value(count, None) is None and check_value(count, True) == "an integer or null"


def test_metadata_readers_tolerate_what_other_exporters_write():
    model = onnx.ModelProto()
    assert attention_form_of(model) is None and preprocessing_of(model) is None
    onnx.helper.set_model_props(model, {ATTENTION_FORM_KEY: "attention-op", PREPROCESSING_KEY: "not json"})
    assert attention_form_of(model) == "attention-op" and preprocessing_of(model) is None


def test_read_json_names_the_resolved_file_and_the_fix_in_one_line(tmp_path, monkeypatch):
    from vitslim.core.files import read_json

    monkeypatch.chdir(tmp_path)
    with pytest.raises(errors.VitslimError, match=f"results {tmp_path}/r.json does not exist: measure first"):
        read_json("r.json", "results", "measure first")
    for name, text in (("bad.json", "{not json"), ("deep.json", "[" * 100_000 + "]" * 100_000)):
        (tmp_path / name).write_text(text)
        with pytest.raises(errors.VitslimError, match=f"results {tmp_path}/{name} is unreadable") as raised:
            read_json(name, "results", "measure first")
        assert "\n" not in str(raised.value)
    (tmp_path / "bytes.json").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(errors.VitslimError, match="UnicodeDecodeError"):
        read_json(tmp_path / "bytes.json", "results", "measure first")


def test_a_second_writer_of_one_output_is_refused_and_the_lock_dies_with_its_holder(tmp_path):
    from vitslim.core.files import output_lock

    with output_lock(tmp_path / "run"):
        # flock locks belong to an open file: a second open in this process stands for another process
        with pytest.raises(errors.VitslimError, match="is being written by another vitslim process"):
            with output_lock(tmp_path / "run"):
                pass
    assert not (tmp_path / "run").exists()  # made for the work, left empty: removed again
    with output_lock(tmp_path / "run"):  # released on leaving: the next writer gets it
        (tmp_path / "run" / "weights").write_text("w")
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["weights"]  # no lock file left behind
    (tmp_path / "file").write_text("x")
    with pytest.raises(errors.VitslimError, match="is a file"):
        with output_lock(tmp_path / "file"):
            pass


def test_a_full_disk_is_one_line_and_keeps_the_old_file(tmp_path, monkeypatch):
    import errno
    import os

    target = tmp_path / "r.json"
    write_json_atomic(target, {"a": 1})

    def full(source, destination):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(errors.VitslimError, match=f"no space left to write {target}: free some space"):
        write_json_atomic(target, {"a": 2})
    assert target.read_text().strip() == '{\n "a": 1\n}' and [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_a_directory_is_replaced_whole_or_not_at_all(tmp_path):
    from vitslim.core.files import _exchange, directory_swap

    target = tmp_path / "set"
    target.mkdir()
    (target / "old.json").write_text("old")
    with pytest.raises(RuntimeError), directory_swap(target) as staging:
        (staging / "new.json").write_text("new")
        raise RuntimeError("interrupted")
    assert [p.name for p in target.iterdir()] == ["old.json"] and [p.name for p in tmp_path.iterdir()] == ["set"]
    with directory_swap(target) as staging:
        (staging / "new.json").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new.json"] and [p.name for p in tmp_path.iterdir()] == ["set"]
    with directory_swap(tmp_path / "fresh") as staging:  # nothing there yet
        (staging / "a.json").write_text("a")
    assert (tmp_path / "fresh" / "a.json").read_text() == "a"
    assert _exchange(tmp_path / "set", tmp_path / "fresh")  # Linux: one atomic step
    assert (tmp_path / "set" / "a.json").is_file() and (tmp_path / "fresh" / "new.json").is_file()


def test_a_second_writer_of_a_file_output_is_refused_and_nothing_is_left_beside_it(tmp_path):
    from vitslim.core.files import file_output_lock

    with file_output_lock(tmp_path / "m.engine"):
        with pytest.raises(errors.VitslimError, match="m.engine is being written by another vitslim process"):
            with file_output_lock(tmp_path / "sub" / ".." / "m.engine"):  # the same file, spelled otherwise
                pass
    with file_output_lock(tmp_path / "m.engine"):
        pass
    assert list(tmp_path.iterdir()) == []
