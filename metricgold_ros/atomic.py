"""Atomic file output: a reader (or a crash) never sees a half-written file under its name.

Everything is written to a uniquely named temporary sibling (``.NAME.XXXX.partial``, so two
writers of one name never collide) and renamed over the final name only when complete; on
any error the temporary is removed. Before the rename the new content is fsynced (files and
folders), after it the parent folder, so a power cut leaves either the old or the new output.
An output being replaced is moved aside, not deleted, until the new one is in place. New
files and folders get the modes the process's umask allows (mkstemp's 0600 would hide them
from other users; a 0644 would show them where the umask says not to). Used by ``infer``,
``eval``, the PLY writer, checkpoint saving, the bag tool and the synthetic camera's stamp
file.
"""

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Union

PathLike = Union[str, 'os.PathLike[str]']
PARTIAL_SUFFIX = '.partial'
REPLACED_SUFFIX = '.replaced'


def current_umask() -> int:
    """The process's umask, read without changing it where Linux tells (``/proc``)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path('/proc/self/status').read_text().splitlines():
            if line.startswith('Umask:'):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)  # elsewhere: set and restore (racy only against another thread)
    os.umask(mask)
    return mask


def default_mode(*, directory: bool) -> int:
    """The mode ``open``/``mkdir`` would give a new file or folder under the umask."""
    return (0o777 if directory else 0o666) & ~current_umask()


def describe(path: PathLike, *, shown: int = 3) -> str:
    """What is at ``path``, in words for an error message ('a folder holding a.txt, b'): what
    a tool that refuses to replace it names."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        return f'a broken symbolic link to {os.readlink(path)}'
    if path.is_dir():
        try:
            names = sorted(entry.name for entry in path.iterdir())
        except OSError as err:
            return f'a folder that cannot be listed ({err.strerror})'
        if not names:
            return 'an empty folder'
        more = f' and {len(names) - shown} more' if len(names) > shown else ''
        return f"a folder holding {', '.join(names[:shown])}{more}"
    if path.is_file():
        return f'a file of {path.stat().st_size} bytes'
    return 'something that is neither a file nor a folder'


def fsync_path(path: PathLike) -> None:
    """Flush one file's or folder's data and entry list to disk (best effort for folders)."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if Path(path).is_dir() else 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # e.g. a folder that cannot be opened on this platform
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on folders
        pass
    finally:
        os.close(fd)


def fsync_tree(path: PathLike) -> None:
    """fsync every regular file and folder at or below ``path`` (symlinks not followed)."""
    root = Path(path)
    if root.is_symlink():
        return
    if root.is_file():
        fsync_path(root)
        return
    for folder, _, files in os.walk(root):
        for name in files:
            entry = Path(folder, name)
            if entry.is_file() and not entry.is_symlink():
                fsync_path(entry)
        fsync_path(folder)


def replace_path(new: PathLike, final: PathLike) -> None:
    """Rename ``new`` to ``final``; an existing ``final`` is moved aside until ``new`` is there.

    ``new`` is fsynced before and the parent folder after. A failing rename puts the old
    output back. Files replace files atomically (``os.replace``; a folder where a file is to
    go is an error, never replaced); a folder replacing a folder renames the old one to
    ``.NAME.XXXX.replaced`` first and deletes it only once ``new`` holds ``final``.
    """
    new, final = Path(new), Path(final)
    fsync_tree(new)
    aside = None
    if new.is_dir() and final.is_dir() and not final.is_symlink():  # a file never replaces one
        aside = Path(tempfile.mkdtemp(prefix=f'.{final.name}.', suffix=REPLACED_SUFFIX,
                                      dir=final.parent))
        aside.rmdir()  # only the unique name is wanted
        os.rename(final, aside)
    try:
        os.replace(new, final)
    except BaseException:
        if aside is not None:
            os.rename(aside, final)
        raise
    fsync_path(final.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def atomic_path(path: PathLike, *, directory: bool = False) -> Iterator[Path]:
    """A temporary sibling of ``path`` to write; renamed over ``path`` when the block ends.

    With ``directory`` the temporary is a folder and an existing folder at ``path`` is
    replaced (moved aside first, deleted once the new one is in place; callers decide what
    they may replace). The temporary gets the umask's mode.
    """
    final = Path(path)
    prefix = f'.{final.name}.'
    if directory:
        temp = Path(tempfile.mkdtemp(prefix=prefix, suffix=PARTIAL_SUFFIX, dir=final.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=PARTIAL_SUFFIX, dir=final.parent)
        os.close(fd)
        temp = Path(name)
    os.chmod(temp, default_mode(directory=directory))
    try:
        yield temp
        replace_path(temp, final)
    except BaseException:
        if temp.is_dir():
            shutil.rmtree(temp, ignore_errors=True)
        elif temp.exists():
            temp.unlink()
        raise


@contextlib.contextmanager
def atomic_file(path: PathLike) -> Iterator[BinaryIO]:
    """A binary file handle whose content appears at ``path`` only when the block ends."""
    with atomic_path(path) as temp, open(temp, 'wb') as handle:
        yield handle
        handle.flush()
        os.fsync(handle.fileno())


def write_atomic(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_file(path) as handle:
        handle.write(data)


def write_json_atomic(path: PathLike, data: Any) -> None:
    """Write ``data`` as indented JSON (no NaN) to ``path`` atomically."""
    write_atomic(path, (json.dumps(data, indent=2, allow_nan=False) + '\n').encode('utf-8'))
