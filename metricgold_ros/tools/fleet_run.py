"""``metricgold bag IN... OUT``: the many-bag command, its flags and its scheduler.

Plans the jobs (:mod:`metricgold_ros.tools.fleet`), skips what an earlier run finished, starts a
backend (local worker processes, :mod:`metricgold_ros.tools.fleet_workers`, or a Ray cluster,
:mod:`metricgold_ros.tools.fleet_ray`) and hands it bags until each is done or failed, showing
progress and the summary (:mod:`metricgold_ros.tools.fleet_summary`). Times are seconds.
"""

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

from metricgold_ros.atomic import describe
from metricgold_ros.tools.bag_convert import BagJob
from metricgold_ros.tools.bag_output import is_bag
from metricgold_ros.tools.fleet import (Job, JobOutcome, completed, estimate_frames, plan_jobs,
                                        record_path, remove_stale_partials, run_identity,
                                        stale_reason)
from metricgold_ros.tools.fleet_backend import (Backend, DiedEvent, DoneEvent, FramesEvent,
                                                TotalEvent)
from metricgold_ros.tools.fleet_summary import Board, report, write_summary
from metricgold_ros.tools.fleet_workers import LocalBackend, job_settings
from metricgold_ros.tools.options import non_negative_int, positive_int
from metricgold_ros.tools.signals import sigterm_as_interrupt

DEFAULT_RETRIES = 1  # a bag whose worker died runs once more, on another worker


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of many-bag runs (``metricgold bag IN... OUT``)."""
    group = parser.add_argument_group('many bags (several INPUTs, or folders to search)')
    group.add_argument('--workers', type=positive_int, metavar='N',
                       help='worker processes, each with the model loaded once (default: one '
                            'per GPU, else one per 4 CPU cores); with --ray, at most N actors')
    group.add_argument('--ray', nargs='?', const='local', metavar='ADDRESS',
                       help="run on a Ray cluster: without ADDRESS (or 'local') a private one "
                            'started on this machine, loopback only; to join a running one, '
                            "give its ADDRESS (host:port, or 'auto' for RAY_ADDRESS or the one "
                            'running here). Ray does not authenticate a cluster: whoever runs '
                            'it runs code in this process. One actor per GPU, else per '
                            '--cpus-per-worker CPUs; bags and OUTPUT must be at the same path '
                            'on every node')
    group.add_argument('--cpus-per-worker', type=positive_int, default=1, metavar='N',
                       help='CPUs of one Ray actor without GPUs (default 1)')
    group.add_argument('--retries', type=non_negative_int, default=DEFAULT_RETRIES,
                       metavar='N',
                       help='runs more of a bag whose worker died (default %(default)s)')
    group.add_argument('--summary-json', metavar='PATH',
                       help='write per-bag summaries (frames, seconds, frames/s, errors) and '
                            'the total as JSON')


def run(args: argparse.Namespace, inputs: Sequence[str], template: BagJob) -> int:
    """Convert every bag of ``inputs`` into the folder ``args.output``, each as ``template``
    says; the exit code.

    0 when every bag is done (now or before), 1 when any failed (listed on stderr), 130 on
    Ctrl-C (finished bags stay, unfinished ones leave nothing).
    """
    from metricgold_ros.model_paths import resolve_model_path

    jobs = plan_jobs(inputs, args.output)
    settings = job_settings(args)
    # Fail early, once; a hub id is fetched here with the variant and pickles the workers load.
    settings['model'] = str(resolve_model_path(
        args.model, '--model', variant=getattr(args, 'variant', None) or None,
        allow_pickle=bool(getattr(args, 'allow_pickle', False))))
    identity = run_identity(settings)
    settings['record_identity'] = identity
    pending: List[Job] = []
    settled: List[JobOutcome] = []
    for job in jobs:
        state, detail = _earlier_run(job, identity, args.overwrite)
        if state == 'skipped':
            settled.append(JobOutcome(job, 'skipped', summary=detail))
        elif state == 'failed':
            settled.append(JobOutcome(job, 'failed', error=detail))
        else:
            pending.append(replace(job, redo=state == 'redo', frames_estimate=estimate_frames(
                job, args.image_topic, args.max_frames)))
    board = Board(sorted(pending + [o.job for o in settled], key=lambda job: job.index),
                  args.quiet)
    for outcome in settled:
        board.finish(outcome)
    workers: Dict[str, Any] = {}
    interrupted = False
    try:
        with sigterm_as_interrupt():
            if pending:
                backend = _backend(args, settings, template, len(pending))
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


def _earlier_run(job: Job, identity: Dict[str, Any], overwrite: bool) -> Tuple[str, Any]:
    """What to do with ``job`` given what an earlier run left: ``('skipped', summary)``,
    ``('failed', error)``, ``('redo', reason)`` (an out-of-date output of ours) or
    ``('run', None)``."""
    output = Path(job.output)
    present = output.exists() or output.is_symlink()
    if overwrite:
        if present and not is_bag(output):
            return 'failed', (f'OUTPUT {job.output} is {describe(output)}, not a bag: '
                              '--overwrite replaces only bags; move it away yourself')
        return 'run', None
    earlier = completed(job, identity)
    if earlier is not None:
        return 'skipped', earlier
    if not present:
        return 'run', None
    reason = stale_reason(job, identity)
    if reason is not None:
        return 'redo', reason
    return 'failed', (f'OUTPUT {job.output} exists without a completion record '
                      f'({record_path(job.output).name}; written by another tool or an '
                      'interrupted run?): pass --overwrite to replace it')


def _backend(args: argparse.Namespace, settings: Dict[str, Any], template: BagJob,
             jobs: int) -> Backend:
    if args.ray is not None:
        from metricgold_ros.tools import fleet_ray  # Ray is optional: imported when asked for

        return fleet_ray.RayBackend(args.ray, settings, template, jobs, workers=args.workers,
                                    cpus_per_worker=args.cpus_per_worker)
    return LocalBackend(settings, template, jobs, workers=args.workers)


def schedule(jobs: Sequence[Job], backend: Backend, board: Board, retries: int) -> None:
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
                board.finish(JobOutcome(job, 'failed', error=f'no worker left: {reason}',
                                     attempts=attempts.get(job.index, 0)))
            break
        for event in backend.poll(0.25):
            index = event.index
            if index not in running:
                continue  # news from an attempt that was given up
            if isinstance(event, TotalEvent):
                board.total(index, event.frames)
            elif isinstance(event, FramesEvent):
                board.frames(index, event.frames)
            elif isinstance(event, DoneEvent):
                outcome = event.outcome
                outcome.attempts, outcome.worker = attempts[index], running.pop(index)
                board.finish(outcome)
            elif isinstance(event, DiedEvent):
                worker = running.pop(index)
                if attempts[index] <= retries:
                    board.restart(index)
                    queue.appendleft(by_index[index])
                else:
                    board.finish(JobOutcome(by_index[index], 'failed',
                                            attempts=attempts[index], worker=worker, error=(
                                                f'its worker died on each of {attempts[index]} '
                                                f'attempts (last: {event.reason})')))
