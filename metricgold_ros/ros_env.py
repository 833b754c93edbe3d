"""Environment for processes that start rclpy: DDS discovery on loopback, a domain of their own.

Fast DDS multicasts discovery on every interface by default; ``ROS_AUTOMATIC_DISCOVERY_RANGE=
LOCALHOST`` (Jazzy and newer) and ``ROS_LOCALHOST_ONLY=1`` (Humble, Iron) keep every packet on
``lo``. A free ``ROS_DOMAIN_ID`` keeps parallel runs and leftovers from talking to each other.

Large messages: :func:`with_large_data_profile` gives processes the package's Fast DDS profile
(``config/fastdds_large_data.xml``, a large shared-memory segment), as ``depth.launch.py``
does, unless they already have one.
"""

import os
import re
import socket
import sys
from pathlib import Path
from typing import Dict, List, Mapping, MutableMapping, Optional

_PRE_JAZZY = ('humble', 'iron')
PACKAGE = 'metricgold_ros'
PROFILE_ENV = 'FASTDDS_DEFAULT_PROFILES_FILE'
PROFILE_NAME = 'fastdds_large_data.xml'


def free_domain_id(start: Optional[int] = None) -> int:
    """A ROS_DOMAIN_ID (1..100) whose Fast DDS discovery port nobody on this machine holds.

    The well-known discovery port of domain d is 7400 + 250 * d; a bound port means another
    run uses that domain.
    """
    start = os.getpid() % 100 if start is None else start
    for offset in range(100):
        domain = (start + offset) % 100 + 1
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            try:
                sock.bind(('127.0.0.1', 7400 + 250 * domain))
            except OSError:
                continue
        return domain
    return 0


def loopback_env(base: Optional[Mapping[str, str]] = None,
                 domain_id: Optional[int] = None) -> Dict[str, str]:
    """``base`` (default ``os.environ``) with loopback-only discovery and a domain id set.

    An existing ``ROS_DOMAIN_ID`` is kept unless ``domain_id`` is given.
    """
    env = dict(os.environ if base is None else base)
    env['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
    if env.get('ROS_DISTRO') in _PRE_JAZZY:
        env['ROS_LOCALHOST_ONLY'] = '1'
    if domain_id is not None:
        env['ROS_DOMAIN_ID'] = str(domain_id)
    elif 'ROS_DOMAIN_ID' not in env:
        env['ROS_DOMAIN_ID'] = str(free_domain_id())
    return env


def use_loopback(domain_id: Optional[int] = None) -> None:
    """Apply :func:`loopback_env` to this process; call before ``rclpy.init``."""
    os.environ.update(loopback_env(domain_id=domain_id))


def large_data_profile() -> Optional[Path]:
    """The package's Fast DDS profile: the installed ``share/metricgold_ros/config`` (colcon),
    else the source tree's ``config/``; None when neither has it (a pip-installed core)."""
    try:
        from ament_index_python.packages import get_package_share_directory
        path = Path(get_package_share_directory(PACKAGE)) / 'config' / PROFILE_NAME
        if path.is_file():
            return path
    except (ImportError, LookupError, OSError, ValueError):  # no ament index, not installed
        pass
    path = Path(__file__).resolve().parents[1] / 'config' / PROFILE_NAME
    return path if path.is_file() else None


def with_large_data_profile(env: MutableMapping[str, str]) -> MutableMapping[str, str]:
    """``env`` with ``FASTDDS_DEFAULT_PROFILES_FILE`` set to :func:`large_data_profile`,
    unless it names a profile already (the user's is kept) or there is none; ``env`` itself."""
    if not env.get(PROFILE_ENV):
        profile = large_data_profile()
        if profile is not None:
            env[PROFILE_ENV] = str(profile)
    return env


def depth_node_command() -> List[str]:
    """The command running this checkout's ``depth_node`` console script with this interpreter.

    The entry point (module:function) is read from this checkout's ``setup.py``, so an
    installed script of another checkout (or none) does not matter; ``sys.argv[0]`` is
    ``depth_node``, as under the console script (which then ends the process at once after
    its shutdown). The one way benchmarks and checks start the node.
    """
    setup = Path(__file__).resolve().parents[1] / 'setup.py'
    match = re.search(r"'depth_node\s*=\s*([\w.]+):(\w+)'", setup.read_text(encoding='utf-8'))
    if match is None:
        raise RuntimeError(f'{setup} declares no depth_node console script')
    module, function = match.groups()
    return [sys.executable, '-c', f'import sys; sys.argv[0] = "depth_node"; '
                                  f'from {module} import {function}; sys.exit({function}())']
