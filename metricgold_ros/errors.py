"""Errors raised by metricgold_ros, one class per role.

Every message names the argument or file, the bad value and the fix, so that a user reading
``ERROR: ...`` on the command line or in a node's log knows what to do next.
"""


class MetricGoldError(Exception):
    """Base class of every error this package raises on purpose."""


class CheckpointError(MetricGoldError):
    """A model folder is missing, incomplete, corrupt or of the wrong architecture."""


class InputError(MetricGoldError):
    """An image, CameraInfo or argument cannot be used (encoding, size, intrinsics)."""


class BagError(MetricGoldError):
    """A rosbag cannot be read or written."""
