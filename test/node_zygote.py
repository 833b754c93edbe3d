"""depth_node processes for tests, forked from a warm interpreter (a "zygote").

Importing torch and diffusers costs 3-10 s of CPU per process on the shared CI machine, more
than everything a start-up or shutdown test checks. The zygote imports them (and rclpy) once;
each node is then a ``fork()`` of it that restores the default signal handlers, takes the
given environment, sends stdout/stderr to files and calls :func:`metricgold_ros.node.main.main`
as the ``depth_node`` console script does (so it ends with the same ``os._exit``). Signals go
straight to the child's pid. test_node_process.py covers the console script itself. Linux only.
"""

import atexit
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

REPO_ROOT = Path(__file__).resolve().parents[1]

_SERVER = r'''
import json, os, signal, sys, time, traceback
import rclpy, sensor_msgs.msg, diagnostic_msgs.msg, torch  # the costly imports, once
from accelerate import init_empty_weights  # noqa: F401
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel  # noqa: F401
try:
    from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401
except ImportError:
    pass
from metricgold_ros import colorize, depth_frame, pointcloud  # noqa: F401
from metricgold_ros.node import main as node_main  # noqa: F401
from metricgold_ros.model import MetricGoldPipeline, load_checkpoint  # noqa: F401
children = set()
print(json.dumps({'ready': os.getpid()}), flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    if cmd['op'] == 'start':
        pid = os.fork()
        if pid == 0:
            code = 98
            try:
                signal.signal(signal.SIGINT, signal.default_int_handler)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                os.environ.clear()
                os.environ.update(cmd['env'])
                for fd, path in ((1, cmd['stdout']), (2, cmd['stderr'])):
                    out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                    os.dup2(out, fd)
                    os.close(out)
                sys.stdin = open(os.devnull)
                sys.argv = ['depth_node', *cmd['args']]
                code = node_main.main(cmd['args'], exit_process=True)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stderr.flush()
                os._exit(code)
        children.add(pid)
        reply = {'pid': pid}
    elif cmd['op'] == 'wait':
        deadline = time.monotonic() + cmd['timeout_s']
        reply = {'code': None}
        while True:
            done, status = os.waitpid(cmd['pid'], os.WNOHANG)
            if done:
                children.discard(done)
                reply = {'code': os.waitstatus_to_exitcode(status)}
                break
            if time.monotonic() > deadline:
                break
            time.sleep(0.01)
    print(json.dumps(reply), flush=True)
for pid in children:
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except OSError:
        pass
'''


class NodeProcess:
    """A forked depth_node: pid, its output files, signals and exit code."""

    def __init__(self, zygote: 'Zygote', pid: int, stdout: Path, stderr: Path) -> None:
        self.zygote, self.pid = zygote, pid
        self.stdout_path, self.stderr_path = stdout, stderr
        self.returncode: Optional[int] = None

    def send_signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait(self, timeout_s: float) -> Optional[int]:
        """The exit code, or None when the process still runs after ``timeout_s``."""
        if self.returncode is None:
            self.returncode = self.zygote.request({'op': 'wait', 'pid': self.pid,
                                                   'timeout_s': timeout_s})['code']
        return self.returncode

    def kill(self) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.wait(10.0)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors='replace') if self.stderr_path.exists() else ''


class Zygote:
    """The warm interpreter (one per test session, started on first use)."""

    _instance: Optional['Zygote'] = None

    def __init__(self, env: Dict[str, str]) -> None:
        self.proc = subprocess.Popen([sys.executable, '-c', _SERVER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env, cwd=REPO_ROOT)
        ready = self.proc.stdout.readline()
        if not ready.startswith('{"ready"'):
            raise RuntimeError(f'node zygote did not start: {ready!r}')

    @classmethod
    def get(cls, env: Dict[str, str]) -> 'Zygote':
        if cls._instance is None or cls._instance.proc.poll() is not None:
            cls._instance = cls(env)
            atexit.register(cls._instance.close)
        return cls._instance

    def request(self, command: dict) -> dict:
        self.proc.stdin.write(json.dumps(command) + '\n')
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def start(self, args: List[str], env: Dict[str, str], log_dir: Path,
              name: str = 'node') -> NodeProcess:
        """Fork a depth_node with ROS ``args`` (``['--ros-args', ...]``) and ``env``."""
        stdout, stderr = log_dir / f'{name}.stdout', log_dir / f'{name}.stderr'
        pid = self.request({'op': 'start', 'args': args, 'env': env, 'stdout': str(stdout),
                            'stderr': str(stderr)})['pid']
        return NodeProcess(self, pid, stdout, stderr)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        Zygote._instance = None


def start_node(args: List[str], env: Dict[str, str], log_dir: Path,
               name: str = 'node') -> NodeProcess:
    """A depth_node forked from the session's zygote (started with ``env`` if needed)."""
    return Zygote.get(env).start(args, env, log_dir, name)


def wait_for_text(process: NodeProcess, predicate, timeout_s: float) -> bool:
    """Poll the node's stderr until ``predicate(text)`` holds or the time is up."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate(process.stderr()):
            return True
        if process.wait(0.0) is not None:
            return predicate(process.stderr())
        time.sleep(0.05)
    return False
