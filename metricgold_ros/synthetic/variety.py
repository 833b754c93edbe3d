"""Training variety: views and scenes that ``render_sample`` never draws (issue 24).

``scenes.render_sample`` is the generator's own distribution; the model card's selection and
held-out splits are drawn from it, so it stays exactly as it is. ``render_varied`` widens it for
training only, where the bundled model failed:

* rooms: 35 % get walls, floor or ceiling in colours the room palette rarely makes (sky blue,
  street grey, brick, dark); poses with pitch -34..+23 deg, eye height 0.3-2.4 m and a
  heading within 115 deg of the room's centre; 15 % are close-ups of a wall, square on within
  17 deg, 0.5-3 m away; 0-12 extra boxes (10-70 cm) on the floor as clutter;
* walls (``wall_share`` of the indoor frames, 15 % unless asked): ``scenes.wall_scene``'s
  plane, 0.5-12 m away, turned up to 29 deg, with 0-4 boxes in front: flat depth with steps
  against it, the scene a border artefact shows on;
* streets: pitch -20..+9 deg, eye height 0.5-3 m, heading within 46 deg of the street, and
  30 % with recoloured facades;
* a horizontal field of view of 50-100 deg, so that training windows of 0.8-1.0 of the frame
  (``data.scale_range`` [1.0, 1.25]) see 45-90 deg, as the evaluation does.

Each frame is a function of (seed, kind) on a random stream of its own.
"""

from __future__ import annotations

import math

import numpy as np

from metricgold_ros.errors import InputError
from metricgold_ros.synthetic.scenes import (
    CameraPose, Sample, Scene, check_scene_args, make_scene, path_position, render_view,
    wall_scene)
from metricgold_ros.synthetic.shading import NOISE, PLAIN, STRIPES, WINDOWS, Material

_STREAM = 7  # the generator's own streams are 0-2
WALL_SHARE = 0.15  # indoor frames that are a plane with boxes in front (default)
CLEARANCE_M = 0.3  # the camera stays this far outside every box


def render_varied(seed: int, kind: str = 'indoor', width: int = 640, height: int = 480,
                  wall_share: float = WALL_SHARE) -> Sample:
    """One training frame of ``kind`` from the widened distribution above; ``wall_share`` of
    the indoor frames are walls."""
    if not 0.0 <= wall_share <= 1.0:
        raise InputError(f'wall_share={wall_share!r} must be within 0..1')
    rng = np.random.default_rng([seed, check_scene_args(kind, width, height, seed), _STREAM])
    hfov = math.radians(rng.uniform(50.0, 100.0))
    f_px = width / 2 / math.tan(hfov / 2)
    du, dv = rng.uniform(-0.03, 0.03, 2).tolist()
    intrinsics = (f_px, f_px, (width - 1) / 2 + du * width, (height - 1) / 2 + dv * height)
    if kind == 'outdoor':
        scene, pose = _street(seed, rng)
    elif rng.random() < wall_share:
        scene, pose = _wall(rng)
    else:
        scene, pose = _room(seed, rng)
    return render_view(scene, pose, intrinsics, width, height, seed=seed)


def _palette(rng: np.random.Generator) -> tuple[float, float, float]:
    """A colour outside the usual room palette: sky, street grey, brick or dark."""
    choice = int(rng.integers(4))
    if choice == 0:
        return tuple(rng.uniform([0.45, 0.6, 0.85], [0.7, 0.85, 1.0]).tolist())
    if choice == 1:
        grey = float(rng.uniform(0.2, 0.5))
        return (grey, grey, min(grey * 1.05, 1.0))
    if choice == 2:
        return tuple(rng.uniform([0.5, 0.2, 0.15], [0.75, 0.35, 0.3]).tolist())
    return tuple(rng.uniform(0.05, 0.25, 3).tolist())


def _material(rng: np.random.Generator, unusual: bool = False) -> Material:
    color = _palette if unusual else (lambda r: tuple(r.uniform(0.1, 0.9, 3).tolist()))
    return Material(color(rng), color(rng), int(rng.choice([PLAIN, NOISE, STRIPES])),
                    float(rng.uniform(0.05, 0.8)))


def _add_box(scene: Scene, lo, hi, material: Material) -> None:
    scene.materials.append(material)
    index = len(scene.materials) - 1
    scene.box_lo_m = np.vstack([scene.box_lo_m, np.asarray(lo, float)[None]])
    scene.box_hi_m = np.vstack([scene.box_hi_m, np.asarray(hi, float)[None]])
    scene.face_material = np.concatenate([scene.face_material, np.full((1, 3, 2), index)])
    scene.inside = np.append(scene.inside, False)


def _clear(scene: Scene, position: np.ndarray) -> bool:
    """Whether ``position`` is at least ``CLEARANCE_M`` outside every (not inside) box."""
    solid = ~scene.inside
    gap = np.maximum(scene.box_lo_m[solid] - position, position - scene.box_hi_m[solid])
    return bool((np.linalg.norm(np.maximum(gap, 0.0), axis=1) >= CLEARANCE_M).all())


def _room(seed: int, rng: np.random.Generator) -> tuple[Scene, CameraPose]:
    scene = make_scene(seed, 'indoor')
    size = scene.box_hi_m[0]  # the room is box 0: floor material 0, walls 1, ceiling 2
    if rng.random() < 0.35:
        for index in range(3):
            if rng.random() < 0.6:
                scene.materials[index] = Material(
                    _palette(rng), _palette(rng), scene.materials[index].pattern,
                    scene.materials[index].scale_m)
    for _ in range(int(rng.integers(0, 13))):
        w, d, h = rng.uniform([0.1, 0.1, 0.1], [0.7, 0.7, 1.2])
        x0, z0 = rng.uniform(0.0, 1.0, 2) * (size[[0, 2]] - [w, d])
        _add_box(scene, (x0, 0.0, z0), (x0 + w, h, z0 + d), _material(rng, rng.random() < 0.3))
    for _ in range(20):
        pose = _close_up(rng, size) if rng.random() < 0.15 else _room_view(rng, scene, size)
        if _clear(scene, np.asarray(pose.position_m)):
            return scene, pose
    return scene, _room_view(rng, scene, size, eye_m=size[1] - 0.2)  # above the furniture


def _room_view(rng: np.random.Generator, scene: Scene, size: np.ndarray,
               eye_m: float | None = None) -> CameraPose:
    """A point of the room's walking loop, facing the room within 115 deg, a wide range of
    pitch and height."""
    x_m, z_m = path_position(scene, rng)
    towards = math.atan2(scene.path[1] - x_m, scene.path[2] - z_m)
    eye = float(rng.uniform(0.3, min(2.4, size[1] - 0.2))) if eye_m is None else eye_m
    return CameraPose((x_m, eye, z_m), towards + float(rng.uniform(-2.0, 2.0)),
                      float(rng.uniform(-0.6, 0.4)), float(rng.uniform(-0.1, 0.1)))


def _close_up(rng: np.random.Generator, size: np.ndarray) -> CameraPose:
    """0.5-3 m in front of one of the four walls, facing it within 17 deg."""
    wall = int(rng.integers(4))
    axis, far_side = (0, 2)[wall % 2], wall >= 2  # x walls, z walls; the high side or not
    gap = float(rng.uniform(0.5, min(3.0, size[axis] - 0.5)))
    position = rng.uniform([0.5, 0.4, 0.5], [
        size[0] - 0.5, min(2.2, size[1] - 0.2), size[2] - 0.5])
    position[axis] = size[axis] - gap if far_side else gap
    facing = {(0, False): -math.pi / 2, (0, True): math.pi / 2, (2, False): math.pi,
              (2, True): 0.0}[(axis, far_side)]
    return CameraPose(tuple(position.tolist()), facing + float(rng.uniform(-0.3, 0.3)),
                      float(rng.uniform(-0.3, 0.3)), float(rng.uniform(-0.05, 0.05)))


def _wall(rng: np.random.Generator) -> tuple[Scene, CameraPose]:
    distance = float(np.exp(rng.uniform(math.log(0.5), math.log(12.0))))
    scene = wall_scene(rng, distance)
    for _ in range(int(rng.integers(0, 5))):
        z0 = float(rng.uniform(0.4, max(distance - 0.2, 0.45)))
        w, h, d = rng.uniform(0.1, 1.0, 3) * max(z0, 0.5)
        x0, y0 = rng.uniform(-0.8, 0.8, 2) * z0 - [w / 2, h / 2]
        _add_box(scene, (x0, y0, z0), (x0 + w, y0 + h, min(z0 + d, distance)),
                 _material(rng, rng.random() < 0.3))
    return scene, CameraPose((0.0, 0.0, 0.0), float(rng.uniform(-0.5, 0.5)),
                             float(rng.uniform(-0.4, 0.4)), float(rng.uniform(-0.1, 0.1)))


def _street(seed: int, rng: np.random.Generator) -> tuple[Scene, CameraPose]:
    scene = make_scene(seed, 'outdoor')
    if rng.random() < 0.3:
        for index, material in enumerate(scene.materials):
            if material.pattern == WINDOWS:
                scene.materials[index] = Material(_palette(rng), material.color_b,
                                                  WINDOWS, material.scale_m)
    x_m, z_m = path_position(scene, rng)
    return scene, CameraPose((x_m, float(rng.uniform(0.5, 3.0)), z_m),
                             float(rng.uniform(-0.8, 0.8)), float(rng.uniform(-0.35, 0.15)),
                             float(rng.uniform(-0.08, 0.08)))
