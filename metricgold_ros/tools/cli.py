"""The ``metricgold`` command line: one sub-command per module, imported only when used."""

import argparse
import importlib
import sys
from typing import Optional, Sequence

from metricgold_ros.errors import MetricGoldError

# sub-command -> (module, one-line help). Each module defines
# ``add_arguments(parser: argparse.ArgumentParser) -> None`` and ``run(args) -> int``.
COMMANDS = {
    'init-model': ('metricgold_ros.tools.init_model', 'write a randomly initialised tiny model'),
    'infer': ('metricgold_ros.tools.infer', 'predict metric depth for image files'),
    'bag': ('metricgold_ros.tools.bag', 'add depth and point clouds to a rosbag'),
    'eval': ('metricgold_ros.tools.eval', 'score predicted depth against ground truth'),
    'bench': ('metricgold_ros.tools.bench', 'time every stage of the pipeline'),
}

# Exit codes; a malformed command line is argparse's own 2.
EXIT_OK = 0
EXIT_DATA_ERROR = 1  # the command was well formed but its input or model could not be used
EXIT_INTERRUPTED = 130


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog='metricgold', description='Metric depth from one camera with MetricGold.')
    subparsers = parser.add_subparsers(dest='command', metavar='COMMAND', required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(_module=module_name)
        if argv and argv[0] == name:
            importlib.import_module(module_name).add_arguments(sub)
    args = parser.parse_args(argv)
    try:
        return int(importlib.import_module(args._module).run(args) or EXIT_OK)
    except MetricGoldError as err:
        print(f'ERROR: {err}', file=sys.stderr)
        return EXIT_DATA_ERROR
    except KeyboardInterrupt:
        print('Interrupted.', file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == '__main__':
    sys.exit(main())
