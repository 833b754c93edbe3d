"""Moved: ``python -m metricgold_ros.cli`` still works and says where the command lives now."""

import sys

if __name__ == '__main__':
    print('note: metricgold_ros.cli moved to metricgold_ros.tools.cli (the `metricgold` '
          'command); running it now', file=sys.stderr)
    from metricgold_ros.tools.cli import main

    sys.exit(main())
