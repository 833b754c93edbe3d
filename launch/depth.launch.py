"""Metric depth for one camera or several: ``ros2 launch metricgold_ros depth.launch.py``.

Examples::

    ros2 launch metricgold_ros depth.launch.py model_path:=/models/metricgold
    ros2 launch metricgold_ros depth.launch.py cameras:="[front, rear]"   # one node, one model
    ros2 launch metricgold_ros depth.launch.py autostart:=false   # for a lifecycle manager
    ros2 launch metricgold_ros depth.launch.py namespace:=front image:=color/image_raw \
        camera_info:=color/camera_info image_transport:=compressed device:=cuda rviz:=true

Topics are relative to ``namespace``: in ``<namespace>/<image>`` (or
``<namespace>/<image>/compressed`` with ``image_transport:=compressed``) and
``<namespace>/<camera_info>``; out ``<namespace>/depth/image``, ``depth/camera_info``,
``depth/colored``, ``depth/uncertainty``, ``points`` and ``depth/scale``. ``model_path``,
``device``, ``image_transport`` and the camera's mounting (``camera_height_m``,
``camera_pitch_deg``, ``camera_roll_deg``: the ground fit's metric scale, 0 height = off) given
here override the params file; every other parameter is in ``params_file``. A camera 1.2 m above
the floor, looking 10 degrees down::

    ros2 launch metricgold_ros depth.launch.py camera_height_m:=1.2 camera_pitch_deg:=10.0

Large messages: unless ``FASTDDS_DEFAULT_PROFILES_FILE`` is already set, every process started
here gets ``config/fastdds_large_data.xml`` (a large shared-memory segment; see that file and
README.md, "Large messages"). Give the camera driver and rviz2 the same profile.
"""

import os
from typing import List

from launch import LaunchContext, LaunchDescription
from launch.actions import DeclareLaunchArgument, LogInfo, OpaqueFunction, SetEnvironmentVariable
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue
from launch_ros.substitutions import FindPackageShare

PACKAGE = 'metricgold_ros'
PROFILE_ENV = 'FASTDDS_DEFAULT_PROFILES_FILE'
TRUE_WORDS = ('true', '1', 'yes', 'on')


def _apply_dds_profile(context: LaunchContext) -> List[object]:
    """Set the large-data Fast DDS profile for the processes below, unless the user has one."""
    own = context.environment.get(PROFILE_ENV, '')
    if own:
        return [LogInfo(msg=f'{PROFILE_ENV}={own} (yours) is kept; it should give large '
                            'messages a shared-memory segment of 32 MB or more')]
    profile = LaunchConfiguration('dds_profile').perform(context)
    if not profile:
        return []
    if not os.path.isfile(profile):
        raise RuntimeError(f'dds_profile:={profile} does not exist; pass an existing Fast DDS '
                           "profile, or dds_profile:='' to use Fast DDS's defaults")
    return [SetEnvironmentVariable(PROFILE_ENV, profile)]


def _rviz_available() -> bool:
    """Whether ``rviz2`` is installed where launch_ros looks: ament index, then lib/rviz2/.

    An ``rviz2`` on PATH alone is not enough: ``Node(package='rviz2')`` would still fail.
    """
    try:
        from ament_index_python.packages import get_package_prefix
        prefix = get_package_prefix('rviz2')
    except (LookupError, OSError, ValueError):  # not indexed, or no AMENT_PREFIX_PATH at all
        return False
    return os.access(os.path.join(prefix, 'lib', 'rviz2', 'rviz2'), os.X_OK)


def _check_rviz(context: LaunchContext) -> List[object]:
    """rviz:=true without rviz2: stop before anything starts, saying how to get it."""
    wanted = LaunchConfiguration('rviz').perform(context).strip().lower() in TRUE_WORDS
    if wanted and not _rviz_available():
        raise RuntimeError(
            'rviz:=true but rviz2 is not installed (no rviz2 package in the ament index, '
            'AMENT_PREFIX_PATH): install it (sudo apt install ros-$ROS_DISTRO-rviz2) and '
            'source ROS 2, or launch with rviz:=false and open config/depth.rviz in an '
            'rviz2 on another machine')
    return []


def _arguments(share: FindPackageShare) -> List[DeclareLaunchArgument]:
    """The launch arguments (``--show-args``)."""
    return [
        DeclareLaunchArgument('model_path', default_value='',
                              description='Checkpoint: a local folder or a Hugging Face repo '
                                          'id (org/name[@revision]); empty: the bundled model'),
        DeclareLaunchArgument('cameras', default_value="['']",
                              description='Camera streams served by the one node and model, '
                                          'e.g. "[front, rear]": front/image + front/'
                                          "camera_info in, front/depth/... out; ['']: one "
                                          'unnamed stream (image, camera_info)'),
        DeclareLaunchArgument('autostart', default_value='true',
                              description='Configure and activate depth_node at start; false: '
                                          'leave it unconfigured for a lifecycle manager'),
        DeclareLaunchArgument('params_file',
                              default_value=PathJoinSubstitution([share, 'config', 'depth.yaml']),
                              description='Node parameters (YAML)'),
        DeclareLaunchArgument('namespace', default_value='camera',
                              description='Namespace of the node and its topics'),
        DeclareLaunchArgument('image', default_value='image_raw',
                              description='Input image topic (the base topic with '
                                          'image_transport:=compressed)'),
        DeclareLaunchArgument('camera_info', default_value='camera_info',
                              description='Input sensor_msgs/CameraInfo topic'),
        DeclareLaunchArgument('image_transport', default_value='raw',
                              description='raw (sensor_msgs/Image on <image>) or compressed '
                                          '(sensor_msgs/CompressedImage on <image>/compressed, '
                                          'jpeg or png)'),
        DeclareLaunchArgument('device', default_value='auto',
                              description='auto, cpu, cuda or cuda:N'),
        DeclareLaunchArgument('camera_height_m', default_value='0.0',
                              description='Camera height above a level floor (m); the floor '
                                          'then fixes the metric scale; 0.0: off'),
        DeclareLaunchArgument('camera_pitch_deg', default_value='0.0',
                              description='Optical axis below the horizon (deg, positive: '
                                          'looking down)'),
        DeclareLaunchArgument('camera_roll_deg', default_value='0.0',
                              description='Camera turned about its optical axis (deg, '
                                          'positive: the right side dips)'),
        DeclareLaunchArgument('log_level', default_value='info',
                              description='debug shows the time of every stage of every frame'),
        DeclareLaunchArgument('rviz', default_value='false',
                              description='Also start rviz2 with config/depth.rviz'),
        DeclareLaunchArgument('dds_profile',
                              default_value=PathJoinSubstitution(
                                  [share, 'config', 'fastdds_large_data.xml']),
                              description=f'Fast DDS profile for large messages, set as '
                                          f'{PROFILE_ENV} unless that is already set; empty: '
                                          'none'),
    ]


def _depth_node() -> Node:
    """depth_node with the params file, the arguments that override it, and the remappings."""
    return Node(
        package=PACKAGE,
        executable='depth_node',
        name='depth_node',
        namespace=LaunchConfiguration('namespace'),
        parameters=[
            LaunchConfiguration('params_file'),
            {
                'model_path': ParameterValue(LaunchConfiguration('model_path'), value_type=str),
                'cameras': ParameterValue(LaunchConfiguration('cameras'), value_type=List[str]),
                'autostart': ParameterValue(LaunchConfiguration('autostart'), value_type=bool),
                'device': ParameterValue(LaunchConfiguration('device'), value_type=str),
                'image_transport': ParameterValue(LaunchConfiguration('image_transport'),
                                                  value_type=str),
                'camera_height_m': ParameterValue(LaunchConfiguration('camera_height_m'),
                                                  value_type=float),
                'camera_pitch_deg': ParameterValue(LaunchConfiguration('camera_pitch_deg'),
                                                   value_type=float),
                'camera_roll_deg': ParameterValue(LaunchConfiguration('camera_roll_deg'),
                                                  value_type=float),
            },
        ],
        remappings=[
            ('image', LaunchConfiguration('image')),
            ('camera_info', LaunchConfiguration('camera_info')),
        ],
        arguments=['--ros-args', '--log-level', LaunchConfiguration('log_level')],
        output='screen',
        emulate_tty=True,
    )


def _rviz(share: FindPackageShare) -> Node:
    """rviz2 with config/depth.rviz, when ``rviz:=true``."""
    return Node(
        package='rviz2',
        executable='rviz2',
        arguments=['-d', PathJoinSubstitution([share, 'config', 'depth.rviz'])],
        condition=IfCondition(LaunchConfiguration('rviz')),
        output='screen',
    )


def generate_launch_description() -> LaunchDescription:
    """The launch arguments, the DDS profile and rviz checks, depth_node and optional rviz2."""
    share = FindPackageShare(PACKAGE)
    # The checks run first: a missing rviz2 stops the launch before depth_node loads a model.
    checks = [OpaqueFunction(function=_check_rviz), OpaqueFunction(function=_apply_dds_profile)]
    return LaunchDescription(_arguments(share) + checks + [_depth_node(), _rviz(share)])
