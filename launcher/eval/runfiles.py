"""The files a ``launch probe`` / ``launch ppl`` run writes and the ones ``--compare`` reads.

Writing follows the rule of ``patch --out`` (``launcher.model.overlay``): launch writes only into a
directory it made, or an empty one, and never replaces anything.

- ``check_out_dir`` refuses, before the run, an ``--out`` that names no plain new directory (a control
  character in it, ``.``), a link, a file, a directory that already holds anything (a model's own
  ``ppl.png``, a ``results.json.tmp`` of the user's, a dangling link), or a place in the Hugging Face
  cache.
- ``RunDir.claim`` takes that place when the run is over (hours later): it makes the directory, or
  takes it if it is still an empty real directory, opened without following a link. When it is no
  longer usable (the user put something there meanwhile), the results go to a new directory beside
  it (``NAME-2``, ...) made by launch, and ``note`` says so: a long run's results are never lost
  and nothing of the user's is touched.
- ``RunDir.write`` creates each file under a temporary name that only this process uses
  (``O_EXCL``), then links it into place, which fails rather than replace a name that exists. Every
  step goes through the directory's descriptor, so a link swapped in cannot redirect it.

Reading (``runtime.paths.read_regular``) opens without blocking and refuses anything but a regular file, so a FIFO,
a device or a socket given to ``--compare`` or ``--text`` is one clear error, never a hang.
"""

from __future__ import annotations

import errno
import os
import stat
import uuid
from pathlib import Path
from typing import Self

from launcher.errors import LaunchError, printable
from launcher.runtime.outdir import BadOutPath, check_out_path, inside_hf_cache

FALLBACK_TRIES = 100  # NAME-2 ... NAME-101 beside an --out that was taken during the run
_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS, errno.EXDEV}


class OutNotWritable(LaunchError):
    """A run's results could not be written where launch may write them."""

    path: str
    problem: str

    def message(self) -> str:
        return printable(f"cannot write the results at {self.path}: {self.problem}. "
                         "Free some space or give another --out; nothing of yours was changed.")


def check_out_dir(out: Path | str, example: str) -> Path:
    """``out`` as the place of a new run directory, checked before the run (reads only): a plain
    name (``outdir.check_out_path``), not in the Hugging Face cache, not a link, and either new
    (its nearest existing parent a writable directory) or an empty, writable real directory.
    ``BadOutPath`` (exit 2) says why not."""

    path = check_out_path(out, example=example)
    shown = printable(str(path))
    if inside_hf_cache(path):
        raise BadOutPath(shown, "is inside the Hugging Face cache; launch never writes there. Give another --out")
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):  # new (a file above it is refused below)
        st = None
    except OSError as err:
        raise BadOutPath(shown, f"cannot look at it: {err.strerror or err}") from None
    if st is not None:
        if stat.S_ISLNK(st.st_mode):
            raise BadOutPath(shown, "is a symbolic link; launch does not write through links. Give a new directory")
        if not stat.S_ISDIR(st.st_mode):
            raise BadOutPath(shown, "is a file, not a directory; give a new directory")
        present = _listing(path, shown)
        if present:
            raise BadOutPath(shown, f"already holds {_describe(present)}; launch writes only into a new or empty "
                             "directory. Give a new one")
        _check_writable(path, shown)
        return path
    existing = path.absolute().parent
    while not os.path.lexists(existing):
        existing = existing.parent
    if not existing.is_dir():
        raise BadOutPath(shown, f"{printable(str(existing))} is a file, not a directory")
    _check_writable(existing, shown, f"{printable(str(existing))} ")
    return path


def _listing(path: Path, shown: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except OSError as err:
        raise BadOutPath(shown, f"cannot read it: {err.strerror or err}") from None


def _check_writable(path: Path, shown: str, which: str = "") -> None:
    if not os.access(path, os.W_OK | os.X_OK):
        raise BadOutPath(shown, f"{which}is not writable; give another directory".lstrip())


def _describe(names: list[str]) -> str:
    shown = ", ".join(printable(n) for n in names[:3])
    return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")


class RunDir:
    """A directory a run writes into: made by launch, or found empty; use as a context manager."""

    def __init__(self, path: Path, fd: int, note: str | None, created: bool) -> None:
        self.path = path
        self.note = note  # set when --out was taken during the run and the results went beside it
        self._fd = fd
        self._created = created
        self.written: list[Path] = []

    @classmethod
    def claim(cls, out: Path | str) -> RunDir:
        """Make ``out``, or take it while it is an empty real directory; else make ``out-2``, ``out-3``,
        ... beside it (only a directory launch makes itself) and say so in ``note``."""

        path = check_out_path(out)
        fd, why, created = _take(path, may_exist=True)
        if fd is not None:
            return cls(path, fd, None, created)
        for number in range(2, FALLBACK_TRIES + 2):
            other = path.with_name(f"{path.name}-{number}")
            fd, _, _ = _take(other, may_exist=False)
            if fd is not None:
                return cls(other, fd, f"{printable(str(path))} {why} when the run ended, so its results are in "
                                      f"{printable(str(other))}", True)
        raise OutNotWritable(str(path), f"it {why}, and so did {path.name}-2 to -{FALLBACK_TRIES + 1} beside it")

    def write(self, name: str, data: bytes) -> Path:
        """Create ``name`` holding ``data``, whole or not at all; never replaces an existing entry."""
        tmp = f".{name}.{os.getpid()}-{uuid.uuid4().hex[:12]}.launch-tmp"
        try:
            handle = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666,
                             dir_fd=self._fd)
            try:
                with os.fdopen(handle, "wb") as stream:
                    stream.write(data)
                    stream.flush()
                    os.fsync(stream.fileno())
                self._publish(tmp, name, data)
            finally:
                try:
                    os.unlink(tmp, dir_fd=self._fd)
                except FileNotFoundError:
                    pass
        except FileExistsError:
            raise OutNotWritable(str(self.path / name), "that name appeared while launch was writing it; it was "
                                 "left alone") from None
        except OSError as err:
            raise OutNotWritable(str(self.path / name), err.strerror or str(err)) from None
        self.written.append(self.path / name)
        return self.path / name

    def _publish(self, tmp: str, name: str, data: bytes) -> None:
        try:
            os.link(tmp, name, src_dir_fd=self._fd, dst_dir_fd=self._fd, follow_symlinks=False)
        except OSError as err:
            if err.errno not in _NO_HARD_LINKS:
                raise
            # A file system without hard links: create the name itself, exclusively.
            handle = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666,
                             dir_fd=self._fd)
            with os.fdopen(handle, "wb") as stream:
                stream.write(data)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: object, *exc: object) -> None:
        self.close()
        if kind is not None and self._created and not self.written:
            try:  # nothing was written: the directory launch made goes again
                os.rmdir(self.path)
            except OSError:
                pass


def _take(path: Path, may_exist: bool) -> tuple[int | None, str, bool]:
    """``(descriptor, "", made now)`` of ``path`` when launch may write there (made now, or with
    ``may_exist`` an empty real directory), else ``(None, why not, False)``."""
    created = False
    try:
        if not path.parent.is_dir():
            path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutNotWritable(str(path), err.strerror or str(err)) from None
    try:
        os.mkdir(path)
        created = True
    except FileExistsError:
        if not may_exist:
            return None, "existed", False
    except OSError as err:
        raise OutNotWritable(str(path), err.strerror or str(err)) from None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.ENOTDIR):
            return None, "was a link or a file", False
        raise OutNotWritable(str(path), err.strerror or str(err)) from None
    if not created and os.listdir(fd):
        os.close(fd)
        return None, "was no longer empty", False
    return fd, "", created
