"""config/fastdds_large_data.xml: what it must hold for large messages, and who applies it
(``ros_env.with_large_data_profile`` for the demo and benchmarks; the launch file checks the
same variable). No ROS needed."""

import xml.etree.ElementTree as ET
from pathlib import Path

from metricgold_ros.ros_env import (PROFILE_ENV, large_data_profile,
                                    with_large_data_profile)

REPO = Path(__file__).resolve().parents[1]
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
