"""Markdown for BENCHMARKS.md from the GPU device check's report (``bench/gpu_check.py``)."""

from typing import Any, Dict, List, Optional


def _num(value: Any, digits: int = 1) -> str:
    if value is None:
        return '-'
    if isinstance(value, float):
        return f'{value:.{digits}f}'
    return str(value)


def _share(value: Optional[float]) -> str:
    return '-' if value is None else f'{100 * value:.1f} %'


def _header(report: Dict[str, Any]) -> List[str]:
    env = report['sections'].get('environment', {})
    torch_info = env.get('torch', {})
    gpu = env.get('gpu', {})
    smi = env.get('nvidia_smi', {})
    device = gpu.get('name') or 'no GPU: CPU rehearsal with the tiny model'
    lines = [f"### GPU device check: {device} ({report['started_utc']})", '',
             f"Machine: {device}, driver {smi.get('driver_version', '-')}, "
             f"{gpu.get('memory_gib', '-')} GiB; CPU {env.get('cpu', '-')} x "
             f"{env.get('cpu_count', '-')}; Python {env.get('python', '-')}, torch "
             f"{torch_info.get('version', '-')} (CUDA {torch_info.get('cuda', '-')}, cuDNN "
             f"{torch_info.get('cudnn', '-')}), diffusers {env.get('diffusers', '-')}, rclpy "
             f"{'yes' if env.get('rclpy', {}).get('ok') else 'missing'}.",
             f"Peak: {env.get('peak_source', '-')}; measured matrix product "
             f"{_num(env.get('measured_matmul_tflops'), 3)} TFLOP/s "
             f"({env.get('measured_matmul')}).",
             f"Run: {report.get('elapsed_s', '-')} s of a {report['budget_s']:.0f} s budget; "
             'sections: ' + ', '.join(f"{k} {v.get('status')}"
                                      for k, v in report['sections'].items()) + '.']
    model = report['sections'].get('model', {})
    if model.get('kind'):
        lines.append(f"Model: {model['kind']}, UNet {model.get('unet_parameters_m')} M, VAE "
                     f"{model.get('vae_parameters_m')} M parameters, processing resolution "
                     f"{model.get('processing_resolution')}.")
    for missing in env.get('missing', []):
        lines.append(f"Missing: {missing['what']} -> {missing['effect']} (fix: {missing['fix']}).")
    return lines


def _matrix(section: Dict[str, Any]) -> List[str]:
    lines = ['', f"#### Ours vs diffusers' MarigoldDepthPipeline (median of "
                 f"{section.get('repeats')} after {section.get('warmup')} warm-ups, "
                 'calls interleaved)', '',
             '| dtype | layout | input | steps | ensemble | ours ms | of which pre + post '
             '| diffusers ms | ours / diffusers | TFLOP | floor ms | share of floor '
             '| max abs log-depth diff | peak GiB |',
             '| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: '
             '| ---: | ---: |']
    for key, row in section.get('cells', {}).items():
        dtype, layout, size, steps, members = key.split('/')
        if 'error' in row:
            lines.append(f"| {dtype} | {layout} | {size} | {steps[1:]} | {members[1:]} | "
                         f"error: {row['error'][:80]} | | | | | | | | |")
            continue
        diff = row.get('max_abs_log_depth_diff')
        stages = row.get('stages_ms', {})
        edges = stages.get('preprocess', 0.0) + stages.get('postprocess', 0.0)
        lines.append(
            f"| {dtype} | {layout} | {size} | {steps[1:]} | {members[1:]} | "
            f"{_num(row['ours_ms'])} | {_num(edges, 2)} | {_num(row.get('diffusers_ms'))} | "
            f"{_num(row.get('ratio'), 3)} | {_num(row.get('tflop'), 3)} | "
            f"{_num(row.get('floor_ms'), 2)} | {_share(row.get('floor_share'))} | "
            f"{'-' if diff is None else f'{diff:.1e}'} | {_num(row.get('peak_memory_gib'), 2)} |")
    return lines


def _compiled(section: Dict[str, Any]) -> List[str]:
    lines = ['', f"#### torch.compile (UNet + VAE encoder/decoder; {section.get('dtype')}, "
                 f"channels-last, backend {section.get('backend')})", '',
             '| mode | input | steps | ensemble | first calls s (compile) | ms | share of floor |',
             '| --- | --- | ---: | ---: | ---: | ---: | ---: |']
    for mode, cells in section.get('modes', {}).items():
        for key, row in cells.items():
            _, _, size, steps, members = key.split('/')
            if 'error' in row:
                lines.append(f"| {mode} | {size} | {steps[1:]} | {members[1:]} | error: "
                             f"{row['error'][:80]} | | |")
                continue
            lines.append(f"| {mode} | {size} | {steps[1:]} | {members[1:]} | "
                         f"{_num(row.get('warmup_s'))} | {_num(row['ours_ms'])} | "
                         f"{_share(row.get('floor_share'))} |")
    return lines


def _node(section: Dict[str, Any]) -> List[str]:
    node = section.get('node', {})
    camera = section.get('camera', {})
    publish = node.get('stamp_to_publish_ms', {})
    received = section.get('stamp_to_received_ms', {})
    memory = (f"{_num(section.get('gpu_memory_peak_gib'), 2)} GiB GPU"
              if 'gpu_memory_peak_gib' in section
              else f"{_num(section.get('node_rss_peak_mb'))} MB RSS")
    return ['', f"#### Node end to end ({camera.get('size')} at {camera.get('rate_hz')} Hz, "
                f"{node.get('device')} {node.get('dtype')}, processing resolution "
                f"{node.get('processing_resolution')}, {section.get('measured_s')} s measured)",
            '', '| published frames/s | received frames/s | stamp -> publish p50 / p95 ms '
                '(node) | stamp -> received p50 / p95 ms | memory peak | dropped in node |',
            '| ---: | ---: | ---: | ---: | ---: | ---: |',
            f"| {_num(node.get('frames_per_s_published'), 2)} | "
            f"{_num(section.get('frames_per_s_received'), 2)} | {_num(publish.get('p50'))} / "
            f"{_num(publish.get('p95'))} | {_num(received.get('p50'))} / "
            f"{_num(received.get('p95'))} | {memory} | "
            f"{_num(node.get('frames_dropped'))} |"]


def _tuning(section: Dict[str, Any]) -> List[str]:
    lines = ['', f"#### Settings not in the pipeline yet ({section.get('cell')}, ours)", '',
             '| variant | ms | share of floor |', '| --- | ---: | ---: |']
    for name, row in section.get('variants', {}).items():
        lines.append(f"| {name} | {_num(row['ours_ms'])} | {_share(row.get('floor_share'))} |")
    return lines


def _transfers(section: Dict[str, Any]) -> List[str]:
    return ['', '#### One 640x480 frame across the bus (median ms)', '',
            '| up, uint8, pageable | up, pinned | down, float32 depth, pageable | down, pinned |',
            '| ---: | ---: | ---: | ---: |',
            f"| {_num(section.get('upload_pageable_ms'), 3)} | "
            f"{_num(section.get('upload_pinned_ms'), 3)} | "
            f"{_num(section.get('download_pageable_ms'), 3)} | "
            f"{_num(section.get('download_pinned_ms'), 3)} |"]


def markdown(report: Dict[str, Any]) -> str:
    """The whole report as markdown: header, one table per section, errors and skips."""
    lines = _header(report)
    sections = report['sections']
    for name, render in (('matrix', _matrix), ('tuning', _tuning), ('compiled', _compiled),
                         ('node', _node), ('transfers', _transfers)):
        if sections.get(name, {}).get('status') in ('ok', 'partial', 'interrupted'):
            lines += render(sections[name])
    notes = []
    for name, section in sections.items():
        if section.get('error'):
            notes.append(f"- {name}: {section['status']}: {section['error'][:300]}")
        if section.get('reason'):
            notes.append(f"- {name}: skipped: {section['reason']}")
        for skipped in section.get('skipped', []):
            notes.append(f'- {name}: skipped {skipped}')
    if notes:
        lines += ['', '#### Skipped and failed', ''] + notes
    return '\n'.join(lines) + '\n'
