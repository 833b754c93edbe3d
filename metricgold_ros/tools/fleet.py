"""Many bags at once for ``metricgold bag``: discovery, completion records, scheduling.

``metricgold bag IN... OUT`` with several inputs, or a folder to search, writes one output bag
per input bag under ``OUT`` at the bag's path relative to the folder it was found in (a
``.bag``/``.mcap``/``.db3`` file ``x.bag`` becomes the rosbag2 folder ``x``). Each bag is
converted by the single-bag code (``fleet_workers.convert_job`` calls ``bag.convert``), on
local worker processes (:mod:`metricgold_ros.tools.fleet_workers`) or on a Ray cluster
(:mod:`metricgold_ros.tools.fleet_ray`), each worker loading the model once. Progress, the
per-bag lines and the summary are :mod:`metricgold_ros.tools.fleet_summary`'s.

A finished bag gets a completion record beside it, ``NAME.metricgold.json`` (its summary and
the input's size and modification time), written atomically after the bag was renamed into
place. A re-run skips a bag whose output folder, record and unchanged input are all there; an
output without a record (another tool's, or a crash in the moment between the two renames)
is refused unless ``--overwrite``. Times are seconds unless a name says ``_ns``.
"""

import argparse
import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from metricgold_ros.atomic import write_atomic
from metricgold_ros.errors import BagError, MetricGoldError
from metricgold_ros.tools.options import non_negative_int, positive_int

BAG_SUFFIXES = ('.bag', '.mcap', '.db3')
RECORD_SUFFIX = '.metricgold.json'
RECORD_VERSION = 1
DEFAULT_RETRIES = 1  # a bag whose worker died runs once more, on another worker


@dataclass(frozen=True)
class Job:
    """One input bag and where its output goes (``output`` = OUT / ``name``)."""

    index: int
    input: str
    output: str
    name: str
    frames_estimate: int = 0


@dataclass
class Outcome:
    """What became of one job: 'ok', 'skipped' (complete before) or 'failed' with ``error``."""

    job: Job
    status: str
    error: Optional[str] = None
    summary: Dict[str, Any] = field(default_factory=dict)
    attempts: int = 0
    worker: Optional[str] = None


# -- discovery ------------------------------------------------------------------------------


def is_bag(path: Path) -> bool:
    """A rosbag2 folder (with metadata.yaml), or a .bag/.mcap/.db3 file."""
    if path.is_dir():
        return (path / 'metadata.yaml').is_file()
    return path.is_file() and path.suffix in BAG_SUFFIXES


def wants_fleet(inputs: Sequence[str]) -> bool:
    """True unless there is one input that is (or would be) a single bag: ``bag IN OUT``."""
    if len(inputs) != 1:
        return True
    path = Path(inputs[0])
    return path.is_dir() and not (path / 'metadata.yaml').exists()


def output_name(path: Path) -> str:
    """The output folder name of a bag: a file loses its bag suffix (x.bag -> x)."""
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
    by_name: Dict[str, Path] = {}
    for bag, name in found:
        name = os.path.normpath(name)
        if name in by_name:
            raise BagError(f'{by_name[name]} and {bag} would both be written to OUTPUT/{name}; '
                           'rename one, or process them in separate runs')
        by_name[name] = bag
    return [(bag, os.path.normpath(name)) for bag, name in found]


def _walk(folder: Path) -> Iterator[Path]:
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith('.'):
            continue
        if is_bag(entry):
            yield entry
        elif entry.is_dir() and not entry.is_symlink():
            yield from _walk(entry)


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
    """Size (bytes) and newest modification time (ns) of a bag's files: a changed bag differs."""
    p = Path(path)
    files = [f for f in sorted(p.iterdir()) if f.is_file()] if p.is_dir() else [p]
    stats = [f.stat() for f in files]
    return {'bytes': sum(s.st_size for s in stats),
            'mtime_ns': max((s.st_mtime_ns for s in stats), default=0)}


def completed(job: Job) -> Optional[Dict[str, Any]]:
    """The summary of an earlier run that finished ``job`` on the same input, else None."""
    record = record_path(job.output)
    try:
        data = json.loads(record.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get('version') != RECORD_VERSION:
        return None
    if not (Path(job.output) / 'metadata.yaml').is_file():
        return None
    try:
        same = data.get('input_fingerprint') == input_fingerprint(job.input)
    except OSError:
        return None
    return data.get('summary') if same else None


def write_record(job: Job, summary: Dict[str, Any]) -> None:
    """Write the completion record atomically."""
    data = {'version': RECORD_VERSION, 'input': job.input,
            'input_fingerprint': input_fingerprint(job.input), 'summary': summary}
    write_atomic(record_path(job.output), (json.dumps(data, indent=1) + '\n').encode())


def remove_stale_partials(output: str) -> List[str]:
    """Delete ``.NAME.partial-*`` folders beside ``output`` left by a killed worker or run.

    Called by the worker that owns a job right before writing the job's output, and by the
    driver once every worker has ended (a worker killed mid-bag cannot clean up itself).
    """
    import shutil

    path = Path(output)
    removed = []
    if path.parent.is_dir():
        for stale in path.parent.glob(f'.{path.name}.partial-*'):
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
    """A Job or Outcome as plain data (what crosses to and from a worker process)."""
    return asdict(item)


def from_dict(data: Dict[str, Any]) -> Outcome:
    """The Outcome that :func:`to_dict` made plain."""
    values = dict(data)
    values['job'] = Job(**values['job'])
    return Outcome(**values)


# -- the command ----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of many-bag runs (``metricgold bag IN... OUT``)."""
    group = parser.add_argument_group('many bags (several INPUTs, or folders to search)')
    group.add_argument('--workers', type=positive_int, metavar='N',
                       help='worker processes, each with the model loaded once (default: one '
                            'per GPU, else one per 4 CPU cores); with --ray, at most N actors')
    group.add_argument('--ray', nargs='?', const='auto', metavar='ADDRESS',
                       help="run on a Ray cluster: ADDRESS of its head, 'auto' (RAY_ADDRESS or "
                            "the one running here; the default without ADDRESS) or 'local' "
                            '(start one on this machine, loopback only). One actor per GPU, '
                            'else per --cpus-per-worker CPUs; bags and OUTPUT must be at the '
                            'same path on every node')
    group.add_argument('--cpus-per-worker', type=positive_int, default=1, metavar='N',
                       help='CPUs of one Ray actor without GPUs (default 1)')
    group.add_argument('--retries', type=non_negative_int, default=DEFAULT_RETRIES,
                       metavar='N',
                       help='runs more of a bag whose worker died (default %(default)s)')
    group.add_argument('--summary-json', metavar='PATH',
                       help='write per-bag summaries (frames, seconds, frames/s, errors) and '
                            'the total as JSON')


def run(args: argparse.Namespace, inputs: Sequence[str]) -> int:
    """Convert every bag of ``inputs`` into the folder ``args.output``; the exit code.

    0 when every bag is done (now or before), 1 when any failed (listed on stderr), 130 on
    Ctrl-C (finished bags stay, unfinished ones leave nothing).
    """
    from metricgold_ros.tools.bag import _sigterm_as_interrupt
    from metricgold_ros.tools.fleet_summary import Board, report, write_summary
    from metricgold_ros.tools.fleet_workers import job_settings
    from metricgold_ros.model_paths import resolve_model_path

    jobs = plan_jobs(inputs, args.output)
    settings = job_settings(args)
    settings['model'] = str(resolve_model_path(args.model, '--model'))  # fail early, once
    pending: List[Job] = []
    settled: List[Outcome] = []
    for job in jobs:
        earlier = None if args.overwrite else completed(job)
        if earlier is not None:
            settled.append(Outcome(job, 'skipped', summary=earlier))
        elif not args.overwrite and Path(job.output).exists():
            settled.append(Outcome(job, 'failed', error=(
                f'OUTPUT {job.output} exists without a completion record '
                f'({record_path(job.output).name}; written by another tool or an interrupted '
                'run?): pass --overwrite to replace it')))
        else:
            pending.append(replace(job, frames_estimate=estimate_frames(
                job, args.image_topic, args.max_frames)))
    board = Board(sorted(pending + [o.job for o in settled], key=lambda job: job.index),
                  args.quiet)
    for outcome in settled:
        board.finish(outcome)
    workers: Dict[str, Any] = {}
    interrupted = False
    try:
        with _sigterm_as_interrupt():
            if pending:
                backend = _backend(args, settings, len(pending))
                try:
                    schedule(pending, backend, board, args.retries)
                finally:
                    workers = backend.describe()
                    backend.stop()
                    for job in pending:  # every worker has ended: nothing still writes these
                        remove_stale_partials(job.output)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        board.close()
    data = board.summary(workers)
    if args.summary_json:
        write_summary(args.summary_json, data)
    return report(args, data, interrupted)


def _backend(args: argparse.Namespace, settings: Dict[str, Any], jobs: int) -> Any:
    if args.ray is not None:
        from metricgold_ros.tools import fleet_ray

        return fleet_ray.RayBackend(args.ray, settings, jobs, workers=args.workers,
                                    cpus_per_worker=args.cpus_per_worker)
    from metricgold_ros.tools import fleet_workers

    return fleet_workers.LocalBackend(settings, jobs, workers=args.workers)


def schedule(jobs: Sequence[Job], backend: Any, board: Any, retries: int) -> None:
    """Hand bags to idle workers until each is done, failed, or its worker died too often."""
    from collections import deque

    queue = deque(sorted(jobs, key=lambda job: -job.frames_estimate))  # longest first
    by_index = {job.index: job for job in jobs}
    attempts: Dict[int, int] = {}
    running: Dict[int, str] = {}
    while queue or running:
        for worker in backend.idle():
            if not queue:
                break
            job = queue.popleft()
            attempts[job.index] = attempts.get(job.index, 0) + 1
            running[job.index] = worker
            backend.submit(worker, job, attempts[job.index])
        if queue and not running and not backend.alive():
            reason = backend.why_none()
            while queue:
                job = queue.popleft()
                board.finish(Outcome(job, 'failed', error=f'no worker left: {reason}',
                                     attempts=attempts.get(job.index, 0)))
            break
        for event in backend.poll(0.25):
            kind, index = event[0], event[1]
            if index not in running:
                continue  # news from an attempt that was given up
            if kind == 'total':
                board.total(index, event[2])
            elif kind == 'frames':
                board.frames(index, event[2])
            elif kind == 'done':
                outcome = event[2]
                outcome.attempts, outcome.worker = attempts[index], running.pop(index)
                board.finish(outcome)
            elif kind == 'died':
                worker = running.pop(index)
                if attempts[index] <= retries:
                    board.restart(index)
                    queue.appendleft(by_index[index])
                else:
                    board.finish(Outcome(by_index[index], 'failed', attempts=attempts[index],
                                         worker=worker, error=(
                                             f'its worker died on each of {attempts[index]} '
                                             f'attempts (last: {event[2]})')))
