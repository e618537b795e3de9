"""Atomic writes: the target is either the old content or the complete new one, and nothing temporary is left."""

from __future__ import annotations

import os
import stat

import pytest

from gralora_diffusion.fs import write_directory_atomically, write_file_atomically, write_text_atomically


def listing(folder):
    return sorted(p.name for p in folder.iterdir())


def test_file_write_replaces_content_with_mode_0644(tmp_path):
    target = tmp_path / "a.json"
    target.write_text("old")
    write_text_atomically(target, "new")
    assert target.read_text() == "new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644 & ~_umask()
    assert listing(tmp_path) == ["a.json"]


def test_failed_file_write_keeps_the_old_file_and_leaves_nothing(tmp_path):
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")

    def write(tmp):
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt  # also BaseException: a Ctrl-C mid-write

    with pytest.raises(KeyboardInterrupt):
        write_file_atomically(target, write)
    assert target.read_bytes() == b"old"
    assert listing(tmp_path) == ["a.bin"]


def test_folder_write_and_replace(tmp_path):
    target = tmp_path / "ckpt"
    write_directory_atomically(target, lambda tmp: (tmp / "x.txt").write_text("1"))
    assert (target / "x.txt").read_text() == "1"
    with pytest.raises(OSError):  # a non-empty folder is not replaced unless asked
        write_directory_atomically(target, lambda tmp: (tmp / "y.txt").write_text("2"))
    assert listing(target) == ["x.txt"]
    write_directory_atomically(target, lambda tmp: (tmp / "y.txt").write_text("2"), replace=True)
    assert listing(target) == ["y.txt"]
    assert listing(tmp_path) == ["ckpt"]


def test_failed_folder_write_keeps_the_old_folder_and_leaves_nothing(tmp_path):
    target = tmp_path / "ckpt"
    write_directory_atomically(target, lambda tmp: (tmp / "x.txt").write_text("1"))

    def write(tmp):
        (tmp / "y.txt").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_directory_atomically(target, write, replace=True)
    assert listing(target) == ["x.txt"]
    assert listing(tmp_path) == ["ckpt"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_stale_temporaries_of_a_killed_writer_are_cleaned_and_nothing_else(tmp_path):
    from gralora_diffusion.fs import remove_stale_temporaries

    (tmp_path / ".final.safetensors.k2j4_x9a.tmp").write_bytes(b"")  # a file write killed midway
    (tmp_path / ".checkpoint-4.ab12cd34.tmp").mkdir()  # a folder write killed midway
    (tmp_path / ".checkpoint-4.ab12cd34.tmp" / "adapter.safetensors").write_bytes(b"x")
    (tmp_path / ".checkpoint-8.zz99zz99.old").mkdir()  # a replace killed between its renames: the only copy
    (tmp_path / ".checkpoint-8.zz99zz99.old" / "state.json").write_text("{}")
    keep = [".hidden", ".notes.tmp", "final.safetensors", ".a.b.tmp", "checkpoint-4", ".zshrc.20240101.old",
            ".notes.backup01.tmp", ".other.safetensors.k2j4_x9a.tmp", ".final.safetensors.K2J4X9AB.tmp"]  # fmt: skip
    for name in keep:
        (tmp_path / name).write_text("keep")
    removed = remove_stale_temporaries(tmp_path, r"final\.safetensors|checkpoint-\d+")
    assert sorted(p.name for p in removed) == [".checkpoint-4.ab12cd34.tmp", ".final.safetensors.k2j4_x9a.tmp"]
    assert (tmp_path / "checkpoint-8" / "state.json").read_text() == "{}"  # renamed back, not deleted
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep + ["checkpoint-8"])
