"""Moved: ``python -m metricgold_ros.depth_node`` still works and says where the node lives now."""

import sys

if __name__ == '__main__':
    print('note: metricgold_ros.depth_node moved to metricgold_ros.node (the `depth_node` '
          'executable runs metricgold_ros.node.main); running it now', file=sys.stderr)
    from metricgold_ros.node.main import main

    sys.exit(main())
