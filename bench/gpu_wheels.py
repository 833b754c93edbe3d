"""Slim the wheels carried to the GPU machine: one copy of each duplicated shared library.

Wheels cannot hold symbolic links, so the ROS 2 wheels ship ``libfastdds.so``,
``libfastdds.so.3.2`` and ``libfastdds.so.3.2.2`` as three identical 19 MB files. Only the
name the other libraries link against (the soname, here ``libfastdds.so.3.2``) is needed at
run time. For each group of byte-identical ``lib*.so*`` files in a wheel's data folder this
keeps the shortest *versioned* name (``libX.so.A`` before ``libX.so.A.B.C``; the soname in
every ROS wheel checked) and drops the rest from the archive and its RECORD, so that all the
wheels the device check needs fit in the device tool's 64 MiB beside the repository.

    python bench/gpu_wheels.py .whl      # after bash bench/gpu_check.sh --fetch-wheels
"""

import re
import sys
import zipfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

LIBRARY = re.compile(r'\.data/data/lib/(lib[^/]+\.so(\.\d+)*)$')


def _keep(names: List[str]) -> str:
    """The copy to keep: the shortest versioned name, else the shortest name."""
    versioned = [n for n in names if re.search(r'\.so\.\d', n)]
    return min(versioned or names, key=len)


def slim_wheel(path: Path) -> Tuple[int, int]:
    """Rewrite ``path`` without duplicate libraries; (entries dropped, bytes saved)."""
    with zipfile.ZipFile(path) as wheel:
        infos = wheel.infolist()
        groups: Dict[Tuple[int, int], List[str]] = {}
        for info in infos:
            if LIBRARY.search(info.filename):
                groups.setdefault((info.CRC, info.file_size), []).append(info.filename)
        drop = {name for names in groups.values() if len(names) > 1
                for name in names if name != _keep(names)}
        if not drop:
            return 0, 0
        saved = sum(i.compress_size for i in infos if i.filename in drop)
        tmp = path.with_name(path.name + '.tmp')
        with zipfile.ZipFile(tmp, 'w', zipfile.ZIP_DEFLATED) as out:
            for info in infos:
                if info.filename in drop:
                    continue
                data = wheel.read(info)
                if info.filename.endswith('.dist-info/RECORD'):
                    lines = data.decode().splitlines()
                    data = ('\n'.join(line for line in lines
                                      if line.split(',', 1)[0] not in drop) + '\n').encode()
                out.writestr(info, data)
    tmp.replace(path)
    return len(drop), saved


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or not Path(args[0]).is_dir():
        print('usage: python bench/gpu_wheels.py WHEEL_DIR', file=sys.stderr)
        return 2
    total = 0
    for path in sorted(Path(args[0]).glob('*.whl')):
        dropped, saved = slim_wheel(path)
        if dropped:
            print(f'{path.name}: {dropped} duplicate libraries dropped, {saved / 1e6:.1f} MB')
            total += saved
    print(f'saved {total / 1e6:.1f} MB')
    return 0


if __name__ == '__main__':
    sys.exit(main())
