"""Atomic file and folder writes: temporary name beside the target, fsync, rename, clean-up on failure.

A reader (or a run resumed after ``kill -9``) sees either the old content or the complete new one, never a half
written file; nothing temporary is left behind by an error. Files get mode 0644 (less the umask), like any file the
user's tools write, whatever ``tempfile`` chose.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "remove_stale_temporaries",
    "write_directory_atomically",
    "write_file_atomically",
    "write_text_atomically",
]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_path(path: Path) -> None:
    """Flush ``path`` (a file or a folder) to disk; folders only where the OS allows opening them."""
    try:
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    except OSError:  # e.g. folders on Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_file_atomically(target: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a hidden temporary file beside ``target``, then fsync it and rename it into place."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, 0o644 & ~_umask())
        _fsync_path(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_path(target.parent)
    return target


def write_text_atomically(target: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``target`` atomically."""
    return write_file_atomically(target, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_directory_atomically(
    directory: str | os.PathLike, write: Callable[[Path], None], *, replace: bool = False
) -> Path:
    """Call ``write(tmp_dir)`` on a hidden folder beside ``directory``, then fsync it and rename it into place.

    ``directory`` must be absent or an empty folder, unless ``replace`` is true: then an existing folder is swapped
    out (renamed aside, the new one renamed in, the old one deleted). On any failure the temporary folder is removed
    and ``directory`` is as before.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    old: Path | None = None
    try:
        write(tmp)
        mode = 0o644 & ~_umask()
        for path in sorted(tmp.rglob("*")):
            if path.is_file():
                os.chmod(path, mode)
                _fsync_path(path)
        os.chmod(tmp, 0o755 & ~_umask())
        _fsync_path(tmp)
        if directory.exists():
            if replace and any(directory.iterdir()):
                old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".old", dir=directory.parent))
                os.replace(directory, old)
            else:
                directory.rmdir()  # refuses a non-empty folder
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not directory.exists():
            os.replace(old, directory)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    _fsync_path(directory.parent)
    return directory


# What the writers above name their temporaries: "." + target name + "." + 8 characters of tempfile's alphabet + suffix.
_TEMPORARY = re.compile(r"\.(?P<target>.+)\.[a-z0-9_]{8}\.(?P<kind>tmp|old)")


def remove_stale_temporaries(folder: str | os.PathLike, targets: str) -> list[Path]:
    """Clean up after a writer of this module killed with SIGKILL (no clean-up runs then), directly in ``folder``,
    for the targets whose names fully match the regular expression ``targets`` (only what the caller writes there;
    anything else is never touched). A ``.old`` copy whose target is missing (a folder replace killed between its two
    renames) is renamed back; every other temporary of those targets is deleted. Call it where no write to those
    targets is in progress; returns what was deleted."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    wanted = re.compile(targets)
    removed = []
    for path in sorted(folder.iterdir()):
        match = _TEMPORARY.fullmatch(path.name)
        if match is None or not wanted.fullmatch(match["target"]) or path.is_symlink():
            continue
        target = folder / match["target"]
        if match["kind"] == "old" and not target.exists():
            os.replace(path, target)  # the previous complete version, back in place
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    _fsync_path(folder)
    return removed
