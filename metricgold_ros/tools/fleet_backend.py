"""What the scheduler of a many-bag run and its backends (local processes, Ray) exchange.

A backend runs workers that each convert one bag at a time; the scheduler
(:func:`metricgold_ros.tools.fleet_run.schedule`) hands it jobs and reads typed events back:
a bag's frame count (:class:`TotalEvent`), frames done (:class:`FramesEvent`), its outcome
(:class:`DoneEvent`), or the death of its worker (:class:`DiedEvent`). ``index`` is always the
job's index.
"""

from dataclasses import dataclass
from typing import Any, Dict, List, Protocol, Union

from metricgold_ros.tools.fleet import Job, JobOutcome


@dataclass(frozen=True)
class TotalEvent:
    """Bag ``index`` holds ``frames`` images to process."""

    index: int
    frames: int


@dataclass(frozen=True)
class FramesEvent:
    """``frames`` more images of bag ``index`` are done."""

    index: int
    frames: int


@dataclass(frozen=True)
class DoneEvent:
    """Bag ``index`` ended: ``outcome`` says how ('ok' or 'failed')."""

    index: int
    outcome: JobOutcome


@dataclass(frozen=True)
class DiedEvent:
    """The worker converting bag ``index`` died (killed, out of memory, a lost node)."""

    index: int
    reason: str


Event = Union[TotalEvent, FramesEvent, DoneEvent, DiedEvent]


class Backend(Protocol):
    """Workers that convert bags: local processes or Ray actors."""

    def describe(self) -> Dict[str, Any]:
        """What ran the bags, for the summary (kind, worker count, resources)."""

    def idle(self) -> List[str]:
        """Names of the workers ready for a bag."""

    def alive(self) -> bool:
        """Whether any worker is left (or coming back)."""

    def why_none(self) -> str:
        """Why no worker is left, for the bags that cannot run."""

    def submit(self, worker: str, job: Job, attempt: int) -> None:
        """Hand ``job`` (its ``attempt``-th try) to the idle ``worker``."""

    def poll(self, timeout: float) -> List[Event]:
        """The events that arrived within ``timeout`` seconds."""

    def stop(self) -> None:
        """End every worker (a running bag is aborted and leaves nothing partial)."""
