"""The README's two commands are the ones the Makefile and CI run."""

import re
import subprocess
import sys

from conftest import REPO_ROOT


def _readme_commands():
    text = (REPO_ROOT / 'README.md').read_text()
    quick_start = text.split('## Quick start', 1)[1].split('\n## ', 1)[0]
    block = re.search(r'```bash\n(.*?)```', quick_start, re.S).group(1)
    return [line.split('#')[0].strip() for line in block.splitlines() if line.strip()]


def test_readme_gives_exactly_the_two_commands():
    assert _readme_commands() == ['make demo', 'make test']


def test_ci_runs_the_readme_test_command():
    lines = [line.strip() for line in (REPO_ROOT / '.ci' / 'run').read_text().splitlines()
             if line.strip() and not line.lstrip().startswith('#')]
    assert 'make test' in lines


def test_make_targets_set_up_the_venv_and_run_pytest_and_the_demo():
    dry = subprocess.run(['make', '-n', '-B', 'test', 'demo'], cwd=REPO_ROOT, text=True,
                         capture_output=True, check=True).stdout
    assert 'python3 -m venv .venv' in dry
    assert 'pip install --quiet torch==2.13.0' in dry
    assert '-m pytest' in dry and ' test' in dry
    assert '-m metricgold_ros.synthetic.demo' in dry


def test_console_scripts_are_in_the_venv():
    bin_dir = REPO_ROOT / '.venv' / 'bin'
    if not sys.prefix.startswith(str(REPO_ROOT / '.venv')):
        import pytest

        pytest.skip('tests are not running from the repository venv')
    assert (bin_dir / 'metricgold').exists() and (bin_dir / 'depth_node').exists()
