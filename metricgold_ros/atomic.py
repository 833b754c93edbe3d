"""Atomic file output: a reader (or a crash) never sees a half-written file under its name.

Everything is written to a uniquely named temporary sibling (``.NAME.XXXX.partial``, so two
writers of one name never collide) and renamed over the final name only when complete; on
any error the temporary is removed. Used by ``infer``, ``eval``, the PLY writer, checkpoint
saving and the synthetic camera's stamp file.
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


@contextlib.contextmanager
def atomic_path(path: PathLike, *, directory: bool = False) -> Iterator[Path]:
    """A temporary sibling of ``path`` to write; renamed over ``path`` when the block ends.

    With ``directory`` the temporary is a folder and an existing folder at ``path`` is
    replaced. Files are made readable by others (0644; mkstemp's 0600 would hide them).
    """
    final = Path(path)
    prefix = f'.{final.name}.'
    if directory:
        temp = Path(tempfile.mkdtemp(prefix=prefix, suffix=PARTIAL_SUFFIX, dir=final.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=PARTIAL_SUFFIX, dir=final.parent)
        os.close(fd)
        temp = Path(name)
        os.chmod(temp, 0o644)
    try:
        yield temp
        if directory and final.is_dir():
            shutil.rmtree(final)
        os.replace(temp, final)
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
