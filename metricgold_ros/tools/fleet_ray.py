"""Many-bag runs on a Ray cluster: one actor per GPU (or per N CPUs), a task per bag.

Each :class:`_BagWorker` actor loads the model once and converts the bags it is given with
:func:`~metricgold_ros.tools.fleet_workers.convert_job`, the code local workers run. A bag's
problem comes back as a failed outcome; an actor that dies (its process killed, its node
lost) makes its bag come back to the scheduler, which hands it to another actor, while Ray
restarts the actor (``max_restarts``). Frame counts reach the driver through a small tally
actor that the driver drains a few times a second.

Ray is optional (``pip install ray``). Input bags and OUTPUT must be visible at the same path
on every node (a shared file system). ``--ray`` (or ``--ray local``) starts a private
one-machine cluster that stays on loopback: no dashboard, no usage statistics, every Ray
process bound to 127.0.0.1. Joining a running cluster needs its address (or ``auto``), and
the joined address is printed: Ray does not authenticate a cluster to the drivers that join
it, so whoever runs that cluster can run code in this driver.
"""

import logging
import os
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

from metricgold_ros.errors import MetricGoldError
from metricgold_ros.tools.bag_convert import BagJob
from metricgold_ros.tools.fleet import Job, from_dict, to_dict
from metricgold_ros.tools.fleet_backend import DiedEvent, DoneEvent, Event, FramesEvent, \
    TotalEvent
from metricgold_ros.tools.fleet_workers import convert_job, load_worker_pipeline

FRAME_REPORT_PERIOD_S = 0.5  # an actor sends its frame count at most this often
ACTOR_RESTARTS = 3  # Ray restarts a dead actor this often before it is given up
STOP_WAIT_S = 10.0  # an interrupted run waits this long for its bags to abort


class RayError(MetricGoldError):
    """Ray is missing, or the cluster cannot be reached or has no room for a worker."""


def keep_local_environment() -> None:
    """Environment for a Ray started on this machine: loopback addresses, nothing reported.

    Ray picks the node address by routing towards a public address unless multi-node
    clusters are disabled, which makes it bind to 127.0.0.1; usage statistics are off.
    Ray reads these when it is imported: call this first.
    """
    os.environ.setdefault('RAY_USAGE_STATS_ENABLED', '0')
    os.environ.setdefault('RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER', '0')


def connect(address: str) -> bool:
    """Connect to (or with 'local', start) the cluster; True when this call started Ray.

    A driver that already called ``ray.init`` (a test, a notebook) keeps its connection.
    """
    if address == 'local':
        keep_local_environment()  # read when ray is imported
    try:
        import ray
    except ImportError:
        raise RayError('--ray needs Ray: pip install ray (or run without --ray for local '
                       'worker processes)') from None
    if ray.is_initialized():
        return False
    env = {'PYTHONPATH': os.environ['PYTHONPATH']} if os.environ.get('PYTHONPATH') else {}
    try:  # 'local' starts a new cluster even where RAY_ADDRESS names one
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING,
                 runtime_env={'env_vars': env} if env else None)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise RayError(f'--ray {address}: cannot connect to a Ray cluster ({err}); start one '
                       "with `ray start --head`, give its address, or use --ray local") from err
    joined = _cluster_address()
    if address == 'local':
        print(f'started a private Ray cluster on this machine ({joined}, loopback only)',
              file=sys.stderr)
    else:
        print(f'joined the Ray cluster at {joined} (asked for {address}); Ray has no '
              "authentication: that cluster's owner can run code in this process",
              file=sys.stderr)
    return True


def _cluster_address() -> str:
    """The GCS address of the cluster this driver is connected to ('unknown' if Ray hides it)."""
    import ray

    try:
        return str(ray.get_runtime_context().gcs_address)
    except AttributeError:
        return 'unknown'


class _Tally:
    """Frame counts of each bag's attempt, collected from the actors and drained by the
    driver: ``(attempt, event)`` pairs."""

    def __init__(self) -> None:
        self._events: List[Tuple[int, Event]] = []

    def add(self, attempt: int, event: Event) -> None:
        self._events.append((attempt, event))

    def drain(self) -> List[Tuple[int, Event]]:
        events, self._events = self._events, []
        return events


class _BagWorker:
    """A Ray actor holding one loaded model; converts one bag per call."""

    def __init__(self, settings: Dict[str, Any], template: BagJob, threads: int) -> None:
        self.settings = settings
        self.template = template
        self.error: Optional[str] = None
        self.pipeline = None
        self.load_s = 0.0
        try:
            self.pipeline, self.load_s = load_worker_pipeline(settings, threads)
        except MetricGoldError as err:
            self.error = str(err)

    def ready(self) -> Dict[str, Any]:
        """Where the actor runs and whether its model loaded."""
        import socket

        return {'pid': os.getpid(), 'host': socket.gethostname(), 'error': self.error,
                'model_load_s': round(self.load_s, 3)}

    def convert(self, job: Dict[str, Any], attempt: int, tally: Any) -> Dict[str, Any]:
        """Convert one bag; its outcome as plain data. Frame counts go to ``tally``."""
        from metricgold_ros.tools.fleet import JobOutcome

        job_ = Job(**job)
        if self.error is not None:
            return to_dict(JobOutcome(job_, 'failed', error=f'model: {self.error}'))
        import ray

        pending = [0, time.monotonic()]
        context = ray.get_runtime_context()

        def on_frames(n: int) -> None:
            if context.is_canceled():  # the driver was interrupted: abort, drop the partial
                raise KeyboardInterrupt('cancelled by the driver')
            pending[0] += n
            if time.monotonic() - pending[1] >= FRAME_REPORT_PERIOD_S:
                tally.add.remote(attempt, FramesEvent(job_.index, pending[0]))
                pending[0], pending[1] = 0, time.monotonic()

        outcome = convert_job(job_, self.settings, self.template, self.pipeline,
                              lambda n: tally.add.remote(attempt, TotalEvent(job_.index, n)),
                              on_frames)
        if pending[0]:
            tally.add.remote(attempt, FramesEvent(job_.index, pending[0]))
        return to_dict(outcome)


class RayBackend:
    """The scheduler's view of a Ray cluster: actors, their running bag, their deaths."""

    def __init__(self, address: str, settings: Dict[str, Any], template: BagJob, jobs: int, *,
                 workers: Optional[int] = None, cpus_per_worker: int = 1) -> None:
        self._actors: Dict[str, Any] = {}
        self._busy: Dict[str, Tuple[int, int, Any]] = {}  # actor -> (bag, attempt, ref)
        self._recovering: Dict[str, Any] = {}  # restarting actor -> its ready() call
        self._deaths: Dict[str, int] = {}
        self._errors: List[str] = []
        self._tally: Any = None
        self.info: Dict[str, Any] = {'backend': 'ray', 'address': address}
        self.started = connect(address)
        try:
            self._start(settings, template, jobs, workers, cpus_per_worker)
        except BaseException:
            self.stop()
            raise

    def _start(self, settings: Dict[str, Any], template: BagJob, jobs: int,
               workers: Optional[int], cpus_per_worker: int) -> None:
        """Size the pool from the cluster's resources, start the actors, wait for models."""
        import ray

        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get('GPU', 0)), int(resources.get('CPU', 0))
        if gpus:
            count, options = gpus, {'num_gpus': 1, 'num_cpus': 1}
            threads = max(1, cpus // gpus)
        else:
            count, options = cpus // cpus_per_worker, {'num_cpus': cpus_per_worker}
            threads = cpus_per_worker
        count = min(count, jobs, workers or count)
        if count < 1:
            raise RayError(f'the Ray cluster has {cpus} CPUs and {gpus} GPUs: no room for one '
                           f'worker of {cpus_per_worker} CPUs (lower --cpus-per-worker)')
        self.info.update(actors=count, gpus_per_actor=1 if gpus else 0,
                         cpus_per_actor=options['num_cpus'], cluster_cpus=cpus,
                         cluster_gpus=gpus, nodes=len(ray.nodes()))
        worker_class = ray.remote(_BagWorker).options(
            max_restarts=ACTOR_RESTARTS, max_task_retries=0, **options)
        self._tally = ray.remote(_Tally).options(num_cpus=0).remote()
        self._actors = {f'ray-{i}': worker_class.remote(settings, template, threads)
                        for i in range(count)}
        self._deaths = {name: 0 for name in self._actors}
        self._check_ready()

    def _check_ready(self) -> None:
        """Wait for the actors' models; drop those whose model failed to load."""
        import ray

        names = list(self._actors)
        try:
            states = ray.get([self._actors[n].ready.remote() for n in names])
        except ray.exceptions.RayError as err:
            raise RayError(f'the Ray workers did not start: {err}') from err
        for name, state in zip(names, states):
            if state['error']:
                self._errors.append(f'the model could not be loaded: {state["error"]}')
                del self._actors[name]
        if not self._actors:
            raise RayError(self._errors[0])
        self.info['actor_hosts'] = sorted({s['host'] for s in states})
        self.info['model_load_s'] = [s['model_load_s'] for s in states]

    def describe(self) -> Dict[str, Any]:
        return dict(self.info, actor_deaths=self._deaths)

    def idle(self) -> List[str]:
        return [name for name in self._actors
                if name not in self._busy and name not in self._recovering]

    def alive(self) -> bool:
        return bool(self._actors)

    def why_none(self) -> str:
        return self._errors[-1] if self._errors else 'every Ray actor died'

    def submit(self, worker: str, job: Job, attempt: int) -> None:
        ref = self._actors[worker].convert.remote(to_dict(job), attempt, self._tally)
        self._busy[worker] = (job.index, attempt, ref)

    def poll(self, timeout: float) -> List[Event]:
        """Frame counts, finished bags, and a :class:`DiedEvent` for a lost actor's bag."""
        import ray

        refs = {ref: name for name, (_, _, ref) in self._busy.items()}
        pings = {ref: name for name, ref in self._recovering.items()}
        waiting = list(refs) + list(pings)
        ready, _ = ray.wait(waiting, num_returns=len(waiting), timeout=timeout) if waiting \
            else ([], [])
        if not waiting:
            time.sleep(timeout)
        for ref in ready:
            if ref in pings:
                self._recovered(pings[ref], ref)
        current = {index: attempt for index, attempt, _ in self._busy.values()}
        events: List[Event] = [event for attempt, event in ray.get(self._tally.drain.remote())
                               if current.get(event.index) == attempt]
        for ref in [r for r in ready if r in refs]:
            name = refs[ref]
            index, _, _ = self._busy.pop(name)
            try:
                events.append(DoneEvent(index, from_dict(ray.get(ref))))
            except ray.exceptions.RayActorError as err:
                events.append(DiedEvent(index, self._lost(name, err)))
            except ray.exceptions.RayTaskError as err:  # a bug in convert_job itself
                events.append(DiedEvent(index, f'{name}: {err}'))
        return events

    def _lost(self, name: str, err: Exception) -> str:
        """An actor died under a bag: no new bag for it until Ray has restarted it."""
        self._deaths[name] += 1
        reason = f'Ray actor {name} died ({type(err).__name__})'
        self._errors.append(reason)
        self._recovering[name] = self._actors[name].ready.remote()
        return reason

    def _recovered(self, name: str, ref: Any) -> None:
        """A restarting actor answered: back to work, ask again later, or given up."""
        import ray

        try:
            state = ray.get(ref)
        except ray.exceptions.ActorUnavailableError:  # still restarting
            time.sleep(0.05)
            self._recovering[name] = self._actors[name].ready.remote()
            return
        except ray.exceptions.RayActorError as err:  # out of restarts: gone for good
            self._errors.append(f'Ray actor {name} is gone ({type(err).__name__})')
            del self._recovering[name], self._actors[name]
            return
        del self._recovering[name]
        if state['error']:
            self._errors.append(f'the model could not be loaded: {state["error"]}')
            del self._actors[name]

    def stop(self) -> None:
        """Release the actors; shut Ray down when this run started it."""
        import ray

        refs = [ref for _, _, ref in self._busy.values()]
        for ref in refs:  # interrupted: the bags abort at their next frame (removing partials)
            ray.cancel(ref)
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=STOP_WAIT_S)
        for actor in self._actors.values():
            ray.kill(actor, no_restart=True)
        if self._tally is not None:
            ray.kill(self._tally, no_restart=True)
        self._actors, self._busy, self._recovering, self._tally = {}, {}, {}, None
        if self.started:
            ray.shutdown()
            self.started = False
