"""The node section of the GPU device check: ``depth_node`` behind a 30 Hz camera over DDS.

Saves the model under test (``save_checkpoint``) to a scratch folder, starts the
``depth_node`` console script's entry point (as this checkout's setup.py declares it, with this
interpreter: the package need not be installed) with ``-p device:=cuda -p dtype:=float16``,
and the synthetic camera
process (640x480 at 30 Hz) on loopback DDS in a free domain, with the transport the soak test
uses (reliable publishers and subscriptions: loopback-only Fast DDS uses UDP, where large
best-effort frames are lost under load). Subscribes here (``bench/soak.py``'s ``Listener``),
and after a warm-up measures for ``--node-seconds``: frames published per second, stamp ->
publish p50/p95 as the node reports it (``/diagnostics``), stamp -> received here, and the GPU
memory the node process adds (device-wide used memory, sampled, minus the level before the
node started; on a CPU its peak RSS instead).
"""

import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
CAMERA_SIZE = '640x480'
CAMERA_RATE_HZ = 30.0


class MemorySampler(threading.Thread):
    """Peak device-wide used GPU memory (or the node's RSS on a CPU) every 0.2 s."""

    def __init__(self, device: Any, pid: int) -> None:
        super().__init__(name='gpu-check-memory', daemon=True)
        self.device = device
        self.pid = pid
        self.peak_bytes = 0
        self.samples = 0
        self.stop = threading.Event()

    def used_bytes(self) -> int:
        if self.device.type == 'cuda':
            import torch
            free, total = torch.cuda.mem_get_info(self.device)
            return total - free
        from soak import proc_status
        return int(proc_status(self.pid)['rss_mb'] * 2 ** 20)

    def run(self) -> None:
        while not self.stop.wait(0.2):
            try:
                self.peak_bytes = max(self.peak_bytes, self.used_bytes())
                self.samples += 1
            except (OSError, RuntimeError, ValueError, IndexError, KeyError):
                return  # the process is gone


def _listener() -> Any:
    """``bench/soak.py``'s Listener, also keeping every diagnostics snapshot with its time."""
    import soak

    class Listener(soak.Listener):
        def __init__(self) -> None:
            self.history: List[Tuple[float, Dict[str, str]]] = []
            super().__init__()

        def _on_diagnostics(self, msg: Any) -> None:
            super()._on_diagnostics(msg)
            with self.lock:
                if self.diagnostics and (not self.history
                                         or self.history[-1][1] != self.diagnostics):
                    self.history.append((time.monotonic(), dict(self.diagnostics)))

    return Listener()


def node_figures(history: List[Tuple[float, Dict[str, str]]], begin: float, end: float
                 ) -> Dict[str, Any]:
    """The node's own figures over [begin, end] from its diagnostics snapshots.

    Frames published and dropped are counter differences between the first snapshot at or
    after ``begin`` and the last one before ``end`` + 2.5 s (one stats period late), divided by
    the time between the two; p50 is the median of the periods' p50s, p95 the worst period's.
    """
    inside = [(t, d) for t, d in history if begin <= t <= end + 2.5]
    if len(inside) < 2:
        return {'snapshots': len(inside)}
    (t0, first), (t1, last) = inside[0], inside[-1]
    periods = [d for _, d in inside[1:]]
    p50s = [v for v in (_float(d, 'latency p50 (ms)') for d in periods) if v is not None]
    p95s = [v for v in (_float(d, 'latency p95 (ms)') for d in periods) if v is not None]
    return {
        'snapshots': len(inside), 'seconds': round(t1 - t0, 1),
        'frames_per_s_published': round(
            (_int(last, 'frames published') - _int(first, 'frames published')) / (t1 - t0), 2),
        'frames_dropped': _int(last, 'frames dropped') - _int(first, 'frames dropped'),
        'errors': _int(last, 'errors') - _int(first, 'errors'),
        'stamp_to_publish_ms': {
            'p50': round(float(np.median(p50s)), 1) if p50s else None,
            'p95': round(max(p95s), 1) if p95s else None},
        'stage_ms_last_period': {k[:-5]: _float(last, k) for k in last
                                 if k.endswith(' (ms)') and not k.startswith('latency')}}


def _node_command(model: Path, cuda: bool, resolution: int, namespace: str) -> List[str]:
    from metricgold_ros.ros_env import depth_node_command

    return depth_node_command() + [
        '--ros-args', '--params-file', str(REPO_ROOT / 'config' / 'depth.yaml'),
        '-p', f'model_path:={model}', '-p', f"device:={'cuda' if cuda else 'cpu'}",
        '-p', f"dtype:={'float16' if cuda else 'float32'}",
        '-p', f'processing_resolution:={resolution}', '-p', 'qos:=reliable',
        '-p', 'output_qos:=reliable', '-p', 'stats_period:=2.0', '-r', f'__ns:={namespace}',
        '-r', 'image:=camera/image_raw', '-r', 'camera_info:=camera/camera_info']


def _percentiles(values: List[float]) -> Dict[str, Any]:
    if not values:
        return {'p50': None, 'p95': None}
    return {'p50': round(float(np.percentile(values, 50)), 1),
            'p95': round(float(np.percentile(values, 95)), 1)}


def section_node(check: Any) -> Dict[str, Any]:
    """The node end to end (see the module docstring)."""
    env_report = check.report['sections']['environment']
    if not env_report.get('rclpy', {}).get('ok'):
        return {'status': 'skipped', 'skipped': ['rclpy does not import (see environment)']}
    import torch

    import soak
    from metricgold_ros.model.checkpoint import save_checkpoint
    from metricgold_ros.ros_env import free_domain_id, loopback_env, use_loopback

    cuda = check.device.type == 'cuda'
    if cuda:  # the node's dtype and layout; the checkpoint keeps them afterwards
        for module in (check.checkpoint.unet, check.checkpoint.vae):
            module.to(dtype=torch.float16, memory_format=torch.contiguous_format)
    scratch = Path(tempfile.mkdtemp(prefix='gpu-check-node-'))
    out: Dict[str, Any] = {'camera': {'size': CAMERA_SIZE, 'rate_hz': CAMERA_RATE_HZ,
                                      'qos': 'reliable'},
                           'node': {'device': 'cuda' if cuda else 'cpu',
                                    'dtype': 'float16' if cuda else 'float32',
                                    'processing_resolution': check.args.resolution}}
    node = camera = listener = sampler = None
    try:
        start = time.monotonic()
        model = save_checkpoint(scratch / 'model', check.checkpoint)
        out['model_save_s'] = round(time.monotonic() - start, 1)
        use_loopback(domain_id=free_domain_id())  # this process's listener, and the children
        env = loopback_env()
        env['PYTHONUNBUFFERED'] = '1'
        env['PYTHONPATH'] = str(REPO_ROOT) + (':' + env['PYTHONPATH']
                                              if env.get('PYTHONPATH') else '')
        out['ros_domain_id'] = int(env['ROS_DOMAIN_ID'])
        if cuda:
            torch.cuda.empty_cache()
            baseline = torch.cuda.mem_get_info(check.device)
            baseline_used = baseline[1] - baseline[0]
        command = _node_command(model, cuda, check.args.resolution, soak.NS)
        out['node_command'] = ' '.join(command[:3]) + ' --ros-args ...'
        node = soak._spawn(command, env, scratch / 'node.log')
        camera = soak._spawn(soak.camera_command(CAMERA_RATE_HZ, CAMERA_SIZE), env,
                             scratch / 'camera.log')
        check.children += [node, camera]
        sampler = MemorySampler(check.device, node.pid)
        sampler.start()
        listener = _listener()
        warmup_s = 1.0 if check.tiny else 5.0
        deadline = time.monotonic() + max(5.0, check.budget.section_left() - warmup_s
                                          - check.args.node_seconds - 15.0)
        _wait_first_depth(listener, node, camera, deadline)
        out['first_depth_after_s'] = round(time.monotonic() - start, 1)
        time.sleep(warmup_s)
        out.update(_measure(listener, check.args.node_seconds, out['node']))
        if cuda:
            out['gpu_memory_peak_gib'] = round((sampler.peak_bytes - baseline_used) / 2**30, 2)
            out['gpu_memory_note'] = ('device-wide used memory sampled every 0.2 s minus the '
                                      'level before the node started (CUDA context included)')
        else:
            out['node_rss_peak_mb'] = round(sampler.peak_bytes / 2**20, 1)
    finally:
        if sampler is not None:
            sampler.stop.set()
        logs = {}
        for name, proc in (('camera', camera), ('node', node)):
            if proc is not None:
                logs[name] = soak._stop(proc).splitlines()[-4:]
        out['log_tails'] = logs
        check.report['sections']['node']['log_tails'] = logs  # kept when this raises
        if listener is not None:
            listener.close()
        shutil.rmtree(scratch, ignore_errors=True)
    return out


def _wait_first_depth(listener: Any, node: Any, camera: Any, deadline: float) -> None:
    while not listener.depth:
        if node.poll() is not None or camera.poll() is not None:
            raise RuntimeError('the node or the camera exited before the first depth image')
        if time.monotonic() > deadline:
            raise RuntimeError('no depth/image arrived within the section budget')
        time.sleep(0.05)


def _measure(listener: Any, seconds: float, node: Dict[str, Any]) -> Dict[str, Any]:
    """``seconds`` of depth received here and the node's own figures (into ``node``)."""
    begin = time.monotonic()
    time.sleep(seconds)
    end = time.monotonic()
    time.sleep(2.5)  # the node's next diagnostics cover the measured period
    with listener.lock:
        depth = [(t, ms) for t, ms in listener.depth if begin <= t < end]
        history = list(listener.history)
        counts = dict(listener.counts)
    node.update(node_figures(history, begin, end))
    return {'measured_s': round(end - begin, 1),
            'frames_per_s_received': round(len(depth) / (end - begin), 2),
            'stamp_to_received_ms': _percentiles([ms for _, ms in depth]),
            'received_here': counts,
            'node_diagnostics_last': history[-1][1] if history else None}


def _int(values: Dict[str, str], key: str) -> int:
    try:
        return int(values.get(key, 0))
    except ValueError:
        return 0


def _float(values: Dict[str, str], key: str) -> Any:
    try:
        return float(values[key])
    except (KeyError, ValueError):
        return None
