"""Many bags at once: frames/s of local workers and a local Ray cluster against one process.

Writes ``--bags`` rosbag2 (mcap) camera bags of ``--frames`` 640x480 JPEG CompressedImage
frames (rendered indoor walks, CameraInfo beside each, as a recording holds them) and converts
the same bags four ways, each into a fresh folder:

- ``loop``: one child process, the model loaded once, the bags one after another through
  ``bag_convert.convert`` (what the workers run): the floor that worker processes are
  measured against; every mode runs torch on one thread per process (``OMP_NUM_THREADS=1``),
  so that the modes differ only in how many processes share the work;
- ``workers 1`` and ``workers 2``: ``metricgold bag IN OUT --workers N`` as a child process;
- ``ray 2 CPU actors``: ``metricgold bag IN OUT --ray local --cpus-per-worker 1 --workers 2``
  (a local Ray cluster, loopback only, started and stopped by the command).

Wall times of the child processes include everything a user waits for (interpreter, worker
start-up, model loads, Ray's start); ``steady frames/s`` divides the frames by the time from
the first bag's start to the last bag's end as the per-bag summaries report it. The per-stage
times (ms per frame, from the loop's summaries) show where a frame's time goes: decode, model,
colour image, cloud, messages, and the writer thread (serializing and storing, overlapping the
model).

    python bench/fleet.py --json fleet.json [--bags 8] [--frames 30] [--resolution 128]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from metricgold_ros.constants import PIPELINE_STAGES  # noqa: E402 - the model's stages

REPO_ROOT = Path(__file__).resolve().parents[1]


def write_bags(folder: Path, bags: int, frames: int, width: int, height: int) -> None:
    """``bags`` camera bags of ``frames`` JPEG frames each (one rendered walk, reused)."""
    import cv2
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    from metricgold_ros import messages
    from metricgold_ros.synthetic.scenes import camera_sequence

    store = get_typestore(Stores.ROS2_HUMBLE)
    types = messages.rosbags_types(store)
    samples = list(camera_sequence(7, 'indoor', frames, width, height))
    jpegs = [cv2.imencode('.jpg', cv2.cvtColor(s.rgb, cv2.COLOR_RGB2BGR))[1].tobytes()
             for s in samples]
    camera = samples[0].intrinsics
    compressed = store.types['sensor_msgs/msg/CompressedImage']
    import numpy as np

    for b in range(bags):
        with Writer(folder / f'drive_{b:02d}', version=8,
                    storage_plugin=StoragePlugin.MCAP) as writer:
            image = writer.add_connection('/cam/image_raw/compressed',
                                          'sensor_msgs/msg/CompressedImage', typestore=store)
            info = writer.add_connection('/cam/camera_info', 'sensor_msgs/msg/CameraInfo',
                                         typestore=store)
            for i, data in enumerate(jpegs):
                stamp_ns = 1_700_000_000_000_000_000 + b * 10**12 + i * 33_333_333
                header = messages.header_msg(types, stamp_ns, 'cam_optical')
                writer.write(info, stamp_ns, store.serialize_cdr(
                    messages.camera_info_msg(types, header, camera),
                    'sensor_msgs/msg/CameraInfo'))
                msg = compressed(header=header, format='rgb8; jpeg compressed bgr8',
                                 data=np.frombuffer(data, np.uint8))
                writer.write(image, stamp_ns, store.serialize_cdr(
                    msg, 'sensor_msgs/msg/CompressedImage'))


def common_flags(model: Path, resolution: int) -> List[str]:
    return ['--model', str(model), '--processing-resolution', str(resolution),
            '--points-stride', '2']


def run_loop(inputs: Path, out: Path, model: Path, resolution: int) -> Dict[str, Any]:
    """The loop in a child process started like the CLI's (``OMP_NUM_THREADS=1``)."""
    result = out.with_suffix('.json')
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS='1')
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, '--loop-child', str(inputs), str(out), str(model),
         str(resolution), str(result)], env=env, cwd=REPO_ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f'loop failed ({proc.returncode}): {proc.stderr[-2000:]}')
    data = json.loads(result.read_text())
    data['wall_s'] = time.perf_counter() - start
    data['fps_wall'] = data['frames'] / data['wall_s']
    return data


def loop_child(inputs: Path, out: Path, model: Path, resolution: int) -> Dict[str, Any]:
    """The bags one after another in this process, the model loaded once (1 thread)."""
    from metricgold_ros.tools import bag, bag_convert, fleet
    from metricgold_ros.tools.fleet_workers import job_settings, load_worker_pipeline

    parser = argparse.ArgumentParser()
    bag.add_arguments(parser)
    args = parser.parse_args([str(inputs), str(out), *common_flags(model, resolution)])
    settings = job_settings(args)
    template = bag.job_from_args(args)
    start = time.perf_counter()
    pipeline, load_s = load_worker_pipeline(settings, threads=1)
    summaries = []
    out.mkdir()
    for job in fleet.plan_jobs([str(inputs)], str(out)):
        one = template.for_bag(job.input, job.output, quiet=True)
        begin = time.time()
        result = bag_convert.convert(one, pipeline=pipeline)
        result.raise_failures()
        summaries.append(result.summary())
        summaries[-1].update(started_at=begin, finished_at=time.time())
    wall_s = time.perf_counter() - start
    frames = sum(s['frames'] for s in summaries)
    return {'mode': 'loop (1 process)', 'wall_s': wall_s, 'frames': frames,
            'fps_wall': frames / wall_s, 'fps_steady': steady_fps(summaries),
            'model_load_s': load_s, 'per_bag': summaries}


def steady_fps(per_bag: List[Dict[str, Any]]) -> float:
    """Frames over the span from the first bag's start to the last bag's end."""
    span = max(s['finished_at'] for s in per_bag) - min(s['started_at'] for s in per_bag)
    return sum(s['frames'] for s in per_bag) / span


def run_cli(inputs: Path, out: Path, model: Path, resolution: int, name: str,
            extra: List[str]) -> Dict[str, Any]:
    """``metricgold bag INPUTS OUT ...`` as a child process; its summary and wall time."""
    summary_path = out.with_suffix('.json')
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS='1')
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, '-m', 'metricgold_ros.tools.cli', 'bag', str(inputs), str(out),
         *common_flags(model, resolution), '--quiet', '--summary-json', str(summary_path),
         *extra], env=env, cwd=REPO_ROOT, capture_output=True, text=True)
    wall_s = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f'{name} failed ({proc.returncode}): {proc.stderr[-2000:]}')
    data = json.loads(summary_path.read_text())
    per_bag = [b['summary'] for b in data['per_bag']]
    return {'mode': name, 'wall_s': wall_s, 'frames': data['frames'],
            'fps_wall': data['frames'] / wall_s, 'fps_steady': steady_fps(per_bag),
            'driver_s': data['seconds'], 'workers': data['workers'], 'per_bag': per_bag}


def stage_ms(per_bag: List[Dict[str, Any]]) -> Dict[str, float]:
    """Milliseconds per frame of each stage, summed over the bags."""
    frames = sum(s['frames'] for s in per_bag)
    totals: Dict[str, float] = {}
    for s in per_bag:
        for stage, seconds in s['stages_s'].items():
            totals[stage] = totals.get(stage, 0.0) + seconds
    return {k: round(1000 * v / frames, 2) for k, v in sorted(totals.items())}


def main(argv: Any = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--bags', type=int, default=8)
    parser.add_argument('--frames', type=int, default=30)
    parser.add_argument('--resolution', type=int, default=128,
                        help='processing resolution (long side, px) of the tiny model')
    parser.add_argument('--model', help='checkpoint folder (default: a fresh tiny model)')
    parser.add_argument('--modes', default='loop,workers1,workers2,ray2',
                        help='comma-separated subset of loop, workers1, workers2, ray2')
    parser.add_argument('--json', help='write the results here')
    parser.add_argument('--loop-child', nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.loop_child:
        inputs, out, model, resolution, result = args.loop_child
        data = loop_child(Path(inputs), Path(out), Path(model), int(resolution))
        Path(result).write_text(json.dumps(data))
        return 0
    work = Path(tempfile.mkdtemp(prefix='fleet-bench-'))
    try:
        if args.model:
            model = Path(args.model)
        else:
            from metricgold_ros.tools.cli import main as cli

            model = work / 'tiny'
            cli(['init-model', str(model), '--tiny'])
        inputs = work / 'in'
        inputs.mkdir()
        start = time.perf_counter()
        write_bags(inputs, args.bags, args.frames, 640, 480)
        args.input_bytes = sum(f.stat().st_size for f in inputs.rglob('*') if f.is_file())
        print(f'wrote {args.bags} bags x {args.frames} frames in '
              f'{time.perf_counter() - start:.1f} s', file=sys.stderr)
        load_before = os.getloadavg()
        results = []
        for mode in args.modes.split(','):
            out = work / f'out_{mode}'
            if mode == 'loop':
                results.append(run_loop(inputs, out, model, args.resolution))
            elif mode.startswith('workers'):
                results.append(run_cli(inputs, out, model, args.resolution,
                                       f'--workers {mode[7:]}', ['--workers', mode[7:]]))
            elif mode == 'ray2':
                results.append(run_cli(inputs, out, model, args.resolution,
                                       '--ray local, 2 CPU actors',
                                       ['--ray', 'local', '--cpus-per-worker', '1',
                                        '--workers', '2']))
            results[-1]['output_bytes_per_frame'] = round(
                sum(f.stat().st_size for f in out.rglob('*') if f.is_file())
                / results[-1]['frames'])
            print(f'{results[-1]["mode"]}: {results[-1]["fps_wall"]:.2f} frames/s',
                  file=sys.stderr)
            shutil.rmtree(out, ignore_errors=True)
        report(results, args, load_before, os.getloadavg())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def report(results: List[Dict[str, Any]], args: argparse.Namespace, load_before: Any,
           load_after: Any) -> None:
    """Print the table (markdown) and write the JSON."""
    base = next((r for r in results if r['mode'].startswith('loop')), None)
    print(f'\n{args.bags} bags x {args.frames} frames, 640x480 JPEG, tiny model at '
          f'{args.resolution} px; load average {load_before[0]:.1f} before, '
          f'{load_after[0]:.1f} after\n')
    print('| mode | wall s | frames/s (wall) | frames/s (steady) | vs loop (wall) |')
    print('| --- | ---: | ---: | ---: | ---: |')
    for r in results:
        ratio = f'{r["fps_wall"] / base["fps_wall"]:.2f}x' if base else '-'
        print(f'| {r["mode"]} | {r["wall_s"]:.1f} | {r["fps_wall"]:.2f} | '
              f'{r["fps_steady"]:.2f} | {ratio} |')
    for r in results:
        r['stage_ms_per_frame'] = stage_ms(r['per_bag'])
        model_ms = sum(v for k, v in r['stage_ms_per_frame'].items() if k in PIPELINE_STAGES)
        r['model_ms_per_frame'] = round(model_ms, 2)
    print('\nms per frame by stage:')
    for r in results:
        stages = ', '.join(f'{k} {v}' for k, v in r['stage_ms_per_frame'].items())
        print(f'- {r["mode"]}: {stages} (model {r["model_ms_per_frame"]})')
    if args.json:
        for r in results:
            r.pop('per_bag')
        data = {'bags': args.bags, 'frames_per_bag': args.frames, 'size': '640x480',
                'input_bytes_per_frame': round(args.input_bytes / (args.bags * args.frames)),
                'processing_resolution': args.resolution, 'cpu_count': os.cpu_count(),
                'load_average_before': load_before, 'load_average_after': load_after,
                'results': results}
        Path(args.json).write_text(json.dumps(data, indent=1) + '\n')


if __name__ == '__main__':
    sys.exit(main())
