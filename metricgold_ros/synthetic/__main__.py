"""``python -m metricgold_ros.synthetic``: write synthetic scenes as Virtual KITTI 2."""

import sys

from metricgold_ros.synthetic.vkitti import main

sys.exit(main())
