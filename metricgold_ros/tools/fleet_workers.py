"""Workers of many-bag runs: one bag on a worker, and local worker processes.

A worker loads the model once and converts bags one after another with the single-bag code
(:func:`metricgold_ros.tools.bag_convert.convert`), each bag's :class:`BagJob` made from the
run's template. :class:`LocalBackend` runs N such workers as
processes on this machine (``spawn``: no torch state is forked), each on its own duplex pipe,
so a worker that dies (killed, out of memory) is noticed at once, its bag handed to another
worker and a new worker started in its place. The Ray backend
(:mod:`metricgold_ros.tools.fleet_ray`) runs the same :func:`convert_job` in actors.
"""

import argparse
import multiprocessing
import os
import signal
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from metricgold_ros.errors import MetricGoldError
from metricgold_ros.tools import bag_convert
from metricgold_ros.tools.bag_convert import BagJob
from metricgold_ros.tools.fleet import Job, JobOutcome, input_fingerprint, \
    remove_stale_partials, to_dict, write_record
from metricgold_ros.tools.fleet_backend import DiedEvent, DoneEvent, Event, FramesEvent, \
    TotalEvent

LOCAL_FIELDS = ('input', 'output', 'ray', 'workers', 'summary_json', 'cpus_per_worker',
                'retries', 'quiet')


# -- one bag, on a worker -------------------------------------------------------------------


def job_settings(args: argparse.Namespace) -> Dict[str, Any]:
    """The parsed flags a worker needs (plain values, so they pickle across processes)."""
    return {k: v for k, v in vars(args).items()
            if not k.startswith('_') and k not in LOCAL_FIELDS}


def load_worker_pipeline(settings: Dict[str, Any], threads: int) -> Tuple[Any, float]:
    """``(pipeline, seconds)``: the model of ``settings`` on ``threads`` CPU threads."""
    import torch

    from metricgold_ros.tools.options import load_pipeline

    torch.set_num_threads(max(1, threads))
    start = time.perf_counter()
    pipeline = load_pipeline(argparse.Namespace(**settings))
    return pipeline, time.perf_counter() - start


def convert_job(job: Job, settings: Dict[str, Any], template: BagJob, pipeline: Any,
                on_total: Callable[[int], None], on_frames: Callable[[int], None]) -> JobOutcome:
    """Convert one bag with an already loaded pipeline; never raises for a bag's problem.

    The bag is converted as ``template`` says (``settings['record_identity']`` goes into its
    completion record). ``on_total(frames)`` is called once the bag's frame count is known,
    ``on_frames(n)`` as frames are done. KeyboardInterrupt propagates (the partial output is
    removed).
    """
    identity = settings.get('record_identity')
    bag_job = template.for_bag(job.input, job.output, quiet=True,
                               overwrite=template.overwrite or job.redo)
    started_at = time.time()
    try:
        Path(job.output).parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(job.output)
        before = input_fingerprint(job.input)  # a bag still being recorded changes under us
        result = bag_convert.convert(bag_job, pipeline=pipeline,
                                     progress=_Progress(on_total, on_frames))
        result.raise_failures()
        summary = result.summary()
        summary.update(started_at=round(started_at, 3), finished_at=round(time.time(), 3))
        if input_fingerprint(job.input) != before:
            write_record(job, summary, identity, fingerprint=before, complete=False)
            return JobOutcome(job, 'failed', summary=summary, error=(
                f'INPUT {job.input} changed while it was read (still being recorded?): its '
                'output is kept but not marked done; run again when the recording is '
                'finished and it is redone'))
        write_record(job, summary, identity, fingerprint=before)
    except MetricGoldError as err:
        return JobOutcome(job, 'failed', error=str(err))
    except Exception as err:  # noqa: B902 - a bug or a machine fault fails this bag only
        return JobOutcome(job, 'failed', error=f'{type(err).__name__}: {err}')
    return JobOutcome(job, 'ok', summary=summary)


class _Progress:
    """The bag tool's progress bar as seen by a worker: frame counts sent to the driver."""

    def __init__(self, on_total: Callable[[int], None],
                 on_frames: Callable[[int], None]) -> None:
        self._on_total = on_total
        self._on_frames = on_frames

    def start(self, total: Optional[int]) -> '_Progress':
        """The bag's frame count is known; returns the bar to update."""
        self._on_total(int(total or 0))
        return self

    def update(self, n: int = 1) -> None:
        self._on_frames(n)

    def write(self, text: str, file: Any = None) -> None:
        """Ignored: a worker's warnings reach the user in the bag's summary."""

    def close(self) -> None:
        """Nothing to close."""


# -- local worker processes -----------------------------------------------------------------


def gpu_count(device: str) -> int:
    """CUDA GPUs the workers may use, without importing torch in the driver.

    0 for ``--device cpu``; else CUDA_VISIBLE_DEVICES' entries when it is set, or the GPUs
    the NVIDIA driver lists (``/proc/driver/nvidia/gpus``).
    """
    if device == 'cpu':
        return 0
    visible = os.environ.get('CUDA_VISIBLE_DEVICES')
    if visible is not None:
        entries = [e for e in visible.split(',') if e.strip()]
        return 0 if not entries or entries[0].strip() == '-1' else len(entries)
    listed = Path('/proc/driver/nvidia/gpus')
    return len(list(listed.iterdir())) if listed.is_dir() else 0


def default_workers(jobs: int, gpus: int) -> int:
    """One worker per GPU, else one per 4 CPU cores; at most ``jobs``."""
    return max(1, min(jobs, gpus or max(1, _cores() // 4)))


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else \
        (os.cpu_count() or 1)


def threads_per_worker(workers: int) -> int:
    """Torch threads of each of ``workers`` processes: OMP_NUM_THREADS when set, else the
    cores shared out (threads beyond the free cores only wait on each other)."""
    if os.environ.get('OMP_NUM_THREADS', '').isdigit():
        return max(1, int(os.environ['OMP_NUM_THREADS']))
    return max(1, _cores() // workers)


@dataclass(frozen=True)
class _Ready:
    """A worker process loaded its model (sent once, before any bag)."""

    info: Dict[str, Any]


@dataclass(frozen=True)
class _Fatal:
    """A worker process could not load the model; it ends."""

    error: str


def _worker_main(conn: Connection, settings: Dict[str, Any], template: BagJob,
                 threads: int) -> None:
    """A worker process: load the model, then convert the bags the driver sends, one by one.

    It sends :class:`_Ready` or :class:`_Fatal`, then the events of each bag (plain
    dataclasses, pickled by the pipe).
    """
    try:
        try:
            pipeline, load_s = load_worker_pipeline(settings, threads)
        except MetricGoldError as err:
            conn.send(_Fatal(str(err)))
            return
        conn.send(_Ready({'pid': os.getpid(), 'model_load_s': round(load_s, 3),
                          'device': settings.get('device')}))
        while True:
            message = conn.recv()
            if message is None:
                return
            job = Job(**message)
            outcome = convert_job(
                job, settings, template, pipeline,
                on_total=lambda n: conn.send(TotalEvent(job.index, n)),
                on_frames=lambda n: conn.send(FramesEvent(job.index, n)))
            conn.send(DoneEvent(job.index, outcome))
    except (KeyboardInterrupt, EOFError, BrokenPipeError):
        return  # the driver stopped the run; the unfinished bag's partial output is gone


class LocalBackend:
    """N worker processes on this machine, each converting one bag at a time."""

    def __init__(self, settings: Dict[str, Any], template: BagJob, jobs: int, *,
                 workers: Optional[int] = None) -> None:
        gpus = gpu_count(str(settings.get('device', 'auto')))
        self.count = min(workers, jobs) if workers else default_workers(jobs, gpus)
        self.threads = threads_per_worker(self.count)
        self.gpus = gpus
        self.settings = settings
        self.template = template
        self._context = multiprocessing.get_context('spawn')
        self._procs: Dict[str, Any] = {}
        self._conns: Dict[str, Connection] = {}
        self._ready: Dict[str, Dict[str, Any]] = {}
        self._busy: Dict[str, int] = {}
        self._started = 0
        self._fatal: Optional[str] = None
        self._deaths: List[str] = []
        for _ in range(self.count):
            self._start_worker()

    def _start_worker(self) -> None:
        name = f'local-{self._started}'
        settings = dict(self.settings)
        if self.gpus and settings.get('device', 'auto') in ('auto', 'cuda'):
            settings['device'] = f'cuda:{self._started % self.gpus}'
        self._started += 1
        ours, theirs = self._context.Pipe(duplex=True)
        proc = self._context.Process(target=_worker_main,
                                     args=(theirs, settings, self.template, self.threads),
                                     name=f'metricgold-{name}', daemon=True)
        proc.start()
        theirs.close()
        self._procs[name], self._conns[name] = proc, ours

    def describe(self) -> Dict[str, Any]:
        return {'backend': 'local', 'workers': self.count, 'threads_per_worker': self.threads,
                'gpus': self.gpus}

    def idle(self) -> List[str]:
        return [w for w in self._ready if w not in self._busy and w in self._conns]

    def alive(self) -> bool:
        return bool(self._conns)

    def why_none(self) -> str:
        return self._fatal or (self._deaths[-1] if self._deaths else 'no worker started')

    def submit(self, worker: str, job: Job, attempt: int) -> None:
        self._busy[worker] = job.index
        self._conns[worker].send(to_dict(job))

    def poll(self, timeout: float) -> List[Event]:
        """Events from the workers; a worker that died yields a :class:`DiedEvent`."""
        events: List[Event] = []
        by_handle = {conn: name for name, conn in self._conns.items()}
        by_handle.update({self._procs[name].sentinel: name for name in self._conns})
        for handle in wait(list(by_handle), timeout):
            name = by_handle[handle]
            if name not in self._conns:
                continue
            conn = self._conns[name]
            try:
                while conn.poll():
                    events.extend(self._message(name, conn.recv()))
            except (EOFError, OSError):
                pass
            if not self._procs[name].is_alive():
                events.extend(self._lost(name))
        return events

    def _message(self, name: str, message: Any) -> List[Event]:
        if isinstance(message, _Ready):
            self._ready[name] = message.info
            return []
        if isinstance(message, _Fatal):
            self._fatal = f'the model could not be loaded: {message.error}'
            return []
        if isinstance(message, DoneEvent):
            self._busy.pop(name, None)
        return [message]

    def _lost(self, name: str) -> List[Event]:
        """A worker process ended: report its bag, start a new worker unless the model failed."""
        proc = self._procs.pop(name)
        proc.join(timeout=5)
        self._conns.pop(name).close()
        self._ready.pop(name, None)
        code = proc.exitcode
        reason = (f'worker {name} (pid {proc.pid}) was killed by signal {-code}'
                  if code is not None and code < 0 else
                  f'worker {name} (pid {proc.pid}) exited with code {code}')
        self._deaths.append(reason)
        events: List[Event] = []
        if name in self._busy:
            events.append(DiedEvent(self._busy.pop(name), reason))
        if self._fatal is None and len(self._deaths) <= 4 * self.count:
            self._start_worker()
        return events

    def stop(self) -> None:
        """End every worker: a polite request, then SIGTERM (its bag is aborted), then SIGKILL."""
        for name, conn in list(self._conns.items()):
            try:
                if name in self._busy:
                    os.kill(self._procs[name].pid, signal.SIGTERM)
                else:
                    conn.send(None)
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + 30
        for proc in self._procs.values():
            proc.join(timeout=max(0.1, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self._conns.values():
            conn.close()
        self._procs.clear()
        self._conns.clear()

