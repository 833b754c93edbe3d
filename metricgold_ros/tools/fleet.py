"""Many bags at once for ``metricgold bag``: the jobs, their discovery and completion records.

``metricgold bag IN... OUT`` with several inputs, or a folder to search, writes one output bag
per input bag under ``OUT`` at the bag's path relative to the folder it was found in (a
``.bag``/``.mcap``/``.db3`` file ``x.bag`` becomes the rosbag2 folder ``x``). Each bag is
converted by the single-bag code (``fleet_workers.convert_job`` calls ``bag_convert.convert``),
on local worker processes (:mod:`metricgold_ros.tools.fleet_workers`) or on a Ray cluster
(:mod:`metricgold_ros.tools.fleet_ray`), each worker loading the model once; the command and
the scheduler are :mod:`metricgold_ros.tools.fleet_run`'s, the progress, per-bag lines and
summary :mod:`metricgold_ros.tools.fleet_summary`'s. This module imports none of them.

A finished bag gets a completion record beside it, ``NAME.metricgold.json`` (its summary, the
input's size and modification time taken before it was read, the model's identity and the
settings that change outputs), written atomically after the bag was renamed into place and
synced to disk. A re-run skips a bag whose output folder and record are there and whose
input, model and settings are unchanged; an output with an out-of-date record of ours is
redone (the old one moved aside until the new one is in place); an input that changed while
it was read (a bag still being recorded) is not marked done. An output without a record
(another tool's, or a crash in the moment between the two renames) is refused unless
``--overwrite``, which replaces only bags. Output names that collide or nest are refused
before any work starts. Times are seconds unless a name says ``_ns``.
"""

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Set, Tuple

from metricgold_ros.atomic import write_atomic
from metricgold_ros.errors import BagError, MetricGoldError
from metricgold_ros.tools.bag_output import BAG_SUFFIXES, is_bag

RECORD_SUFFIX = '.metricgold.json'
RECORD_VERSION = 2  # 2: the model's identity and the output settings are on record
MODEL_HASHED_FILE_BYTES = 1 << 20  # model files up to this size are hashed, larger by mtime
OUTPUT_NEUTRAL_SETTINGS = ('overwrite', 'device', 'allow_pickle', 'record_identity')


@dataclass(frozen=True)
class Job:
    """One input bag and where its output goes (``output`` = OUT / ``name``)."""

    index: int
    input: str
    output: str
    name: str
    frames_estimate: int = 0
    redo: bool = False  # an out-of-date output of ours: replaced without --overwrite


@dataclass
class JobOutcome:
    """What became of one job: 'ok', 'skipped' (complete before) or 'failed' with ``error``."""

    job: Job
    status: str
    error: Optional[str] = None
    summary: Dict[str, Any] = field(default_factory=dict)
    attempts: int = 0
    worker: Optional[str] = None


# -- discovery ------------------------------------------------------------------------------


def wants_fleet(inputs: Sequence[str]) -> bool:
    """True unless there is one input that is (or would be) a single bag: ``bag IN OUT``."""
    if len(inputs) != 1:
        return True
    path = Path(inputs[0])
    return path.is_dir() and not (path / 'metadata.yaml').exists()


def output_name(path: Path) -> str:
    """The output folder name of a bag: a file loses its bag suffix (x.bag -> x).

    A path without a name of its own (``.``, ``..``, ``run/``) is named by the folder it
    resolves to.
    """
    if path.name in ('', '.', '..'):
        path = path.resolve()
    return path.stem if path.is_file() and path.suffix in BAG_SUFFIXES else path.name


def find_bags(inputs: Sequence[str]) -> List[Tuple[Path, str]]:
    """``(bag, relative output name)`` for every bag given or found under a given folder.

    Folders are searched recursively in name order; a rosbag2 folder is one bag (its .mcap or
    .db3 files are not searched again) and hidden entries (such as a run's ``.NAME.partial-*``)
    are skipped. BagError for an input that does not exist, a folder without bags, and two bags
    that would be written to the same name.
    """
    found: List[Tuple[Path, str]] = []
    for text in inputs:
        root = Path(text)
        if not root.exists():
            raise BagError(f'INPUT {root}: no such file or folder')
        if is_bag(root):
            found.append((root, output_name(root)))
            continue
        if not root.is_dir():
            raise BagError(f'INPUT {root}: not a bag; give rosbag2 folders, .mcap, .db3 or '
                           'ROS 1 .bag files, or folders to search for them')
        before = len(found)
        for bag in _walk(root):
            found.append((bag, str(bag.parent.relative_to(root) / output_name(bag))))
        if len(found) == before:
            raise BagError(f'INPUT {root}: no bag found in this folder or below (looked for '
                           'rosbag2 folders with metadata.yaml and .mcap, .db3, .bag files)')
    check_names([(bag, os.path.normpath(name)) for bag, name in found])
    return [(bag, os.path.normpath(name)) for bag, name in found]


def check_names(found: Sequence[Tuple[Path, str]]) -> None:
    """BagError for output names that collide, nest or leave OUTPUT, before any work starts.

    ``x`` and ``x/y`` nest: the bag folder ``OUTPUT/x`` would hold another bag, and replacing
    one would delete the other. A name must be a plain relative path below OUTPUT.
    """
    by_name: Dict[str, Path] = {}
    for bag, name in found:
        parts = Path(name).parts
        if not parts or name in ('.', '') or Path(name).is_absolute() or '..' in parts or \
                any(part.startswith('.') for part in parts):
            raise BagError(f'INPUT {bag}: its output name {name!r} is not a plain, visible '
                           'folder name below OUTPUT (hidden names hold partial outputs); '
                           'give the bag by a path that ends in its name, or rename it')
        if name in by_name:
            raise BagError(f'{by_name[name]} and {bag} would both be written to OUTPUT/{name}; '
                           'rename one, or process them in separate runs')
        by_name[name] = bag
    for name, bag in by_name.items():
        parts = Path(name).parts
        for depth in range(1, len(parts)):
            outer = str(Path(*parts[:depth]))
            if outer in by_name:
                raise BagError(f'{bag} would be written to OUTPUT/{name}, inside the output of '
                               f'{by_name[outer]} (OUTPUT/{outer}); rename one, or process them '
                               'in separate runs')


def _walk(folder: Path, seen: Optional[Set[Tuple[int, int]]] = None) -> Iterator[Path]:
    """Bags below ``folder``; symbolic links to folders are followed, each folder once."""
    seen = set() if seen is None else seen
    info = folder.stat()
    if (info.st_dev, info.st_ino) in seen:  # a link back up the tree, or a second link
        return
    seen.add((info.st_dev, info.st_ino))
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith('.'):
            continue
        if is_bag(entry):
            yield entry
        elif entry.is_dir():
            yield from _walk(entry, seen)


def plan_jobs(inputs: Sequence[str], output: str) -> List[Job]:
    """Jobs for the bags of ``inputs``, written under the folder ``output``.

    BagError when OUTPUT is a file, its parent folder is missing, or it overlaps an input
    (the next search would find the outputs as inputs).
    """
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise BagError(f'OUTPUT {out}: with several input bags OUTPUT is a folder, and this is '
                       'a file; choose a folder name')
    if not out.resolve().parent.is_dir():
        raise BagError(f'OUTPUT {out}: folder {out.resolve().parent} does not exist; create '
                       'it first')
    resolved_out = out.resolve()
    for text in inputs:
        inp = Path(text).resolve()
        if resolved_out == inp or inp in resolved_out.parents or resolved_out in inp.parents:
            raise BagError(f'OUTPUT {out} overlaps INPUT {text}; write the new bags somewhere '
                           'else')
    bags = find_bags(inputs)
    return [Job(i, str(bag), str(out / name), name) for i, (bag, name) in enumerate(bags)]


# -- completion records ---------------------------------------------------------------------


def record_path(output: str) -> Path:
    """The completion record of an output bag: ``OUT/NAME`` -> ``OUT/NAME.metricgold.json``."""
    path = Path(output)
    return path.with_name(path.name + RECORD_SUFFIX)


def input_fingerprint(path: str) -> Dict[str, int]:
    """Size (bytes), file count and newest modification time (ns) of a bag's files: a changed
    bag (or one still being recorded) differs."""
    p = Path(path)
    files = [f for f in sorted(p.iterdir()) if f.is_file()] if p.is_dir() else [p]
    stats = [f.stat() for f in files]
    return {'bytes': sum(s.st_size for s in stats), 'files': len(stats),
            'mtime_ns': max((s.st_mtime_ns for s in stats), default=0)}


def model_identity(model: str, *, hashed_bytes: int = MODEL_HASHED_FILE_BYTES) -> str:
    """A hash naming the model folder's content: every file's path and size, the content of
    its small files (configs, metadata) and the modification time (ns) of the large ones."""
    import hashlib

    digest = hashlib.sha256()
    root = Path(model).resolve()
    files = [root] if root.is_file() else sorted(p for p in root.rglob('*') if p.is_file())
    for path in files:
        info = path.stat()
        digest.update(f'{path.relative_to(root) if path != root else path.name}\0'
                      f'{info.st_size}\0'.encode())
        if info.st_size <= hashed_bytes:
            digest.update(path.read_bytes())
        else:
            digest.update(str(info.st_mtime_ns).encode())
    return digest.hexdigest()


def run_identity(settings: Dict[str, Any]) -> Dict[str, Any]:
    """What makes two runs' outputs the same: the model's :func:`model_identity` and every
    setting except those that change no output (:data:`OUTPUT_NEUTRAL_SETTINGS`), as JSON."""
    kept = {k: v for k, v in sorted(settings.items())
            if k not in OUTPUT_NEUTRAL_SETTINGS and k != 'model'}
    return {'model': model_identity(settings['model']),
            'settings': json.loads(json.dumps(kept, default=str))}


def _load_record(job: Job) -> Optional[Dict[str, Any]]:
    """The record beside ``job``'s output bag (with its metadata.yaml), else None."""
    try:
        data = json.loads(record_path(job.output).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not (Path(job.output) / 'metadata.yaml').is_file():
        return None
    return data


def stale_reason(job: Job, identity: Optional[Dict[str, Any]] = None) -> Optional[str]:
    """Why an earlier run's output of ``job`` is out of date (None: up to date, or no record).

    An output with a record of ours is ours: a re-run redoes it when this says why.
    """
    data = _load_record(job)
    if data is None:
        return None
    if data.get('version') != RECORD_VERSION:
        return 'it was made by an older metricgold (no model or settings on record)'
    if not data.get('complete', False):
        return 'its input changed while it was read (still being recorded?)'
    try:
        if data.get('input_fingerprint') != input_fingerprint(job.input):
            return 'its input changed since'
    except OSError as err:
        return f'its input cannot be read ({err.strerror})'
    if identity is not None:
        if data.get('model') != identity['model']:
            return 'the model is another one, or was changed'
        if json.dumps(data.get('settings'), sort_keys=True) != \
                json.dumps(identity['settings'], sort_keys=True):
            changed = sorted(k for k in set(data.get('settings') or {}) | set(identity['settings'])
                             if (data.get('settings') or {}).get(k) != identity['settings'].get(k))
            return f"settings that change the output differ: {', '.join(changed)}"
    return None


def completed(job: Job, identity: Optional[Dict[str, Any]] = None) -> Optional[Dict[str, Any]]:
    """The summary of an earlier run that finished ``job`` on the same input, model and
    settings (``identity``, from :func:`run_identity`), else None."""
    data = _load_record(job)
    if data is None or stale_reason(job, identity) is not None:
        return None
    return data.get('summary')


def write_record(job: Job, summary: Dict[str, Any], identity: Optional[Dict[str, Any]] = None,
                 *, fingerprint: Optional[Dict[str, int]] = None, complete: bool = True) -> None:
    """Write the completion record atomically (after the bag is in place and on disk).

    ``fingerprint`` is the input's, taken before it was read; ``complete`` False keeps the
    output but marks it to be redone (the input changed while it was read).
    """
    data = {'version': RECORD_VERSION, 'complete': complete, 'input': job.input,
            'input_fingerprint': fingerprint or input_fingerprint(job.input),
            **(identity or {'model': None, 'settings': None}), 'summary': summary}
    write_atomic(record_path(job.output), (json.dumps(data, indent=1) + '\n').encode())


def remove_stale_partials(output: str) -> List[str]:
    """Delete ``.NAME.partial-*`` folders beside ``output`` left by a killed worker or run.

    Called by the worker that owns a job right before writing the job's output, and by the
    driver once every worker has ended (a worker killed mid-bag cannot clean up itself).
    """
    import shutil

    import glob

    path = Path(output)
    removed = []
    if path.parent.is_dir():  # the name escaped: a bag named run[1] must not match .run1.*
        for stale in path.parent.glob(f'.{glob.escape(path.name)}.partial-*'):
            shutil.rmtree(stale, ignore_errors=True)
            removed.append(stale.name)
    return removed


def estimate_frames(job: Job, image_topic: Optional[str], max_frames: Optional[int]) -> int:
    """Images of the bag's camera topic from its index (cheap; 0 when it cannot tell)."""
    from metricgold_ros.tools import bag_io

    try:
        with bag_io.open_bag(Path(job.input)) as reader:
            topic = bag_io.select_image_topic(reader.connections, image_topic)
            count = sum(c.msgcount for c in reader.connections if c.topic == topic)
    except MetricGoldError:
        return 0
    return min(count, max_frames) if max_frames else count


def to_dict(item: Any) -> Dict[str, Any]:
    """A Job or JobOutcome as plain data (what crosses to and from a worker process)."""
    return asdict(item)


def from_dict(data: Dict[str, Any]) -> JobOutcome:
    """The JobOutcome that :func:`to_dict` made plain."""
    values = dict(data)
    values['job'] = Job(**values['job'])
    return JobOutcome(**values)
