"""The depth node's plain-Python machinery: the newest-frame mailboxes, frame statistics, the
rate limiter of error reports and the CameraInfo cache. No rclpy: unit-tested without ROS."""

import math
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import (Callable, Deque, Dict, Generic, Hashable, List, Mapping, Optional, Tuple,
                    TypeVar)

import numpy as np

T = TypeVar('T')


class Mailboxes(Generic[T]):
    """One newest-item slot per stream (camera), emptied together by one worker.

    ``put`` replaces a stream's waiting item (counted as dropped) and never blocks, so the
    camera callbacks stay cheap and latency stays bounded: the worker always gets each
    stream's newest frame. ``take`` returns what waits in all slots at once (a batch), taking
    the streams in turn after the one served last when ``limit`` caps the batch, so no stream
    starves.
    """

    def __init__(self, streams: int) -> None:
        if streams < 1:
            raise ValueError(f'streams: {streams}, expected >= 1')
        self._cond = threading.Condition()
        self._items: List[Optional[T]] = [None] * streams
        self._full = [False] * streams
        self._next = 0  # the stream served first by the next capped take
        self._closed = False

    def put(self, stream: int, item: T) -> bool:
        """Store ``item`` in ``stream``'s slot; True when it replaced one nobody took."""
        with self._cond:
            replaced = self._full[stream]
            self._items[stream], self._full[stream] = item, True
            self._cond.notify()
            return replaced

    def take(self, timeout_s: Optional[float] = None, gather_s: float = 0.0,
             limit: int = 0) -> List[Tuple[int, T]]:
        """``(stream, item)`` pairs waiting now, emptying their slots; [] on timeout or close.

        Waits up to ``timeout_s`` for a first item, then up to ``gather_s`` more for the other
        streams (returning as soon as every slot is full). ``limit`` > 0 caps the pairs taken.
        """
        with self._cond:
            if not self._cond.wait_for(lambda: any(self._full) or self._closed, timeout_s):
                return []
            if gather_s > 0.0:
                self._cond.wait_for(lambda: all(self._full) or self._closed, gather_s)
            if self._closed:
                return []
            count = len(self._items)
            order = [(self._next + i) % count for i in range(count)]
            taken = [stream for stream in order if self._full[stream]]
            if limit > 0:
                taken = taken[:limit]
            self._next = (taken[-1] + 1) % count
            pairs = []
            for stream in sorted(taken):
                pairs.append((stream, self._items[stream]))
                self._items[stream], self._full[stream] = None, False
            return pairs

    def close(self) -> None:
        """Empty every slot and wake the waiting ``take`` for good (shutdown)."""
        with self._cond:
            self._closed = True
            self._items = [None] * len(self._items)
            self._full = [False] * len(self._full)
            self._cond.notify_all()


@dataclass(frozen=True)
class StatsSnapshot:
    """Counters since start and, over the last period, latency and per-stage time."""

    received: int
    published: int
    dropped: int
    idle: int
    errors: int
    period_s: float
    period_published: int
    period_errors: int  # input errors and inference failures
    latency_p50_ms: float  # stamp -> publish, NaN when nothing was published in the period
    latency_p95_ms: float
    stage_ms: Dict[str, float]  # mean wall time of each stage over the period
    failed: int = 0  # frames whose inference raised (out of memory, ...)
    retried: int = 0  # of those, frames published after a retry at the fallback resolution

    def summary(self) -> str:
        """One log line."""
        rate = self.period_published / self.period_s if self.period_s > 0 else 0.0
        text = (f'frames in {self.received}, out {self.published} ({rate:.2f} Hz), dropped '
                f'{self.dropped}, idle {self.idle} (no subscribers), errors {self.errors}')
        if self.failed:
            text += (f', inference failures {self.failed} ({self.retried} retried at the '
                     'fallback resolution)')
        if self.period_published == 0:
            return text + '; nothing published in this period'
        stages = ', '.join(f'{name} {ms:.1f}' for name, ms in self.stage_ms.items())
        return (f'{text}; stamp->publish p50 {self.latency_p50_ms:.0f} ms, p95 '
                f'{self.latency_p95_ms:.0f} ms; stage ms: {stages}')

    def key_values(self) -> List[Tuple[str, str]]:
        """(key, value) pairs for a DiagnosticStatus."""
        pairs = [('frames received', str(self.received)), ('frames published',
                  str(self.published)), ('frames dropped', str(self.dropped)),
                 ('frames skipped (no subscribers)', str(self.idle)),
                 ('errors', str(self.errors)),
                 ('inference failures', str(self.failed)),
                 ('retried at fallback resolution', str(self.retried)),
                 ('publish rate (Hz)', f'{self.period_published / max(self.period_s, 1e-9):.2f}'),
                 ('latency p50 (ms)', f'{self.latency_p50_ms:.1f}'),
                 ('latency p95 (ms)', f'{self.latency_p95_ms:.1f}')]
        return pairs + [(f'{name} (ms)', f'{ms:.1f}') for name, ms in self.stage_ms.items()]


class FrameStats:
    """Thread-safe counters and a bounded window of latencies and stage times."""

    COUNTERS = ('received', 'published', 'dropped', 'idle', 'errors', 'failed', 'retried')

    def __init__(self, window: int = 1000, clock: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self._counts = dict.fromkeys(self.COUNTERS, 0)
        self._latencies_s: Deque[float] = deque(maxlen=window)
        self._stage_sum_s: Dict[str, float] = {}
        self._period_start = clock()
        self._period_published = 0
        self._period_errors = 0
        self._period_stage_frames = 0

    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to counter ``name`` (one of ``COUNTERS``)."""
        with self._lock:
            self._counts[name] += n
            if name in ('errors', 'failed'):
                self._period_errors += n

    def record(self, latency_s: float, timings_s: Mapping[str, float]) -> None:
        """One published frame: its stamp->publish latency and the time of each stage."""
        with self._lock:
            self._counts['published'] += 1
            self._period_published += 1
            self._latencies_s.append(latency_s)
            self._period_stage_frames += 1
            for stage, seconds in timings_s.items():
                self._stage_sum_s[stage] = self._stage_sum_s.get(stage, 0.0) + seconds

    def snapshot(self, reset: bool = True) -> StatsSnapshot:
        """Counters and the period's figures; ``reset`` starts a new period."""
        with self._lock:
            now = self._clock()
            lat_ms = np.asarray(self._latencies_s, dtype=np.float64) * 1e3
            p50, p95 = (np.percentile(lat_ms, [50, 95]) if lat_ms.size else (math.nan,) * 2)
            frames = max(self._period_stage_frames, 1)
            snap = StatsSnapshot(
                period_s=now - self._period_start, period_published=self._period_published,
                period_errors=self._period_errors, latency_p50_ms=float(p50),
                latency_p95_ms=float(p95),
                stage_ms={k: v * 1e3 / frames for k, v in self._stage_sum_s.items()},
                **self._counts)
            if reset:
                self._latencies_s.clear()
                self._stage_sum_s = {}
                self._period_start = now
                self._period_published = self._period_errors = self._period_stage_frames = 0
            return snap


class RateLimiter:
    """At most one report per key every ``period_s``, counting what it held back.

    Keys are e.g. (topic, message): each distinct problem is reported promptly, a stream of
    the same bad frame once per period. Bounded: the oldest keys are forgotten.
    """

    def __init__(self, period_s: float = 5.0, max_keys: int = 256,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.period_s = period_s
        self._max_keys = max_keys
        self._clock = clock
        self._lock = threading.Lock()
        self._keys: 'OrderedDict[Hashable, List[float]]' = OrderedDict()  # key -> [last, held]

    def check(self, key: Hashable) -> Optional[int]:
        """None to stay silent, else how many reports of ``key`` were held back since the last."""
        now = self._clock()
        with self._lock:
            entry = self._keys.get(key)
            if entry is not None and now - entry[0] < self.period_s:
                entry[1] += 1
                return None
            held = int(entry[1]) if entry is not None else 0
            self._keys[key] = [now, 0]
            self._keys.move_to_end(key)
            while len(self._keys) > self._max_keys:
                self._keys.popitem(last=False)
            return held


class StampCache(Generic[T]):
    """The last few items (CameraInfo) by stamp, to pair an image with the info of its stamp."""

    def __init__(self, size: int = 32) -> None:
        self._size = size
        self._lock = threading.Lock()
        self._items: 'OrderedDict[int, T]' = OrderedDict()
        self._latest: Optional[T] = None

    def add(self, stamp_ns: int, item: T) -> None:
        """Remember ``item`` as the one for ``stamp_ns`` and as the latest."""
        with self._lock:
            self._items[stamp_ns] = item
            self._items.move_to_end(stamp_ns)
            while len(self._items) > self._size:
                self._items.popitem(last=False)
            self._latest = item

    def match(self, stamp_ns: int) -> Optional[T]:
        """The item of exactly ``stamp_ns``, else the latest one, else None."""
        with self._lock:
            return self._items.get(stamp_ns, self._latest)

    def forget_all_but(self, stamp_ns: int) -> None:
        """Keep only the item of exactly ``stamp_ns`` (if any): the stream restarted."""
        with self._lock:
            kept = self._items.get(stamp_ns)
            self._items.clear()
            self._latest = kept
            if kept is not None:
                self._items[stamp_ns] = kept
