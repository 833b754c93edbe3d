"""Colour of the scenes' ray hits: textured materials, sun and lamp light, haze and sky.

Textures are functions of the world-space hit point (value noise, checkers, stripes, facade
windows, road paint), so they stay put while the camera moves. Numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol, Sequence

import numpy as np

PLAIN, CHECKER, STRIPES, NOISE, WINDOWS, ROAD = range(6)  # texture patterns


@dataclass(frozen=True)
class Material:
    """Albedo ``color_a`` blended towards ``color_b`` by a pattern of period ``scale_m``
    (ROAD: ``scale_m`` is the road width, ``param`` the number of lanes)."""

    color_a: tuple[float, float, float]
    color_b: tuple[float, float, float] = (0.0, 0.0, 0.0)
    pattern: int = PLAIN
    scale_m: float = 1.0
    param: float = 0.0


def _value_noise(table: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Smooth value noise in [0, 1], unit lattice spacing; ``table`` is [257*257] wrap-padded."""
    x0, y0 = np.floor(x), np.floor(y)
    fx, fy = x - x0, y - y0
    fx *= fx * (3 - 2 * fx)
    fy *= fy * (3 - 2 * fy)
    base = (y0.astype(np.int32) & 255) * 257 + (x0.astype(np.int32) & 255)
    top, bottom = table.take(base), table.take(base + 257)
    top += fx * (table.take(base + 1) - top)
    bottom += fx * (table.take(base + 258) - bottom)
    return top + fy * (bottom - top)


def _pattern(pattern: int, a: np.ndarray, b: np.ndarray, height_m: np.ndarray,
             axis: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Blend weight in [0, 1] at face coordinates (a, b) in units of the material's scale."""
    if pattern == CHECKER:
        return (np.floor(a) + np.floor(b)) % 2
    if pattern == STRIPES:
        return np.floor(a) % 2 * 0.8
    if pattern == NOISE:
        return _value_noise(table, a, b)
    storey = height_m / 3.2 - np.floor(height_m / 3.2)  # WINDOWS: 3.2 m storeys, none at street
    return ((a - np.floor(a) > 0.2) & (a - np.floor(a) < 0.8) & (storey > 0.3) &
            (storey < 0.85) & (height_m > 3.2) & (axis != 1)).astype(np.float32)


def _road_paint(mat: Material, x_m: np.ndarray, z_m: np.ndarray) -> np.ndarray:
    """1 on lane markings of a road centred on x = 0: solid edge lines, dashed lane lines."""
    edge = mat.scale_m / 2 - 2.0
    paint = np.abs(np.abs(x_m) - edge) < 0.08
    dash = (z_m / 9.0 - np.floor(z_m / 9.0)) < 0.4
    for k in range(1, int(mat.param)):
        paint |= (np.abs(x_m + edge - 3.3 * k) < 0.06) & dash
    return paint.astype(np.float32)


class Lighting(Protocol):
    """What shading reads of a scene (:class:`~metricgold_ros.synthetic.scenes.Scene`)."""

    kind: str
    materials: Sequence[Material]
    face_material: np.ndarray  # [N,3,2] material index per box face
    inside: np.ndarray  # [N] bool: the box is a room seen from inside
    noise: np.ndarray  # [256,256] texture noise
    ambient: float
    lights_m: np.ndarray  # [L,3] lamp positions
    light_power: np.ndarray  # [L]
    sun_dir: Optional[tuple]  # unit vector towards the sun, or None


def shade(scene: 'Lighting', origin: list, ray: list, depth: np.ndarray, prim: np.ndarray,
           axis: np.ndarray) -> np.ndarray:
    """[H,W,3] uint8: textured albedo x (ambient + Lambert) for hits, a sky gradient elsewhere."""
    table = np.pad(scene.noise, ((0, 1), (0, 1)), mode='wrap').reshape(-1)
    hit = np.isfinite(depth)
    t = np.where(hit, depth, np.float32(0))  # [H,W]
    p = [origin[k] + t * ray[k] for k in range(3)]  # hit points, 3x [H,W]
    d_axis = np.where(axis == 0, ray[0], np.where(axis == 1, ray[1], ray[2]))
    normal_sign = np.where(d_axis > 0, np.float32(-1), np.float32(1))  # visible face's normal
    pr = np.maximum(prim, 0)
    side = (d_axis > 0) == scene.inside[pr]  # 1: the box's hi face along the axis
    mat = scene.face_material.reshape(-1).take(pr * 6 + axis * 2 + side)  # [H,W]
    s, tt = np.where(axis == 0, p[2], p[0]), np.where(axis == 1, p[2], p[1])
    mat_flat, weight = mat.reshape(-1), np.zeros(depth.size, np.float32)
    patterns = np.array([m.pattern for m in scene.materials]).take(mat_flat)
    scales = np.array([m.scale_m for m in scene.materials], np.float32)
    for pattern in (CHECKER, STRIPES, NOISE, WINDOWS, ROAD):
        sel = np.flatnonzero(patterns == pattern)
        if pattern == ROAD:
            for m in np.unique(mat_flat[sel]):
                on = sel[mat_flat[sel] == m]
                weight[on] = _road_paint(scene.materials[m], p[0].reshape(-1)[on],
                                         p[2].reshape(-1)[on])
        elif sel.size:
            scale = scales[mat_flat[sel]]
            weight[sel] = _pattern(pattern, s.reshape(-1)[sel] / scale,
                                   tt.reshape(-1)[sel] / scale, tt.reshape(-1)[sel],
                                   axis.reshape(-1)[sel], table)
    color_a = np.array([m.color_a for m in scene.materials], np.float32)
    color = color_a.take(mat, axis=0)  # [H,W,3] albedo: color_a + pattern * (color_b - color_a)
    paint = (np.array([m.color_b for m in scene.materials], np.float32) - color_a).take(mat, 0)
    light = np.full(depth.shape, scene.ambient, np.float32)
    if scene.sun_dir is not None:
        light += 0.7 * np.maximum(normal_sign * np.array(scene.sun_dir, np.float32)[axis], 0)
    for pos, power in zip(scene.lights_m.tolist(), scene.light_power.tolist()):
        to_light = [pos[k] - p[k] for k in range(3)]
        dist2 = to_light[0] ** 2 + to_light[1] ** 2 + to_light[2] ** 2
        facing = np.where(axis == 0, to_light[0], np.where(axis == 1, to_light[1], to_light[2]))
        light += power * np.maximum(normal_sign * facing / np.sqrt(dist2), 0) * 6 / (6 + dist2)
    light *= _value_noise(table, s * 3.1, tt * 3.1) * 36 + 199 + 20 * _value_noise(
        table, s * 23 + 97, tt * 23 + 31)  # x 255 with a world-space grain of 0.78-1
    sky_ground = np.array([0.72, 0.8, 0.9], np.float32)
    paint *= weight.reshape(depth.shape)[..., None]
    color += paint
    if scene.kind == 'outdoor':  # aerial perspective: far surfaces fade towards the horizon
        haze = t / np.float32(400)
        light *= 1 - haze
        color *= light[..., None]
        color += haze[..., None] * (sky_ground * 255) + 0.5
    else:
        color *= light[..., None]
        color += 0.5
    out, miss = color.reshape(-1, 3), np.flatnonzero(~hit)
    if miss.size:
        dm = [r.reshape(-1)[miss] for r in ray]
        up = dm[1] / np.sqrt(dm[0] ** 2 + dm[1] ** 2 + dm[2] ** 2)
        lift = np.maximum(up, 0.02)
        cloud = _value_noise(table, dm[0] / lift * 1.5, dm[2] / lift * 1.5)
        zenith = np.array([0.3, 0.5, 0.85], np.float32)
        sky = sky_ground + (zenith - sky_ground) * np.sqrt(np.clip(up, 0, 1))[:, None]
        out[miss] = (sky + (0.95 - sky) * (np.clip(cloud - 0.55, 0, 1) * 1.8)[:, None]) * 255
    return np.clip(color, 0, 255, out=color).astype(np.uint8)
