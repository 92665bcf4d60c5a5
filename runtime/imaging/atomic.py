"""Atomic outputs: write to a temporary name beside the target, then rename it into place.

A reader never sees a half-written file or bundle, an existing target is never replaced without
``overwrite``, and the result gets the permissions any ordinary write would get under the process
umask (temporary files are created private).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

from ..errors import OutputError


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux ``/proc``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: read it by setting it, and put it back at once
    os.umask(mask)
    return mask


def refuse_existing(path: Path, overwrite: bool) -> None:
    """:class:`OutputError` if ``path`` exists and may not be replaced."""
    if not overwrite and (path.exists() or path.is_symlink()):
        raise OutputError(f"{path}: exists; pass --overwrite to replace it")


@contextmanager
def atomic_output(path: str | os.PathLike, overwrite: bool = False, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path (a file, or a folder with ``directory``) in ``path``'s folder; when the
    block ends without an error it is renamed to ``path``, else removed. Parent folders are made."""
    path = Path(path)
    refuse_existing(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    else:
        suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".part{suffix}", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, (0o777 if directory else 0o666) & ~current_umask())
        if overwrite or directory:
            _replace(tmp, path, directory)
        else:
            _create(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True) if directory else tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_outputs(paths: Sequence[str | os.PathLike], overwrite: bool = False) -> Iterator[list[Path]]:
    """Several files that appear together or not at all: yield a temporary path for each of ``paths``;
    when the block ends without an error they are renamed into place in reverse order, so the first
    path (a scan's label map, which ``--skip-existing`` looks at) appears last. An error anywhere,
    a rename included, removes every temporary file not yet in place."""
    with ExitStack() as stack:
        yield [stack.enter_context(atomic_output(p, overwrite)) for p in paths]


def _create(tmp: Path, path: Path) -> None:
    """Put ``tmp`` at ``path`` only if nothing is there, atomically: a hard link fails when the name
    exists, so of two runs writing one output exactly one wins and the other gets an error (no lock
    to go stale when a process dies). Where the file system has no hard links, rename after a check."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise OutputError(f"{path}: exists (another run wrote it first); pass --overwrite to replace it") from None
    except OSError:  # no hard links here (some network and FUSE file systems)
        refuse_existing(path, False)
        os.replace(tmp, path)
        return
    tmp.unlink()


def _replace(tmp: Path, path: Path, directory: bool) -> None:
    if not (directory and path.is_dir()):
        os.replace(tmp, path)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
    os.replace(path, old / path.name)  # a folder cannot be renamed over a non-empty one
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def write_text_atomic(path: str | os.PathLike, text: str, overwrite: bool = False) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_output`)."""
    with atomic_output(path, overwrite) as tmp:
        tmp.write_text(text)
    return Path(path)
