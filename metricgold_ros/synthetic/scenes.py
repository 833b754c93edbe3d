"""Procedural synthetic RGB-D: rooms and streets with exact planar metric depth (numpy only).

Scenes are axis-aligned boxes (a room is a box seen from inside; a street is a ground slab,
sidewalks, buildings, poles and parked cars) ray-cast analytically with the slab method, one
vectorised pass per box over the pixels its projection can cover; :mod:`.shading` colours the
hits (textures are functions of the world-space hit point, so they stay put while the camera
moves).

Conventions:
    * World axes: x right, y up (floor / road at y = 0), z forward along the street (a
      left-handed frame, as in Unity, so that yaw 0 looks along +z with +x on the right).
    * Camera: pinhole, optical frame x right, y down, z forward; pixel (u, v) is the centre of
      column u, row v, so a ray's direction is ``((u - cx) / fx, (v - cy) / fy, 1)``. The ray
      parameter is then exactly the planar depth z that ``depth_m`` holds.
    * ``depth_m`` is float32 metres, **0 where invalid**; ``valid`` says the same as a mask.
      Invalid: no hit (sky, outdoors) or farther than ``MAX_DEPTH_M`` (80 m, the cap that
      Virtual KITTI 2 training uses).
    * A scene is a function of (seed, kind); so are the intrinsics (horizontal field of view
      45-90 deg, square pixels, principal point within 2 % of the centre).
    * Valid depth spans about 0.6-8 m indoors (rooms up to 8 x 10 m) and 1.4-80 m outdoors.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from metricgold_ros.camera import Intrinsics
from metricgold_ros.errors import InputError
from metricgold_ros.synthetic.shading import (
    CHECKER, NOISE, PLAIN, ROAD, STRIPES, WINDOWS, Material, shade)

KINDS = ('indoor', 'outdoor')
MAX_DEPTH_M = 80.0
NEAR_M = 0.05
_EDGES = [(i, i | b) for b in (1, 2, 4) for i in range(8) if not i & b]  # box corner pairs
# Furniture (low, high) of (width, depth, height) in metres: table, shelf, bed or sofa, box.
_FURNITURE = [((0.8, 0.6, 0.7), (1.8, 1.0, 0.8)), ((0.5, 0.3, 1.0), (1.5, 0.6, 2.2)),
              ((1.4, 0.8, 0.4), (2.0, 1.6, 0.6)), ((0.3, 0.3, 0.3), (0.6, 0.6, 0.6))]


@dataclass(frozen=True)
class Sample:
    """A frame: ``rgb`` [H,W,3] uint8, ``depth_m`` [H,W] float32 planar metres (0 = invalid),
    ``valid`` [H,W] bool, pinhole intrinsics in pixels, ``kind``, scene ``seed``, ``frame_index``
    within a ``camera_sequence`` (0 for ``render_sample``) and the camera's mounting over the
    floor (y = 0) as ``metricgold_ros.ground.Mounting`` takes it (``CameraPose.mounting``)."""

    rgb: np.ndarray
    depth_m: np.ndarray
    valid: np.ndarray
    fx_px: float
    fy_px: float
    cx_px: float
    cy_px: float
    kind: str
    seed: int
    frame_index: int = 0
    camera_height_m: float = 0.0
    camera_pitch_deg: float = 0.0
    camera_roll_deg: float = 0.0

    @property
    def intrinsics(self) -> Intrinsics:
        """The frame's pinhole camera, at the frame's size."""
        height, width = self.depth_m.shape
        return Intrinsics(self.fx_px, self.fy_px, self.cx_px, self.cy_px, width, height)


@dataclass
class Scene:
    """Boxes ``box_lo_m``/``box_hi_m`` [N,3] with a material index per face [N,3,2] (axis,
    lo/hi side); ``inside[i]``: the camera is inside box i (a room). Light: ``ambient``, point
    lights ``lights_m`` [L,3] of ``light_power`` [L], a sun (unit vector towards it) or none."""

    kind: str
    box_lo_m: np.ndarray
    box_hi_m: np.ndarray
    face_material: np.ndarray
    materials: list[Material]
    inside: np.ndarray
    ambient: float = 0.35
    lights_m: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    light_power: np.ndarray = field(default_factory=lambda: np.zeros(0))
    sun_dir: tuple[float, float, float] | None = None
    noise: np.ndarray = field(default_factory=lambda: np.full((256, 256), 0.5, np.float32))
    path: tuple[float, ...] = ()  # camera path parameters (see _path_pose)


@dataclass(frozen=True)
class CameraPose:
    """Camera centre in world metres; yaw turns from +z towards +x, positive pitch looks up."""

    position_m: tuple[float, float, float]
    yaw_rad: float = 0.0
    pitch_rad: float = 0.0
    roll_rad: float = 0.0

    def axes(self) -> np.ndarray:
        """[3,3] world directions of the camera's x (right), y (down), z (forward): columns."""
        cy, sy = math.cos(self.yaw_rad), math.sin(self.yaw_rad)
        cp, sp = math.cos(self.pitch_rad), math.sin(self.pitch_rad)
        fwd, right = np.array([sy * cp, sp, cy * cp]), np.array([cy, 0.0, -sy])
        up, cr, sr = np.cross(fwd, right), math.cos(self.roll_rad), math.sin(self.roll_rad)
        return np.stack([cr * right + sr * up, sr * right - cr * up, fwd], axis=1)

    def mounting(self) -> tuple[float, float, float]:
        """(camera_height_m, camera_pitch_deg, camera_roll_deg) over the floor (y = 0): pitch
        positive looking down, roll dipping the right side (``ground``'s signs, flipped here)."""
        return (float(self.position_m[1]), -math.degrees(self.pitch_rad),
                -math.degrees(self.roll_rad))


def check_scene_args(kind: str, width: int = 8, height: int = 8, seed: int = 0) -> int:
    """Index of ``kind`` in ``KINDS``, once it, the image size and the seed are validated."""
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f'seed={seed!r} must be an integer >= 0')
    if kind not in KINDS:
        raise InputError(f'kind={kind!r} is not one of {KINDS}')
    if not (8 <= width <= 8192 and 8 <= height <= 8192):
        raise InputError(f'image size {width}x{height} px is outside 8..8192 px per side')
    return KINDS.index(kind)


class _Builder:
    """The boxes and materials of a scene being made, and the generator that picks them."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.boxes: list[tuple] = []  # (lo, hi, material index per face [3,2], inside)
        self.mats: list[Material] = []

    def add(self, lo, hi, mat: Material | int | list, inside: bool = False) -> None:
        """A box from ``lo`` to ``hi`` (metres) of a new material or a known index."""
        if isinstance(mat, Material):
            self.mats.append(mat)
            mat = len(self.mats) - 1
        self.boxes.append((lo, hi, np.broadcast_to(mat, (3, 2)), inside))

    def slab(self, x_m: float, dx_m: float, top_m: float, z0_m: float, z1_m: float,
             mat) -> None:
        """A box standing on the ground between ``x_m`` and ``x_m + dx_m``."""
        self.add((min(x_m, x_m + dx_m), 0.0, z0_m), (max(x_m, x_m + dx_m), top_m, z1_m), mat)

    def color(self, low: float = 0.15, high: float = 0.9) -> tuple[float, float, float]:
        """A random RGB albedo with every channel in [low, high]."""
        return tuple(self.rng.uniform(low, high, 3).tolist())


def make_scene(seed: int, kind: str = 'indoor') -> Scene:
    """The scene (boxes, materials, lights, camera path) that ``seed`` and ``kind`` define."""
    rng = np.random.default_rng([seed, check_scene_args(kind, seed=seed), 0])
    build = _Builder(rng)
    noise = rng.random((256, 256), dtype=np.float32)
    path, light = (_room if kind == 'indoor' else _street)(build)
    lo, hi, face, inside = zip(*build.boxes)
    return Scene(kind, np.array(lo, float), np.array(hi, float), np.array(face, int),
                 build.mats, np.array(inside, bool), noise=noise,
                 path=tuple(float(v) for v in path), **light)


def _room(build: _Builder) -> tuple[tuple, dict]:
    """A furnished room walked around in a loop: the camera path and the light."""
    rng = build.rng
    size = rng.uniform([3.5, 2.4, 4.0], [8.0, 3.4, 10.0])  # room width, height, depth
    color = build.color
    build.mats += [
        Material(color(0.3, 0.8), color(0.1, 0.6), int(rng.choice([CHECKER, STRIPES, NOISE])),
                 rng.uniform(0.15, 0.8)),  # floor
        Material(color(0.5, 0.95), color(0.3, 0.9), int(rng.choice([PLAIN, STRIPES, NOISE,
                 CHECKER])), rng.uniform(0.1, 0.6)),  # walls
        Material(color(0.8, 0.97), color(0.6, 0.8), NOISE, 2.0)]  # ceiling
    build.add((0.0, 0.0, 0.0), tuple(size), [[1, 1], [0, 2], [1, 1]], inside=True)
    centre = size[[0, 2]] / 2
    radii = rng.uniform(0.3, 1.0, 2) * np.maximum(centre - 1.0, 0.1)  # 1 m from the walls
    omega = rng.uniform(0.5, 1.0) / max(radii.mean(), 0.5) * rng.choice([-1, 1])  # rad/s
    path = (0, *centre, *radii, omega, rng.uniform(0, 2 * math.pi), rng.uniform(1.2, 1.7),
            rng.uniform(-0.25, 0.0))
    angle = np.linspace(0.0, 2 * math.pi, 64)
    loop = centre + radii * np.stack([np.cos(angle), np.sin(angle)], 1)  # [64,2] x, z
    for _ in range(int(rng.integers(8, 25))):  # furniture stays 0.8 m clear of the loop
        w, d, h = rng.uniform(*_FURNITURE[rng.integers(len(_FURNITURE))])
        x0, z0 = rng.uniform(0.0, 1.0, 2) * (size[[0, 2]] - [w, d])
        gap = np.maximum(np.maximum([x0, z0] - loop, loop - [x0 + w, z0 + d]), 0.0)
        if np.hypot(*gap.T).min() < 0.8:
            continue
        mat = Material(build.color(), build.color(), int(rng.choice([PLAIN, NOISE, STRIPES])),
                       rng.uniform(0.05, 0.4))
        if h < 0.9 and w > 0.75 and rng.random() < 0.7:  # a table: top and four legs
            build.add((x0, h - 0.04, z0), (x0 + w, h, z0 + d), mat)
            for lx, lz in itertools.product((x0, x0 + w - 0.05), (z0, z0 + d - 0.05)):
                build.add((lx, 0.0, lz), (lx + 0.05, h - 0.04, lz + 0.05), len(build.mats) - 1)
        else:
            build.add((x0, 0.0, z0), (x0 + w, h, z0 + d), mat)
    for _ in range(int(rng.integers(0, 3))):  # pictures on the x walls
        x0 = 0.0 if rng.random() < 0.5 else size[0] - 0.03
        y0, z0, h, w = rng.uniform([0.9, 0.5, 0.3, 0.4], [1.6, size[2] - 1.5, 0.8, 1.2])
        build.add((x0, y0, z0), (x0 + 0.03, y0 + h, z0 + w), Material(build.color(), build.color(),
                                                                     NOISE, 0.1))
    n = int(rng.integers(1, 3))
    light = dict(ambient=rng.uniform(0.25, 0.4), light_power=rng.uniform(0.6, 1.0, n),
                 lights_m=np.column_stack([rng.uniform(0.5, size[0] - 0.5, n), np.full(
                     n, size[1] - 0.3), rng.uniform(0.5, size[2] - 0.5, n)]))
    return path, light


def _street(build: _Builder) -> tuple[tuple, dict]:
    """A street of blocks, poles and parked cars driven along a lane: the path and the sun."""
    rng = build.rng
    n_lanes, walk_w, length = int(rng.integers(2, 5)), *rng.uniform([2.0, 70.0], [4, 80])
    road_w, grey = 3.3 * n_lanes + 4.0, rng.uniform(0.22, 0.4)  # lanes, 2 m parking strips
    build.add((-90.0, -1.0, -60.0), (90.0, 0.0, length + 30), Material(
        (grey, grey, grey * 1.05), (0.9, 0.9, 0.85), ROAD, road_w, n_lanes))
    tiles = Material(build.color(0.5, 0.75), build.color(0.4, 0.7), CHECKER, rng.uniform(0.4, 1.0))
    for side in (-1, 1):
        build.slab(side * road_w / 2, side * walk_w, 0.15, -60.0, length + 30, tiles)
        z = -45.0
        while z < length:  # building blocks, sometimes an alley between two
            w, h, d, setback = rng.uniform([8.0, 6.0, 8.0, 0.0], [25.0, 30.0, 16.0, 1.5])
            build.slab(side * (road_w / 2 + walk_w + setback), side * d, h, z, z + w, Material(
                build.color(0.3, 0.85), build.color(0.05, 0.3), WINDOWS, rng.uniform(2.5, 4.0)))
            z += w + (rng.uniform(3.0, 6.0) if rng.random() < 0.3 else 0.0)
        build.slab(side * (road_w / 2 + walk_w + 24), side * 10, rng.uniform(15.0, 40.0), -60.0,
             length + 30, Material(build.color(0.3, 0.7), build.color(0.05, 0.3), WINDOWS, 3.0))
        for zp in np.arange(rng.uniform(-40.0, -25.0), length, rng.uniform(12.0, 25.0)):
            xp = side * (road_w / 2 + 0.5)  # poles along the curb
            build.add((xp - 0.08, 0.0, zp), (xp + 0.08, rng.uniform(4.0, 7.0), zp + 0.16),
                    Material((0.3, 0.3, 0.32)))
        for zc in rng.uniform(-10.0, length - 10.0, int(rng.integers(0, 4))):  # parked cars
            xc, paint = side * (road_w / 2 - 1.0), Material(build.color(0.05, 0.9))
            build.add((xc - 0.9, 0.15, zc), (xc + 0.9, 0.95, zc + 4.3), paint)
            build.add((xc - 0.8, 0.95, zc + 1.0), (xc + 0.8, 1.45, zc + 3.2), len(build.mats) - 1)
    for z_end in (length, -58.0):  # blocks closing the street ahead and behind
        build.add((-60.0, 0.0, z_end), (60.0, rng.uniform(10.0, 30.0), z_end + 12.0),
                Material(build.color(0.3, 0.85), build.color(0.05, 0.3), WINDOWS, 3.0))
    lane_x = -road_w / 2 + 2.0 + 3.3 * (int(rng.integers(n_lanes)) + 0.5)
    path = (1, lane_x, 0.0, 0.3, length - 30, rng.uniform(4.0, 10.0) * 2 / (length - 30),
            0.0, rng.uniform(1.3, 2.0), rng.uniform(-0.1, 0.02))  # 4-10 m/s at most
    elevation, azimuth = rng.uniform(0.3, 1.1), rng.uniform(0.0, 2 * math.pi)
    light = dict(ambient=rng.uniform(0.35, 0.5), sun_dir=(
        math.cos(elevation) * math.sin(azimuth), math.sin(elevation),
        math.cos(elevation) * math.cos(azimuth)))
    return path, light


def _path_pose(path: tuple[float, ...], time_s: float) -> CameraPose:
    """Smooth periodic camera path: an indoor walking loop or an outdoor street dolly."""
    outdoor, cx, cz, rx, rz, omega, phase, eye_m, pitch = path
    t = time_s
    if outdoor:  # drive along the lane and back: z eases with a cosine, so velocity is smooth
        return CameraPose((cx + rx * math.sin(0.9 * t), eye_m + 0.02 * math.sin(3 * t),
                           rz * (1 - math.cos(omega * t)) / 2), 0.08 * math.sin(0.4 * t),
                          pitch + 0.01 * math.sin(t))
    a = omega * t + phase  # look along the loop, turned towards its centre
    ox, oz, turn = rx * math.cos(a), rz * math.sin(a), math.copysign(1.0, omega)
    vx, vz = -turn * rx * math.sin(a), turn * rz * math.cos(a)  # along the walking direction
    speed, off = math.hypot(vx, vz) + 1e-9, math.hypot(ox, oz) + 1e-9
    yaw = math.atan2(vx / speed - 0.8 * ox / off, vz / speed - 0.8 * oz / off)
    return CameraPose((cx + ox, eye_m + 0.03 * math.sin(11 * t), cz + oz),
                      yaw + 0.35 * math.sin(0.4 * t), pitch + 0.05 * math.sin(0.3 * t),
                      0.02 * math.sin(5.6 * t))


def path_position(scene: Scene, rng: np.random.Generator) -> tuple[float, float]:
    """(x, z) metres of a random point of the scene's camera path (one draw from ``rng``)."""
    x_m, _, z_m = _path_pose(scene.path, rng.uniform(0, 7 / abs(scene.path[5]))).position_m
    return x_m, z_m


def _intrinsics(seed: int, kind: str, width: int, height: int) -> tuple[float, ...]:
    """(fx, fy, cx, cy) px: horizontal field of view 45-90 deg, centre within 2 % of the middle."""
    rng = np.random.default_rng([seed, check_scene_args(kind), 1])
    f_px = width / 2 / math.tan(math.radians(rng.uniform(45.0, 90.0)) / 2)
    du, dv = rng.uniform(-0.02, 0.02, 2).tolist()
    return (f_px, f_px, (width - 1) / 2 + du * width, (height - 1) / 2 + dv * height)


def render_sample(seed: int, kind: str = 'indoor', width: int = 640,
                  height: int = 480) -> Sample:
    """One frame of scene ``seed`` from a random point of its camera path, random orientation."""
    scene, intrinsics = make_scene(seed, kind), _intrinsics(seed, kind, width, height)
    rng = np.random.default_rng([seed, check_scene_args(kind, width, height, seed), 2])
    x_m, z_m = path_position(scene, rng)
    towards = math.atan2(scene.path[1] - x_m, scene.path[2] - z_m)  # indoors, face the room
    yaw, pitch, eye_m = ((towards + rng.uniform(-1.3, 1.3), rng.uniform(-0.4, 0.15),
                          rng.uniform(0.6, 1.9)) if kind == 'indoor' else
                         (rng.uniform(-0.5, 0.5), rng.uniform(-0.15, 0.05), rng.uniform(1.2, 2)))
    pose = CameraPose((x_m, eye_m, z_m), yaw, pitch, rng.uniform(-0.05, 0.05))
    return render_view(scene, pose, intrinsics, width, height, seed=seed)


def flat_wall(seed: int, distance_m: float, width: int = 640, height: int = 480) -> Sample:
    """A textured wall seen square on from ``distance_m``: one depth over the whole frame.

    The scene for border artefacts: every pixel has the same planar depth, so any band of
    error along the image's edges is the model's, not the scene's. The wall's colours, pattern
    (plain, checker, stripes or noise), lamp and the camera's horizontal field of view (45-90
    deg, principal point in the middle) follow from ``seed``.
    """
    check_scene_args('indoor', width, height, seed)
    if not 0.5 <= distance_m <= 20.0:
        raise InputError(f'distance_m={distance_m!r} must be within 0.5..20 m')
    rng = np.random.default_rng([seed, 2, 0])
    scene = wall_scene(rng, distance_m)
    f_px = width / 2 / math.tan(math.radians(rng.uniform(45.0, 90.0)) / 2)
    return render_view(scene, CameraPose((0.0, 0.0, 0.0)),
                       (f_px, f_px, (width - 1) / 2, (height - 1) / 2), width, height, seed=seed)


def wall_scene(rng: np.random.Generator, distance_m: float) -> Scene:
    """A textured wall 200 m wide across z = ``distance_m`` with a lamp in front of it: its
    colours, pattern (plain, checker, stripes or noise) and lamp drawn from ``rng``."""
    color = rng.uniform(0.35, 0.9, 3), rng.uniform(0.15, 0.7, 3)
    material = Material(tuple(color[0].tolist()), tuple(color[1].tolist()),
                        int(rng.choice([PLAIN, CHECKER, STRIPES, NOISE])), rng.uniform(0.2, 0.8))
    return Scene('indoor', np.array([[-100.0, -100.0, distance_m]]),
                 np.array([[100.0, 100.0, distance_m + 1.0]]), np.zeros((1, 3, 2), int),
                 [material], np.array([False]), ambient=rng.uniform(0.25, 0.4),
                 lights_m=np.array([[rng.uniform(-1.0, 1.0), rng.uniform(0.3, 1.0),
                                     distance_m - rng.uniform(0.8, 1.5)]]),
                 light_power=np.array([rng.uniform(0.6, 1.0)]),
                 noise=rng.random((256, 256), dtype=np.float32))


def camera_sequence(seed: int, kind: str = 'indoor', n_frames: int = 100, width: int = 640,
                    height: int = 480, fps: float = 10.0,
                    mounting: tuple[float, float] | None = None) -> Iterator[Sample]:
    """``n_frames`` frames at ``fps`` along the smooth camera path of scene ``seed``.

    Indoors the camera walks a loop at 0.5-1 m/s looking around; outdoors it drives its lane at
    up to 4-10 m/s and eases back near the street's end. Frame k is the pose at time k / fps;
    the scene and intrinsics depend on neither ``n_frames`` nor ``fps``. ``mounting`` (height m,
    pitch deg down) replaces the path's nominal ones (the camera still bobs around them).
    """
    if n_frames < 0 or fps <= 0:
        raise InputError(f'n_frames={n_frames} must be >= 0 and fps={fps} > 0')
    scene, intrinsics = make_scene(seed, kind), _intrinsics(seed, kind, width, height)
    check_scene_args(kind, width, height)
    if mounting is not None:  # path: (..., eye height m, pitch rad up)
        scene.path = (*scene.path[:7], float(mounting[0]), -math.radians(mounting[1]))
    for k in range(n_frames):
        yield render_view(scene, _path_pose(scene.path, k / fps), intrinsics, width, height,
                          seed=seed, frame_index=k)


def render_view(scene: Scene, pose: CameraPose, intrinsics: Sequence[float], width: int,
                height: int, *, seed: int = 0, frame_index: int = 0) -> Sample:
    """Ray-cast ``scene`` from ``pose`` with pinhole ``intrinsics`` (fx, fy, cx, cy) in pixels."""
    fx, fy, cx, cy = (float(v) for v in intrinsics)
    if not (fx > 0 and fy > 0 and width > 0 and height > 0):
        raise InputError(f'fx={fx}, fy={fy} px and size {width}x{height} px must be positive')
    origin, axes = [float(v) for v in pose.position_m], pose.axes()
    col = ((np.arange(width, dtype=np.float32) - cx) / fx)[None, :]  # [1,W]
    row = ((np.arange(height, dtype=np.float32) - cy) / fy)[:, None]  # [H,1]
    ray = [ax_x * col + ax_y * row + ax_z for ax_x, ax_y, ax_z in axes.tolist()]  # 3x [H,W]
    inv = [1.0 / np.where(r == 0, np.float32(1e-30), r) for r in ray]
    depth = np.full((height, width), np.inf, np.float32)  # ray parameter = planar depth z
    prim, axis = np.full((height, width), -1, np.int64), np.zeros((height, width), np.int64)
    for i in range(len(scene.box_lo_m)):
        lo, hi = scene.box_lo_m[i].tolist(), scene.box_hi_m[i].tolist()
        rect = (np.s_[:, :] if scene.inside[i] else
                _screen_rect(lo, hi, origin, axes, (fx, fy, cx, cy), width, height))
        if rect is None:
            continue
        near, far = zip(*[(np.minimum(t1, t2), np.maximum(t1, t2)) for t1, t2 in (
            ((lo[k] - origin[k]) * inv[k][rect], (hi[k] - origin[k]) * inv[k][rect])
            for k in range(3))])  # slab method: per axis, where the ray enters and leaves
        if scene.inside[i]:  # the ray leaves the room through the first far face
            t = np.minimum(np.minimum(far[0], far[1]), far[2])
            ax = np.where(far[0] <= np.minimum(far[1], far[2]), 0, 2 - (far[1] <= far[2]))
        else:
            t = np.maximum(np.maximum(near[0], near[1]), near[2])
            t[(t > np.minimum(np.minimum(far[0], far[1]), far[2])) | (t < NEAR_M)] = np.inf
            ax = np.where(near[0] >= np.maximum(near[1], near[2]), 0, 2 - (near[1] >= near[2]))
        closer = t < depth[rect]
        np.copyto(depth[rect], t, where=closer)
        np.copyto(prim[rect], i, where=closer)
        np.copyto(axis[rect], ax, where=closer)
    valid = depth <= MAX_DEPTH_M
    return Sample(shade(scene, origin, ray, depth, prim, axis), np.where(
        valid, depth, np.float32(0)), valid, fx, fy, cx, cy, scene.kind, seed, frame_index,
        *pose.mounting())


def _screen_rect(lo: list, hi: list, origin: list, axes: np.ndarray, intrinsics: tuple,
                 width: int, height: int) -> tuple[slice, slice] | None:
    """Pixel rectangle covering the box's part in front of the near plane, or None."""
    corners = np.array(list(itertools.product(*zip(lo, hi)))) - origin  # [8,3]
    cam = corners @ axes  # [8,3] camera coordinates
    front = cam[:, 2] >= NEAR_M
    if not front.any():
        return None
    points = [cam[front]]
    for i, j in _EDGES:  # where an edge crosses the near plane
        if front[i] != front[j]:
            s = (NEAR_M - cam[i, 2]) / (cam[j, 2] - cam[i, 2])
            points.append((cam[i] + s * (cam[j] - cam[i]))[None])
    pts = np.concatenate(points)
    fx, fy, cx, cy = intrinsics
    u, v = fx * pts[:, 0] / pts[:, 2] + cx, fy * pts[:, 1] / pts[:, 2] + cy
    u0, u1 = max(int(math.floor(u.min())), 0), min(int(math.ceil(u.max())) + 1, width)
    v0, v1 = max(int(math.floor(v.min())), 0), min(int(math.ceil(v.max())) + 1, height)
    return (slice(v0, v1), slice(u0, u1)) if u0 < u1 and v0 < v1 else None
