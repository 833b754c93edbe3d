"""Shared pytest fixtures: loopback-only DDS, real data folder, tiny real models."""

import os
from pathlib import Path
from typing import Optional

import pytest

from metricgold_ros.ros_env import free_domain_id, use_loopback

REPO_ROOT = Path(__file__).resolve().parents[1]
# ../shared/data beside the checkout; METRICGOLD_SHARED_DATA names it for a checkout elsewhere
# (a git worktree).
SHARED_DATA = Path(os.environ.get('METRICGOLD_SHARED_DATA')
                   or REPO_ROOT.parent / 'shared' / 'data')


# Set before any test imports rclpy: discovery never leaves loopback, runs never mix.
use_loopback(domain_id=free_domain_id())
os.environ.setdefault('OMP_NUM_THREADS', '2')


@pytest.fixture(scope='session')
def shared_data() -> Path:
    """``../shared/data`` beside the checkout; tests using it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f'real test data not found at {SHARED_DATA} (only present in the dev tree)')
    return SHARED_DATA


@pytest.fixture(scope='session')
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny MetricGold checkpoint (random weights, real architecture) in the real layout."""
    from metricgold_ros.model import build_tiny_checkpoint, save_checkpoint

    path = tmp_path_factory.mktemp('models') / 'tiny'
    save_checkpoint(path, build_tiny_checkpoint(seed=0, processing_resolution=128))
    return path


@pytest.fixture(scope='session')
def tiny_pipeline(tiny_model_dir):
    """The tiny model loaded on the CPU through the public loader."""
    from metricgold_ros.model import MetricGoldPipeline

    return MetricGoldPipeline.from_pretrained(tiny_model_dir, device='cpu', dtype='float32')


@pytest.fixture
def fast_model(monkeypatch, tiny_pipeline):
    """The session's tiny pipeline for `metricgold bag` and `infer` instead of loading --model
    for every run."""
    import torch

    for tool in ('bag', 'infer'):
        monkeypatch.setattr(f'metricgold_ros.tools.{tool}.load_pipeline',
                            lambda args: tiny_pipeline)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny inputs; one thread stays fast on a busy shared machine
    yield tiny_pipeline
    torch.set_num_threads(threads)


class NodeRig:
    """The one node rig: a DepthNode in namespace ``ns`` on a RosHarness, a camera publisher
    pair (``image_topic``, ``camera_info``), output collectors, a parameter client and /rosout.

    Build it with the ``node_rig`` fixture; ROS is imported only when one is made.
    """

    def __init__(self, ros, node, ns: str, width: int = 160, height: int = 120,
                 image_topic: str = 'image_raw', qos=None) -> None:
        from rcl_interfaces.msg import Log
        from rcl_interfaces.srv import SetParameters
        from sensor_msgs.msg import CameraInfo, Image

        from ros_helpers import reliable_qos, synthetic_frame

        self.ros, self.node, self.ns = ros, node, ns
        self.width, self.height = width, height
        self.image_pub = ros.publisher(Image, f'{ns}/{image_topic}', qos)
        self.info_pub = ros.publisher(CameraInfo, f'{ns}/camera_info', qos)
        self.rgb, self.k = synthetic_frame(3, width, height)
        self.param_client = ros.node.create_client(SetParameters,
                                                   f'{ns}/depth_node/set_parameters')
        self.rosout = ros.collector(Log, '/rosout', reliable_qos(1000))
        self._stamp = 1_700_000_000_000_000_000
        self._subs = []

    def next_stamp(self) -> int:
        self._stamp += 10_000_000
        return self._stamp

    def collect(self, msg_type, topic: str):
        """A collector of ``ns/topic``, removed again by :meth:`drop_collectors`."""
        collector = self.ros.collector(msg_type, f'{self.ns}/{topic}')
        self._subs.append(collector.subscription)
        return collector

    def outputs(self, *topics):
        """Collectors of the node's output ``topics``, each matched to the node's publisher."""
        from ros_helpers import wait_for_publishers
        from metricgold_ros.node.depth_node import OUTPUT_TYPES

        collectors = {t: self.collect(OUTPUT_TYPES[t], t) for t in topics}
        for collector in collectors.values():
            assert wait_for_publishers(collector.subscription)
        return collectors

    def drop_collectors(self) -> None:
        for sub in self._subs:
            self.ros.node.destroy_subscription(sub)
        self._subs = []

    def send(self, rgb=None, info_k=None, info_size=None, encoding='bgr8', padding=0,
             image=None, info_d=(0.0,) * 5) -> int:
        """Publish CameraInfo (unless ``info_k`` is False) and an Image with a fresh stamp."""
        from ros_helpers import camera_info_msg, image_msg

        stamp = self.next_stamp()
        if info_k is not False:
            self.info_pub.publish(camera_info_msg(
                stamp, *(info_size or (self.width, self.height)), info_k or self.k, d=info_d))
        self.image_pub.publish(image(stamp) if image is not None else
                               image_msg(self.rgb if rgb is None else rgb, stamp, encoding,
                                         row_padding=padding))
        return stamp

    def set_params(self, **values) -> list:
        """Set parameters through the node's SetParameters service (as `ros2 param set`)."""
        from rcl_interfaces.msg import Parameter as ParameterMsg
        from rcl_interfaces.msg import ParameterType, ParameterValue
        from rcl_interfaces.srv import SetParameters

        from ros_helpers import wait_until

        assert self.param_client.wait_for_service(timeout_sec=10.0)
        types = {bool: ParameterType.PARAMETER_BOOL, int: ParameterType.PARAMETER_INTEGER,
                 float: ParameterType.PARAMETER_DOUBLE, str: ParameterType.PARAMETER_STRING}
        fields = {bool: 'bool_value', int: 'integer_value', float: 'double_value',
                  str: 'string_value'}
        request = SetParameters.Request(parameters=[
            ParameterMsg(name=name, value=ParameterValue(type=types[type(value)],
                                                         **{fields[type(value)]: value}))
            for name, value in values.items()])
        future = self.param_client.call_async(request)
        assert wait_until(future.done, 10.0), 'set_parameters timed out'
        return future.result().results

    def close(self) -> None:
        """Take the node off the harness and destroy it (the harness goes on)."""
        self.drop_collectors()
        self.node.close()
        self.ros.executor.remove_node(self.node)
        self.node.destroy_node()

    def errors_naming(self, *words: str):
        """The node's error (and fatal) log lines holding every one of ``words``."""
        return [log.msg for log in self.rosout.messages()
                if log.level >= 40 and log.name.endswith(self.ns.strip('/') + '.depth_node')
                and all(word in log.msg for word in words)]


@pytest.fixture(scope='module')
def node_rig(tiny_model_dir):
    """Factory of :class:`NodeRig`s on one module-wide harness, with the tiny model on the CPU.

    ``node_rig('/ns', image_topic='image_raw', fault=None, rig=NodeRig, **parameters)``: the
    node subscribes to ``image`` remapped to ``image_topic``, configured and activated;
    ``fault`` is the fault injection spec it is given (as ``METRICGOLD_FAULT``); ``rig`` a
    NodeRig subclass. Nodes not closed by their test are shut down with the module.
    """
    pytest.importorskip('rclpy')
    from rclpy.parameter import Parameter

    from metricgold_ros.faults import FaultInjector
    from metricgold_ros.node.depth_node import DepthNode
    from ros_helpers import RosHarness, wait_for_publishers, wait_for_subscribers

    with RosHarness('node_rig') as ros:
        def make(ns: str, *, image_topic: str = 'image_raw', width: int = 160,
                 height: int = 120, fault: Optional[str] = None, rig: type = NodeRig,
                 pub_qos=None, **parameters) -> NodeRig:
            values = {'model_path': str(tiny_model_dir), 'device': 'cpu', **parameters}
            node = DepthNode(faults=FaultInjector(fault) if fault else None,
                             context=ros.context, namespace=ns,
                             cli_args=['--ros-args', '-r', f'image:={image_topic}'],
                             parameter_overrides=[Parameter(k, value=v)
                                                  for k, v in values.items()])
            ros.add_node(node)  # configured and activated
            made = rig(ros, node, ns, width, height, image_topic, pub_qos)
            assert wait_for_subscribers(made.image_pub) and wait_for_subscribers(made.info_pub)
            assert wait_for_publishers(made.rosout.subscription)
            return made
        yield make


@pytest.fixture(scope='session')
def workspace(tmp_path_factory) -> Path:
    """The package built and installed by colcon once per session (skips without colcon)."""
    from colcon_helpers import build_workspace

    return build_workspace(tmp_path_factory.mktemp('colcon_ws'))


@pytest.fixture(scope='session')
def ros2(workspace) -> str:
    """The ``ros2`` command, for the colcon-installed package (skips without the ros2 CLI)."""
    from colcon_helpers import ros2_command

    return ros2_command()


@pytest.fixture(scope='session')
def raspicam(shared_data) -> dict:
    """The real Raspberry Pi camera's first JPEG and CameraInfo (../shared/data):
    ``format``, ``data`` (bytes), ``k`` (fx, fy, cx, cy) and ``size`` (width, height)."""
    from rosbags.highlevel import AnyReader

    found: dict = {}
    bag = shared_data / 'bags' / 'raspicam_aruco_images' / 'aruco_images_mcap'
    with AnyReader([bag]) as reader:
        for connection, _, raw in reader.messages():
            msg = reader.deserialize(raw, connection.msgtype)
            if connection.msgtype.endswith('CompressedImage') and 'data' not in found:
                found['data'], found['format'] = bytes(msg.data), str(msg.format)
            elif connection.msgtype.endswith('CameraInfo') and 'k' not in found:
                found['k'] = (msg.k[0], msg.k[4], msg.k[2], msg.k[5])
                found['size'] = (int(msg.width), int(msg.height))
    assert {'data', 'k'} <= set(found), found.keys()
    return found
