"""ament_python packaging: `colcon build` in a ROS 2 workspace, or `pip install -e .` in a venv."""

from glob import glob

from setuptools import find_packages, setup

PACKAGE = 'metricgold_ros'

setup(
    name=PACKAGE,
    version='0.1.0',
    packages=find_packages(exclude=['test', 'test.*', 'training', 'training.*', 'bench']),
    package_data={PACKAGE: ['models/*/*.json', 'models/*/*.safetensors', 'models/*/*.md',
                            'models/*/*/*.json', 'models/*/*/*.safetensors']},
    data_files=[
        ('share/ament_index/resource_index/packages', [f'resource/{PACKAGE}']),
        (f'share/{PACKAGE}', ['package.xml']),
        (f'share/{PACKAGE}/launch', glob('launch/*.launch.py')),
        (f'share/{PACKAGE}/config', glob('config/*.yaml') + glob('config/*.rviz')
         + glob('config/*.xml')),
    ],
    install_requires=['setuptools'],
    zip_safe=True,
    maintainer='metricgold_ros maintainers',
    maintainer_email='maintainers@example.com',
    description='Metric depth and point clouds from one camera with MetricGold, for ROS 2.',
    license='Apache-2.0',
    entry_points={
        'console_scripts': [
            'depth_node = metricgold_ros.node.main:main',
            'metricgold = metricgold_ros.tools.cli:main',
        ],
    },
)
