"""The ``depth_node`` program: the process around :class:`~metricgold_ros.node.depth_node.
DepthNode` (signals, executor, shutdown, exit code)."""

import logging
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import List, Optional

import rclpy
from rclpy.exceptions import ParameterException
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.lifecycle import TransitionCallbackReturn
from rclpy.signals import SignalHandlerOptions

from metricgold_ros.errors import MetricGoldError
from metricgold_ros.faults import fault_injector_from_env
from metricgold_ros.node.depth_node import NODE_NAME, DepthNode

SPIN_PERIOD_S = 0.1  # how often the spin loop looks for a stop request


def _run(args: Optional[List[str]]) -> int:
    """Spin the node until SIGINT/SIGTERM; 1 when the configuration cannot work.

    With ``autostart`` (the default) the node is configured (the model loaded) and activated
    here; a configure that fails ends the program with 1. Without it the node waits,
    unconfigured, for a lifecycle manager.

    The signals are handled here, not by rclpy: its handler thread triggers the executor's
    guard condition while this thread may already be destroying it (a segfault in about one
    shutdown in 30 here). A signal before spinning ends the start-up (a model load in
    progress) at once; while spinning it ends the loop within SPIN_PERIOD_S.
    """
    stop = threading.Event()

    def on_signal(signum: int, frame: Optional[FrameType]) -> None:
        already_stopping = stop.is_set()
        stop.set()
        if not spinning and not already_stopping:
            raise KeyboardInterrupt

    spinning = False
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    node = None
    executor = SingleThreadedExecutor()
    try:
        node = DepthNode(faults=fault_injector_from_env(os.environ))
        if node.autostart:
            if node.trigger_configure() != TransitionCallbackReturn.SUCCESS:
                rclpy.logging.get_logger(NODE_NAME).fatal(
                    f'cannot start: {node.configure_error or "configure failed"}')
                return 1
            node.trigger_activate()
        else:
            node.get_logger().info('autostart is false: unconfigured, waiting for a lifecycle '
                                   'manager (ros2 lifecycle set <node> configure)')
        executor.add_node(node)
        spinning = True
        while not stop.is_set() and rclpy.ok():
            executor.spin_once(timeout_sec=SPIN_PERIOD_S)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except (MetricGoldError, ParameterException) as err:
        rclpy.logging.get_logger(NODE_NAME).fatal(f'cannot start: {err}')
        return 1
    finally:
        stop.set()  # from here a second signal changes nothing
        executor.shutdown(timeout_sec=0)
        if node is not None:
            node.close()
            node.destroy_node()
        rclpy.try_shutdown()
    return 0


def _exit_process(code: int) -> None:
    """End the process now that the node and rclpy are shut down.

    What remains of a normal exit is Python tearing down the torch/diffusers modules, 1-3 s
    that a SIGINT/SIGTERM should not wait for. Logs are flushed first (rcl's spdlog file sink
    buffers; finalising it twice is harmless).
    """
    try:
        from rclpy.impl.implementation_singleton import rclpy_implementation
        rclpy_implementation.rclpy_logging_fini()
    except Exception:  # noqa: B902 - best effort: a log flush must not change the exit code
        pass
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(args: Optional[List[str]] = None, *, exit_process: Optional[bool] = None) -> int:
    """The ``depth_node`` program: run the node; the exit code (1: unusable configuration).

    ``exit_process`` (default: when this process is the ``depth_node`` executable) ends the
    process at once after the shutdown instead of returning.
    """
    code = _run(args)
    if exit_process is None:
        exit_process = Path(sys.argv[0]).name == NODE_NAME
    if exit_process:
        _exit_process(code)
    return code


if __name__ == '__main__':
    sys.exit(main())
