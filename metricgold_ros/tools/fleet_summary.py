"""The progress, outcomes and summary of a many-bag run (:mod:`metricgold_ros.tools.fleet`).

One tqdm bar counts the frames of all bags (on a terminal, as the single-bag tool's); each
finished bag prints one line; the summary holds per bag its frames, seconds, frames/s, error,
attempts and worker, and the total. Times are seconds.
"""

import argparse
import json
import sys
import time
from typing import Any, Dict, Sequence

from metricgold_ros.atomic import write_atomic
from metricgold_ros.tools.fleet import Job, JobOutcome


class Board:
    """Progress over all frames of all bags (one tqdm bar on a terminal) and the outcomes."""

    def __init__(self, jobs: Sequence[Job], quiet: bool) -> None:
        self.jobs = list(jobs)
        self.totals = {job.index: job.frames_estimate for job in jobs}
        self.done_frames = {job.index: 0 for job in jobs}
        self.outcomes: Dict[int, JobOutcome] = {}
        self.quiet = quiet
        self.start = time.perf_counter()
        self.bar: Any = None
        if not quiet and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=sum(self.totals.values()), unit='frame', desc='depth',
                            dynamic_ncols=True)
        self._postfix()

    def total(self, index: int, frames: int) -> None:
        """A worker counted the frames of bag ``index``: correct the bar's total."""
        self.totals[index] = frames
        if self.bar is not None:
            self.bar.total = sum(self.totals.values())
            self.bar.refresh()

    def frames(self, index: int, n: int) -> None:
        self.done_frames[index] += n
        if self.bar is not None:
            self.bar.update(n)

    def restart(self, index: int) -> None:
        """Bag ``index`` runs again (its worker died): its frames count again."""
        if self.bar is not None and self.done_frames[index]:
            self.bar.update(-self.done_frames[index])
        self.done_frames[index] = 0

    def finish(self, outcome: JobOutcome) -> None:
        """Record a bag's outcome and print one line about it (not with --quiet)."""
        index = outcome.job.index
        self.outcomes[index] = outcome
        if outcome.status != 'ok' and self.bar is not None:  # its frames will not come
            self.bar.total -= self.totals[index] - self.done_frames[index]
            self.bar.refresh()
        if not self.quiet:
            self._print(_outcome_line(outcome))
        self._postfix()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _print(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def _postfix(self) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f'bags {len(self.outcomes)}/{len(self.jobs)}')

    def summary(self, workers: Dict[str, Any]) -> Dict[str, Any]:
        """Per-bag summaries (frames, seconds, frames/s, errors) and the total."""
        wall_s = time.perf_counter() - self.start
        bags = []
        for job in self.jobs:
            outcome = self.outcomes.get(job.index) or JobOutcome(job, 'not run')
            bags.append({'input': job.input, 'output': job.output, 'status': outcome.status,
                         'frames': outcome.summary.get('frames', 0),
                         'seconds': outcome.summary.get('seconds'),
                         'fps': outcome.summary.get('fps'), 'error': outcome.error,
                         'attempts': outcome.attempts, 'worker': outcome.worker,
                         'summary': outcome.summary})
        done = [b for b in bags if b['status'] == 'ok']
        frames = sum(b['frames'] for b in done)
        return {
            'bags': len(bags),
            'ok': len(done),
            'skipped': sum(b['status'] == 'skipped' for b in bags),
            'failed': [b['input'] for b in bags if b['status'] not in ('ok', 'skipped')],
            'frames': frames,
            'seconds': round(wall_s, 3),
            'fps': round(frames / wall_s, 3) if wall_s > 0 else None,
            'workers': workers,
            'per_bag': bags,
        }


def _outcome_line(outcome: JobOutcome) -> str:
    job = outcome.job
    if outcome.status == 'ok':
        s = outcome.summary
        return (f'ok      {job.name}: {s.get("frames")} frames in {s.get("seconds")} s '
                f'({s.get("fps")} frames/s)')
    if outcome.status == 'skipped':
        return f'skipped {job.name}: complete from an earlier run'
    return f'FAILED  {job.name} ({job.input}): {outcome.error}'


def write_summary(path: str, data: Dict[str, Any]) -> None:
    """``--summary-json PATH``, written atomically (NaN kept as JSON's NaN)."""
    write_atomic(path, (json.dumps(data, indent=1) + '\n').encode())


def report(args: argparse.Namespace, data: Dict[str, Any], interrupted: bool) -> int:
    from metricgold_ros.tools.cli import EXIT_DATA_ERROR, EXIT_INTERRUPTED, EXIT_OK

    if args.quiet:
        print(json.dumps(data))
    else:
        print(f'{data["ok"]} of {data["bags"]} bags written ({data["skipped"]} complete '
              f'before), {data["frames"]} frames in {data["seconds"]:.1f} s '
              f'({data["fps"]} frames/s) under {args.output}')
    if interrupted:
        print('Interrupted.', file=sys.stderr)
        return EXIT_INTERRUPTED
    failed = [b for b in data['per_bag'] if b['status'] == 'failed']
    if failed:
        print(f'ERROR: {len(failed)} of {data["bags"]} bags failed:', file=sys.stderr)
        for bag in failed:
            print(f'  {bag["input"]}: {bag["error"]}', file=sys.stderr)
        return EXIT_DATA_ERROR
    return EXIT_OK
