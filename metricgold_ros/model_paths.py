"""Where the bundled model lives, found without importing torch or ament at module import."""

from pathlib import Path
from typing import List, Optional

PACKAGE = 'metricgold_ros'
BUNDLED_MODEL = 'metricgold-tiny'
README_MODEL_SECTION = 'README.md, section "Model"'


def bundled_model_candidates() -> List[Path]:
    """Folders that may hold the bundled model, in the order they are tried.

    First beside this module (a source checkout, ``pip install`` and ``colcon build`` all put
    ``models/`` there as package data), then the package's ament share directory when an ament
    index is on the path (a colcon install that placed the model under ``share/``).
    """
    candidates = [Path(__file__).resolve().parent / 'models' / BUNDLED_MODEL]
    try:
        from ament_index_python.packages import (  # imported late: optional, ROS only
            PackageNotFoundError, get_package_share_directory)
    except ImportError:
        return candidates
    try:
        share = Path(get_package_share_directory(PACKAGE))
    except (PackageNotFoundError, LookupError, ValueError, OSError):
        return candidates
    candidates.append(share / 'models' / BUNDLED_MODEL)
    return candidates


def bundled_model_path() -> Optional[Path]:
    """The bundled model folder when one is installed (has ``model_index.json``), else None."""
    for folder in bundled_model_candidates():
        if (folder / 'model_index.json').is_file():
            return folder
    return None


def bundled_model_notice(path: Path, option: str) -> str:
    """The one line that says the bundled model is in use, and what it is."""
    return (f'{option} not set: using the bundled model {BUNDLED_MODEL} ({path}), a small model '
            'trained on synthetic rooms and streets for demos and tests, not for real '
            f'decisions (see its MODEL_CARD.md); set {option} for a real checkpoint')


def missing_model_message(parameter: str = 'model_path') -> str:
    """What to tell a user who started without a model: the parameter, the command, the doc."""
    looked = ', '.join(str(path) for path in bundled_model_candidates())
    return (f'{parameter} is not set and no bundled model is installed (looked in {looked}). '
            'Create one with `metricgold init-model DIR --tiny` (untrained, for smoke tests) or '
            f'download a trained MetricGold checkpoint, then pass -p {parameter}:=DIR; see '
            f'{README_MODEL_SECTION}.')
