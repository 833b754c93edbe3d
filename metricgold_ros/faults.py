"""Inference faults, handled the same in the node, ``metricgold bag`` and ``infer``.

:class:`GuardedProcessor` runs :class:`~metricgold_ros.depth_frame.DepthFrameProcessor` so that
an inference that raises (CUDA out of memory, a CPU allocator failure, a driver error) never
ends the program: memory is freed, an out-of-memory frame is retried once at
``fallback_processing_resolution`` when that is below the resolution in use, and otherwise the
frame is skipped. The caller gets a :class:`FrameOutcome` to publish or write, and to report
(the node rate-limited in its log, the tools as ``ERROR:`` lines and exit code 1).

DEBUG ONLY: :class:`FaultInjector` raises real faults before pipeline stages
(``METRICGOLD_FAULT=STAGE:KIND[:every=N][:times=N]``), for tests and fault drills.
"""

import dataclasses
import gc
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from metricgold_ros.camera import Calibration
from metricgold_ros.constants import PIPELINE_STAGES
from metricgold_ros.errors import InputError, MetricGoldError

if TYPE_CHECKING:
    from metricgold_ros.depth_frame import DepthFrameProcessor, FrameOptions, FrameResult

FAULT_ENV = 'METRICGOLD_FAULT'  # debug only: see FaultInjector

class FaultInjector:
    """DEBUG ONLY: real faults before pipeline stages, for tests and fault drills.

    Built from the ``METRICGOLD_FAULT`` environment variable and installed through the
    pipeline's ``stage_hook``. A spec is ``STAGE:KIND[:every=N][:times=N]``, several joined by
    ``,``; e.g. ``vae_decode:oom:every=3`` raises ``torch.OutOfMemoryError`` (what CUDA raises)
    before every third VAE decode. STAGE is one of :data:`PIPELINE_STAGES`; KIND is ``oom``,
    ``error`` (a RuntimeError) or ``sleep=S`` (the stage takes S more seconds). ``every=N``
    counts the calls of that stage (default 1: every call), ``times=N`` stops after N faults.
    """

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self._rules: List[Dict[str, Any]] = [self._parse(part.strip())
                                             for part in spec.split(',') if part.strip()]
        if not self._rules:
            raise InputError(f'{FAULT_ENV}={spec!r} is empty; unset it, or see '
                             'metricgold_ros.faults.FaultInjector for the syntax')
        self._calls: Dict[str, int] = {}
        self._lock = threading.Lock()

    def _parse(self, part: str) -> Dict[str, Any]:
        fields = part.split(':')
        usage = (f'{FAULT_ENV}: {part!r} is not STAGE:KIND[:every=N][:times=N] with STAGE one '
                 f'of {", ".join(PIPELINE_STAGES)} and KIND oom, error or sleep=SECONDS')
        if len(fields) < 2 or fields[0] not in PIPELINE_STAGES:
            raise InputError(usage)
        rule: Dict[str, Any] = {'stage': fields[0], 'kind': fields[1], 'every': 1,
                                'times': None, 'sleep_s': 0.0, 'done': 0}
        try:
            if fields[1].startswith('sleep='):
                rule['kind'], rule['sleep_s'] = 'sleep', float(fields[1][len('sleep='):])
                if not 0.0 <= rule['sleep_s'] <= 3600.0:
                    raise ValueError(fields[1])
            elif fields[1] not in ('oom', 'error'):
                raise ValueError(fields[1])
            for option in fields[2:]:
                key, value = option.split('=', 1)
                if key not in ('every', 'times') or int(value) < 1:
                    raise ValueError(option)
                rule[key] = int(value)
        except ValueError as err:
            raise InputError(usage) from err
        return rule

    def __call__(self, stage: str) -> None:
        """The stage hook: count the call, and fail (or stall) when a rule says so."""
        with self._lock:
            calls = self._calls[stage] = self._calls.get(stage, 0) + 1
            due = [rule for rule in self._rules if rule['stage'] == stage
                   and calls % rule['every'] == 0
                   and (rule['times'] is None or rule['done'] < rule['times'])]
            for rule in due:
                rule['done'] += 1
        for rule in due:
            if rule['kind'] == 'sleep':
                time.sleep(rule['sleep_s'])
                continue
            text = (f'injected by {FAULT_ENV}={self.spec!r} before {stage} (call {calls})')
            if rule['kind'] == 'oom':
                import torch

                raise torch.OutOfMemoryError(f'CUDA out of memory (simulated): {text}')
            raise RuntimeError(f'simulated failure: {text}')


def is_out_of_memory(err: BaseException) -> bool:
    """torch.OutOfMemoryError (CUDA), a CPU allocator failure or a MemoryError."""
    text = str(err).lower()
    return (isinstance(err, MemoryError) or type(err).__name__ == 'OutOfMemoryError'
            or 'out of memory' in text or "can't allocate memory" in text)


@dataclass(frozen=True)
class Failure:
    """What an inference that raised left behind (the exception itself is not kept)."""

    stage: str
    kind: str  # the exception's class name
    text: str  # its message's first line
    out_of_memory: bool

    @classmethod
    def of(cls, err: BaseException, stage: str) -> 'Failure':
        """The failure ``err`` raised in ``stage``."""
        return cls(stage, type(err).__name__, (str(err).splitlines() or [''])[0][:300],
                   is_out_of_memory(err))

    def describe(self) -> str:
        """``'OutOfMemoryError in unet: CUDA out of memory ...'``."""
        return f'{self.kind} in {self.stage}: {self.text}'


@dataclass(frozen=True)
class FrameOutcome:
    """One frame through :class:`GuardedProcessor`.

    ``result`` is None when the frame is skipped; ``failure`` is the first failure (None when
    the first attempt succeeded) and ``action`` what was done about it, for the report.
    """

    result: Optional['FrameResult']
    failure: Optional[Failure] = None
    action: str = ''
    retried: bool = False

    def report(self) -> str:
        """The one-line report of a failure: what failed, where, and what was done."""
        return f'inference failed with {self.failure.describe()}; {self.action}'


class GuardedProcessor:
    """A frame processor whose inference faults are caught, freed and retried (see module)."""

    def __init__(self, processor: 'DepthFrameProcessor', fallback_resolution: int = 0,
                 stopping: Callable[[], bool] = lambda: False) -> None:
        """``stopping`` says the program is shutting down: faults then propagate quietly."""
        self.processor = processor
        self.fallback_resolution = fallback_resolution
        self.stopping = stopping

    def process(self, rgb: np.ndarray, calibration: Optional[Calibration],
                options: 'FrameOptions') -> FrameOutcome:
        """Run one frame; bad input (MetricGoldError) still raises, anything else is caught."""
        result, failure = self._attempt(rgb, calibration, options)
        if failure is None:
            return FrameOutcome(result)
        fallback = self.fallback_resolution
        resolution = self.resolution(options, rgb.shape[1], rgb.shape[0])
        if failure.out_of_memory and 0 < fallback < resolution:
            retry = dataclasses.replace(options, processing_resolution=fallback,
                                        warm_start=False)
            result, second = self._attempt(rgb, calibration, retry)
            if second is None:
                return FrameOutcome(result, failure, f'retried once at fallback_processing_'
                               f'resolution={fallback} px instead of {resolution} px: '
                               'published', retried=True)
            return FrameOutcome(None, failure, f'the retry at {fallback} px failed too '
                           f'({second.describe()}): frame skipped')
        if not failure.out_of_memory:
            action = 'frame skipped (processing goes on with the next frame)'
        elif fallback == 0:
            action = (f'frame skipped; set fallback_processing_resolution (e.g. '
                      f'{max(8, resolution // 2)}) to retry such frames at a lower resolution, '
                      'or lower processing_resolution')
        else:
            action = (f'frame skipped: fallback_processing_resolution={fallback} is not below '
                      f'the {resolution} px in use')
        return FrameOutcome(None, failure, action)

    def resolution(self, options: 'FrameOptions', width: int, height: int) -> int:
        """The longer side (px) the model works at for ``options`` and this image."""
        resolution = options.processing_resolution
        if resolution is None:  # the checkpoint's default (a Marigold folder may have none)
            resolution = self.processor.pipeline.metadata.default_processing_resolution
        return int(resolution or max(width, height))

    def _attempt(self, rgb: np.ndarray, calibration: Optional[Calibration],
                 options: 'FrameOptions'
                 ) -> Tuple[Optional['FrameResult'], Optional[Failure]]:
        """Run the model once: ``(result, None)``, or ``(None, failure)`` after freeing memory."""
        pipeline = self.processor.pipeline
        pipeline.current_stage = 'setup'
        try:
            return self.processor.process(rgb, calibration, options), None
        except MetricGoldError:
            raise  # bad input or options: the caller reports it
        except Exception as err:  # noqa: B902 - any inference fault: reported, frame skipped
            if self.stopping():
                raise  # shutting down: the caller ends quietly
            failure = Failure.of(err, pipeline.current_stage)
        # Out of the except block: the traceback no longer pins the failed stage's tensors.
        self.processor.reset()  # the warm-start latent may be what did not fit
        _free_memory(pipeline, failure.out_of_memory)
        return None, failure


@dataclass(frozen=True)
class GuardedJob:
    """One frame of one stream for :func:`process_batch`."""

    guard: GuardedProcessor
    rgb: np.ndarray
    calibration: Optional[Calibration]
    options: 'FrameOptions'


def process_batch(jobs: Sequence[GuardedJob]
                  ) -> Tuple[List[Union[FrameOutcome, MetricGoldError]], Optional[Failure]]:
    """Frames of several streams in one batch, guarded as :meth:`GuardedProcessor.process`.

    Returns each frame's FrameOutcome, or the MetricGoldError its input or options raised (the
    other frames are not affected), and the batch's own failure when the batch raised and
    the frames were then run one at a time (each with its own retry and report).
    """
    from metricgold_ros.depth_frame import FrameJob, process_frames

    batch_failure = None
    if len(jobs) > 1:
        pipeline = jobs[0].guard.processor.pipeline
        pipeline.current_stage = 'setup'
        try:
            results = process_frames([FrameJob(job.guard.processor, job.rgb, job.calibration,
                                               job.options) for job in jobs])
            return [FrameOutcome(result) for result in results], None
        except MetricGoldError:
            pass  # one frame's bad input: each frame alone below, the bad one reports it
        except Exception as err:  # noqa: B902 - any inference fault: retried frame by frame
            if jobs[0].guard.stopping():
                raise
            batch_failure = Failure.of(err, pipeline.current_stage)
        if batch_failure is not None:
            _free_memory(pipeline, batch_failure.out_of_memory)
    outcomes: List[Union[FrameOutcome, MetricGoldError]] = []
    for job in jobs:
        try:
            outcomes.append(job.guard.process(job.rgb, job.calibration, job.options))
        except MetricGoldError as err:
            outcomes.append(err)
    return outcomes, batch_failure


def _free_memory(pipeline: Any, out_of_memory: bool) -> None:
    """Return cached (GPU) memory after a failed inference."""
    if out_of_memory:
        gc.collect()
    if pipeline.device.type == 'cuda':
        import torch

        torch.cuda.empty_cache()


def fault_injector_from_env(environ: Dict[str, str]) -> Optional['FaultInjector']:
    """The injector ``METRICGOLD_FAULT`` asks for, or None when it is unset or blank."""
    spec = environ.get(FAULT_ENV, '')
    return FaultInjector(spec) if spec.strip() else None
