"""metricgold_ros: metric depth from one camera with MetricGold, for ROS 2."""

from metricgold_ros.errors import BagError, CheckpointError, InputError, MetricGoldError

__version__ = '0.1.0'

__all__ = ['BagError', 'CheckpointError', 'InputError', 'MetricGoldError', '__version__']
