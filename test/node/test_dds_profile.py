"""config/fastdds_large_data.xml: what it must hold for large messages, and who applies it
(``ros_env.with_large_data_profile`` for the demo and benchmarks; the launch file checks the
same variable). No ROS needed."""

import importlib.util
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from metricgold_ros.ros_env import (PROFILE_ENV, large_data_profile,
                                    with_large_data_profile)

REPO = Path(__file__).resolve().parents[2]
PROFILE = REPO / 'config' / 'fastdds_large_data.xml'
NS = {'dds': 'http://www.eprosima.com'}
CLOUD_1280X720_BYTES = 1280 * 720 * 16  # x, y, z, rgb float32 per point


def test_profile_gives_participants_large_shared_memory_plus_udp_only():
    root = ET.parse(PROFILE).getroot()
    transports = {t.findtext('dds:transport_id', namespaces=NS): t
                  for t in root.iterfind('.//dds:transport_descriptor', NS)}
    kinds = {name: t.findtext('dds:type', namespaces=NS) for name, t in transports.items()}
    assert sorted(kinds.values()) == ['SHM', 'UDPv4'], kinds
    shm = next(t for t in transports.values() if t.findtext('dds:type', namespaces=NS) == 'SHM')
    segment = int(shm.findtext('dds:segment_size', namespaces=NS))
    assert segment >= 32 * 2 ** 20 and segment >= 3 * CLOUD_1280X720_BYTES, segment
    participant = root.find('.//dds:participant', NS)
    assert participant.get('is_default_profile') == 'true'
    used = [e.text for e in participant.iterfind('.//dds:userTransports/dds:transport_id', NS)]
    assert sorted(used) == sorted(transports)
    assert participant.findtext('.//dds:useBuiltinTransports', namespaces=NS) == 'false'


def test_with_large_data_profile_sets_the_package_profile_and_keeps_the_users():
    assert large_data_profile() == PROFILE
    assert with_large_data_profile({}) == {PROFILE_ENV: str(PROFILE)}
    assert with_large_data_profile({PROFILE_ENV: ''}) == {PROFILE_ENV: str(PROFILE)}
    mine = {PROFILE_ENV: '/etc/my_profile.xml'}
    assert with_large_data_profile(mine) == {PROFILE_ENV: '/etc/my_profile.xml'}


def test_launch_file_applies_the_same_profile_unless_the_user_has_one():
    source = (REPO / 'launch' / 'depth.launch.py').read_text()
    assert f"PROFILE_ENV = '{PROFILE_ENV}'" in source
    assert "'fastdds_large_data.xml'" in source
    assert 'SetEnvironmentVariable(PROFILE_ENV' in source


def _launch_file():
    """launch/depth.launch.py as a module (needs the launch and launch_ros packages)."""
    launch = pytest.importorskip('launch', reason='launch is not installed (ros2cli wheels)')
    if not hasattr(launch, 'LaunchContext'):  # the repo's launch/ folder as a namespace package
        pytest.skip('launch is not installed (ros2cli wheels)')
    pytest.importorskip('launch_ros', reason='launch_ros is not installed (ros2cli wheels)')
    spec = importlib.util.spec_from_file_location('depth_launch', REPO / 'launch' /
                                                  'depth.launch.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return launch, module


def test_launch_file_sets_its_profile_only_when_the_user_has_none(monkeypatch, tmp_path):
    launch, module = _launch_file()
    context = launch.LaunchContext()
    monkeypatch.setenv(PROFILE_ENV, '/etc/mine.xml')
    kept = module._apply_dds_profile(context)
    assert [type(action).__name__ for action in kept] == ['LogInfo']
    monkeypatch.delenv(PROFILE_ENV)
    context.launch_configurations['dds_profile'] = str(PROFILE)
    (action,) = module._apply_dds_profile(context)
    action.execute(context)
    assert os.environ[PROFILE_ENV] == str(PROFILE)
    monkeypatch.delenv(PROFILE_ENV)
    context.launch_configurations['dds_profile'] = ''
    assert module._apply_dds_profile(context) == []
    context.launch_configurations['dds_profile'] = str(tmp_path / 'none.xml')
    with pytest.raises(RuntimeError, match='dds_profile:=.*does not exist'):
        module._apply_dds_profile(context)


def test_launch_file_refuses_rviz_true_without_rviz2(monkeypatch):
    launch, module = _launch_file()
    context = launch.LaunchContext()
    context.launch_configurations['rviz'] = 'false'
    assert module._check_rviz(context) == []
    monkeypatch.setattr(module, '_rviz_available', lambda: False)
    context.launch_configurations['rviz'] = 'True'
    with pytest.raises(RuntimeError, match='rviz2 is not installed'):
        module._check_rviz(context)
    monkeypatch.setattr(module, '_rviz_available', lambda: True)
    assert module._check_rviz(context) == []
