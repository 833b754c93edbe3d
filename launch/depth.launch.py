"""Metric depth for one camera: ``ros2 launch metricgold_ros depth.launch.py``.

Examples::

    ros2 launch metricgold_ros depth.launch.py model_path:=/models/metricgold
    ros2 launch metricgold_ros depth.launch.py namespace:=front image:=color/image_raw \
        camera_info:=color/camera_info device:=cuda rviz:=true

Topics are relative to ``namespace``: in ``<namespace>/<image>`` and
``<namespace>/<camera_info>``; out ``<namespace>/depth/image``, ``depth/camera_info``,
``depth/colored``, ``depth/uncertainty``, ``points`` and ``depth/scale``. ``model_path``,
``device`` and the camera's mounting (``camera_height_m``, ``camera_pitch_deg``,
``camera_roll_deg``: the ground fit's metric scale, 0 height = off) given here override the
params file; every other parameter is in ``params_file``. A camera 1.2 m above the floor,
looking 10 degrees down::

    ros2 launch metricgold_ros depth.launch.py camera_height_m:=1.2 camera_pitch_deg:=10.0
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue
from launch_ros.substitutions import FindPackageShare

PACKAGE = 'metricgold_ros'


def generate_launch_description() -> LaunchDescription:
    share = FindPackageShare(PACKAGE)
    arguments = [
        DeclareLaunchArgument('model_path', default_value='',
                              description='Local MetricGold checkpoint folder; empty: the '
                                          'bundled model (`metricgold init-model` makes one)'),
        DeclareLaunchArgument('params_file',
                              default_value=PathJoinSubstitution([share, 'config', 'depth.yaml']),
                              description='Node parameters (YAML)'),
        DeclareLaunchArgument('namespace', default_value='camera',
                              description='Namespace of the node and its topics'),
        DeclareLaunchArgument('image', default_value='image_raw',
                              description='Input sensor_msgs/Image topic'),
        DeclareLaunchArgument('camera_info', default_value='camera_info',
                              description='Input sensor_msgs/CameraInfo topic'),
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
    ]
    depth_node = Node(
        package=PACKAGE,
        executable='depth_node',
        name='depth_node',
        namespace=LaunchConfiguration('namespace'),
        parameters=[
            LaunchConfiguration('params_file'),
            {
                'model_path': ParameterValue(LaunchConfiguration('model_path'), value_type=str),
                'device': ParameterValue(LaunchConfiguration('device'), value_type=str),
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
    rviz = Node(
        package='rviz2',
        executable='rviz2',
        arguments=['-d', PathJoinSubstitution([share, 'config', 'depth.rviz'])],
        condition=IfCondition(LaunchConfiguration('rviz')),
        output='screen',
    )
    return LaunchDescription(arguments + [depth_node, rviz])
