"""Score predicted depth against ground truth: ``python training/evaluate.py --pred D --gt D``.

The same command as ``metricgold eval`` (same arguments, same code, same numbers), kept here so
that the training folder has its evaluation entry point beside ``train.py``. Validation during
training calls :func:`metricgold_ros.evaluation.evaluate_image` directly.
"""

import sys
from pathlib import Path
from typing import Optional, Sequence

try:
    from metricgold_ros.tools import cli
except ImportError:  # run from a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from metricgold_ros.tools import cli


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``metricgold eval`` with ``argv`` (default: the command line); returns the exit code."""
    return cli.main(['eval', *(sys.argv[1:] if argv is None else argv)])


if __name__ == '__main__':
    sys.exit(main())
