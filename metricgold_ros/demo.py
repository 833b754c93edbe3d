"""Moved: ``python -m metricgold_ros.demo`` still works and says where the demo lives now."""

import sys

if __name__ == '__main__':
    print('note: metricgold_ros.demo moved to metricgold_ros.synthetic.demo (`make demo` runs '
          'it); running it now', file=sys.stderr)
    from metricgold_ros.synthetic.demo import main

    sys.exit(main())
