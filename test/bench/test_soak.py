"""CI soak: bench/soak.py for 30 seconds (a 30 Hz camera against a depth_node process) with
the bounds of the 10-minute run in bench/SOAK.md: RSS growth < 5 %, thread count flat,
latency p99 flat (last window vs first), and every frame accounted for."""

import json
import subprocess
import sys

import pytest

pytest.importorskip('rclpy')

from ros_helpers import REPO_ROOT, ros_env  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]

DURATION_S, WARMUP_S, WINDOW_S = 30, 6, 8
# The shared 2-core CI machine stalls processes for a few hundred ms at times: the absolute
# slack of the p99 comparison is wider here than in the 10-minute run (50 ms).
P99_RATIO, P99_SLACK_MS = 1.5, 300.0


def test_soak_30s(tiny_model_dir, tmp_path, capsys):
    report_path = tmp_path / 'soak.json'
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / 'bench' / 'soak.py'), '--duration', str(DURATION_S),
         '--warmup', str(WARMUP_S), '--window', str(WINDOW_S), '--model', str(tiny_model_dir),
         '--processing-resolution', '128', '--max-p99-ratio', str(P99_RATIO),
         '--p99-slack-ms', str(P99_SLACK_MS), '--json', str(report_path)],
        env=ros_env(), cwd=REPO_ROOT, capture_output=True, text=True, timeout=140)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(report_path.read_text())
    frames, proc, bounds = report['frames'], report['node_process'], report['bounds']
    windows = report['latency_windows']
    with capsys.disabled():
        print(f'\n[soak {DURATION_S}s] frames sent {frames["sent"]}, node in '
              f'{frames["node_received"]} / out {frames["node_published"]} / dropped '
              f'{frames["node_dropped"]}; p50/p99 ms per {WINDOW_S}s window: '
              + ', '.join(f'{w["latency_p50_ms"]}/{w["latency_p99_ms"]}' for w in windows)
              + f'; RSS {proc["rss_mb_start"]} -> {proc["rss_mb_end"]} MB '
              f'({100 * proc["rss_growth"]:+.1f}%), threads {proc["threads_start"]} -> '
              f'{proc["threads_end"]}')
    assert bounds['rss_ok'], f'RSS grew {100 * proc["rss_growth"]:.1f}% (bound 5%)'
    assert bounds['threads_ok'], (proc['threads_start'], proc['threads_end'])
    assert bounds['p99_ok'], f'p99 not flat: {bounds["p99_first_ms"]} -> ' \
        f'{bounds["p99_last_ms"]} ms'
    assert len(windows) >= 2 and all(w['frames_out'] > 0 for w in windows), windows
    # Every frame is accounted for: received by the node (reliable transport), then
    # published, dropped in the mailbox for a newer one, or skipped before this test's
    # subscriptions matched; nothing failed.
    assert frames['node_received'] == frames['sent'], frames
    assert frames['node_errors'] == 0 and frames['node_inference_failures'] == 0, frames
    assert abs(frames['node_received'] - frames['node_published'] - frames['node_dropped']
               - frames['node_idle']) <= 1, frames
    # (Reliable keep-last-5 over loopback UDP loses a few outputs under load: bench/SOAK.md.)
    assert frames['received_here']['depth/image'] >= 0.9 * frames['node_published'], frames
    assert proc['exit_code'] == 0
