"""builtin:depth-scenes — procedurally rendered rooms with exact metric depth, made from a seed.

A scene is a box-shaped room (floor, ceiling, three walls) with a few axis-aligned boxes and spheres,
a point light and simple textures (a checkered floor, striped wallpaper). One ray per pixel is cast
from a pinhole camera (60° field of view, pitched down, slightly turned); the nearest hit gives the
colour — Lambertian shading, ambient + diffuse with a soft distance falloff and a hard shadow from one
shadow ray — and the depth. Depth is z-depth along the optical axis, as a Kinect and NYU Depth V2 report
it: rays are d = R·(u·tan(fov/2), v·tan(fov/2), 1), whose component along the axis is 1, so the ray
parameter t of the hit *is* the depth. Everything is numpy over all pixels at once (a few ms for a 64×64
image on one core). Rooms are 4–7 m wide and 5–8.5 m deep, objects at least 1.9 m ahead of the
camera, so depths lie in about 1..9.5 m.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from .common import check_image_size, check_split, depth_item, item_rng

FLOOR, CEILING, LEFT_WALL, RIGHT_WALL, BACK_WALL = range(5)   # object ids; boxes then spheres follow
_EPS = 1e-6


@dataclasses.dataclass
class Scene:
    width: float                 # room spans x in [-width/2, width/2], y in [0, height], z in [0, depth]
    depth: float
    height: float
    camera: np.ndarray           # (3,) position
    yaw: float                   # radians, rotation about +y (positive turns towards +x)
    pitch: float                 # radians, negative looks down
    fov: float                   # full field of view in radians (square images)
    light: np.ndarray            # (3,) point light position
    boxes: list                  # [(lo (3,), hi (3,), albedo (3,))]
    spheres: list                # [(centre (3,), radius, albedo (3,))]
    floor_colors: np.ndarray     # (2, 3) checker colours
    tile: float                  # checker tile size, metres
    wall_color: np.ndarray       # (3,)
    back_color: np.ndarray       # (3,)
    ceiling_color: np.ndarray    # (3,)
    stripe: float                # wallpaper stripe period, metres


def _color(rng, lo=0.2, hi=0.9) -> np.ndarray:
    return rng.uniform(lo, hi, size=3)


def random_scene(rng: np.random.Generator, num_boxes: int | None = None, num_spheres: int | None = None) -> Scene:
    """A random room; num_boxes/num_spheres default to 1..3 and 0..2."""
    W, D, H = rng.uniform(4.0, 7.0), rng.uniform(5.0, 8.5), rng.uniform(2.6, 3.2)
    camera = np.array([rng.uniform(-0.3, 0.3) * (W / 2 - 1.0), rng.uniform(1.2, 1.7), 0.2])
    nb = int(rng.integers(1, 4)) if num_boxes is None else num_boxes
    ns = int(rng.integers(0, 3)) if num_spheres is None else num_spheres
    footprints, boxes, spheres = [], [], []

    def place(half_x, half_z):   # a centre (x, z) whose footprint overlaps no earlier one (a few tries)
        for _ in range(20):
            x = rng.uniform(-W / 2 + half_x + 0.05, W / 2 - half_x - 0.05)
            z = rng.uniform(1.9 + half_z, D - half_z - 0.05)
            if all(abs(x - fx) > half_x + hx or abs(z - fz) > half_z + hz for fx, fz, hx, hz in footprints):
                footprints.append((x, z, half_x, half_z))
                return x, z
        return None

    for _ in range(nb):
        hx, hz, h = rng.uniform(0.2, 0.6), rng.uniform(0.2, 0.6), rng.uniform(0.3, 1.5)
        c = place(hx, hz)
        if c is not None:
            boxes.append((np.array([c[0] - hx, 0.0, c[1] - hz]), np.array([c[0] + hx, h, c[1] + hz]), _color(rng)))
    for _ in range(ns):
        r = rng.uniform(0.25, 0.6)
        c = place(r, r)
        if c is not None:
            y = r if rng.random() < 0.6 else rng.uniform(r, min(1.8, H - r - 0.1))
            spheres.append((np.array([c[0], y, c[1]]), r, _color(rng)))
    return Scene(
        width=W, depth=D, height=H, camera=camera,
        yaw=math.radians(rng.uniform(-15, 15)), pitch=math.radians(rng.uniform(-15, -3)), fov=math.radians(60),
        light=np.array([rng.uniform(-W / 3, W / 3), H - 0.3, rng.uniform(1.0, D - 1.0)]),
        boxes=boxes, spheres=spheres, floor_colors=np.stack([_color(rng), _color(rng)]),
        tile=rng.uniform(0.4, 1.0), wall_color=_color(rng, 0.4, 0.95), back_color=_color(rng, 0.3, 0.95),
        ceiling_color=_color(rng, 0.8, 1.0), stripe=rng.uniform(0.2, 0.6))


def camera_rays(scene: Scene, size: int) -> np.ndarray:
    """(3, size*size) world-space directions with unit component along the optical axis (pixels row-major,
    row 0 at the top). Rays are stored as (3, n) so that per-axis work runs over long contiguous rows."""
    f = math.tan(scene.fov / 2)
    c = (np.arange(size) + 0.5) / size * 2.0 - 1.0
    v, u = np.meshgrid(-c, c, indexing="ij")                       # v: up, u: right
    d = np.stack([u.ravel() * f, v.ravel() * f, np.ones(size * size)])
    cp, sp, cy, sy = math.cos(scene.pitch), math.sin(scene.pitch), math.cos(scene.yaw), math.sin(scene.yaw)
    pitch = np.array([[1, 0, 0], [0, cp, sp], [0, -sp, cp]])       # rotate about x: +pitch looks up
    yaw = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])         # rotate about y: +yaw looks to +x
    return (yaw @ pitch) @ d


def _slabs(o, inv, lo, hi):
    """Per-axis entry and exit t, each (3, n), of rays o + t·d (inv = 1/d) through the slabs of [lo, hi]."""
    t1, t2 = (lo[:, None] - o) * inv, (hi[:, None] - o) * inv
    return np.minimum(t1, t2), np.maximum(t1, t2)


def _inverse(d):
    with np.errstate(divide="ignore"):
        return 1.0 / np.where(np.abs(d) < _EPS, _EPS, d)


def _sphere_hit(o, d, centre, r):
    """Nearest t > 0 of rays o + t·d on the sphere (inf where missed)."""
    oc = o - centre[:, None]
    a = d[0] * d[0] + d[1] * d[1] + d[2] * d[2]
    b = 2.0 * (d[0] * oc[0] + d[1] * oc[1] + d[2] * oc[2])
    c = oc[0] * oc[0] + oc[1] * oc[1] + oc[2] * oc[2] - r * r
    disc = b * b - 4 * a * c
    sq = np.sqrt(np.maximum(disc, 0.0))
    t0, t1 = (-b - sq) / (2 * a), (-b + sq) / (2 * a)
    t = np.where(t0 > _EPS, t0, np.where(t1 > _EPS, t1, np.inf))
    return np.where(disc >= 0, t, np.inf)


def _objects_hit(scene: Scene, o, d, normals: bool = True):
    """Nearest hit among boxes and spheres: (t, object id, normal (3, n)); t = inf where none."""
    n = d.shape[1]
    t = np.full(n, np.inf)
    ids = np.full(n, -1)
    normal = np.zeros((3, n)) if normals else None
    inv = _inverse(d)
    for k, (lo, hi, _) in enumerate(scene.boxes):
        near, far = _slabs(o, inv, lo, hi)
        tn = np.maximum(np.maximum(near[0], near[1]), near[2])
        tf = np.minimum(np.minimum(far[0], far[1]), far[2])
        hit = (tn <= tf) & (tn > _EPS) & (tn < t)
        t = np.where(hit, tn, t)
        ids[hit] = 5 + k
        if normals:   # the face is on the slab entered last; it faces against the ray
            for a in range(3):
                on = hit & (near[a] == tn)
                normal[:, on] = 0.0
                normal[a, on] = -np.sign(d[a, on])
    for k, (c, r, _) in enumerate(scene.spheres):
        ts = _sphere_hit(o, d, c, r)
        hit = ts < t
        t = np.where(hit, ts, t)
        ids[hit] = 5 + len(scene.boxes) + k
        if normals:
            normal[:, hit] = (o[:, hit] + ts[hit] * d[:, hit] - c[:, None]) / r
    return t, ids, normal


def render(scene: Scene, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rgb (S, S, 3) float32 in [0, 1], depth (S, S) float32 metres, ids (S, S) int) of a scene."""
    d = camera_rays(scene, size)
    n = d.shape[1]
    o = np.broadcast_to(scene.camera[:, None], d.shape)
    # 1. the room: the camera is inside the box, so the ray leaves it through the nearest far slab
    lo, hi = np.array([-scene.width / 2, 0.0, 0.0]), np.array([scene.width / 2, scene.height, scene.depth])
    _, far = _slabs(o, _inverse(d), lo, hi)
    axis = far.argmin(0)
    t = np.choose(axis, far)
    up = np.choose(axis, d) > 0
    ids = np.choose(axis, [np.where(up, RIGHT_WALL, LEFT_WALL), np.where(up, CEILING, FLOOR), np.full(n, BACK_WALL)])
    normals = np.zeros((3, n))
    normals[axis, np.arange(n)] = np.where(up, -1.0, 1.0)          # room faces look inwards
    # 2. objects in front of the room surface
    to, oid, onrm = _objects_hit(scene, o, d)
    closer = to < t
    t = np.where(closer, to, t)
    ids = np.where(closer, oid, ids)
    normals[:, closer] = onrm[:, closer]
    p = o + t * d
    # 3. albedo: textures on the room, flat colours on objects
    checker = (np.floor(p[0] / scene.tile) + np.floor(p[2] / scene.tile)).astype(np.int64) % 2
    albedo = scene.floor_colors.T[:, checker]
    wall = (ids == LEFT_WALL) | (ids == RIGHT_WALL)
    stripes = 0.85 + 0.15 * (np.floor(p[2, wall] / scene.stripe) % 2)
    albedo[:, wall] = scene.wall_color[:, None] * stripes
    albedo[:, ids == BACK_WALL] = scene.back_color[:, None]
    albedo[:, ids == CEILING] = scene.ceiling_color[:, None]
    for k, obj in enumerate(list(scene.boxes) + list(scene.spheres)):
        albedo[:, ids == 5 + k] = obj[2][:, None]
    # 4. Lambertian shading from the point light, with a hard shadow from one shadow ray towards it
    to_light = scene.light[:, None] - p
    dist = np.sqrt((to_light * to_light).sum(0))
    lam = np.maximum((normals * to_light).sum(0) / dist, 0.0)
    if scene.boxes or scene.spheres:
        ts, _, _ = _objects_hit(scene, p + 1e-4 * normals, to_light, normals=False)   # to_light spans t in [0, 1]
        lam = np.where(ts >= 1.0, lam, 0.0)
    shade = 0.25 + 0.75 * lam / (1.0 + 0.02 * dist * dist)
    rgb = np.clip(albedo * shade, 0.0, 1.0)
    return (rgb.T.reshape(size, size, 3).astype(np.float32), t.reshape(size, size).astype(np.float32),
            ids.reshape(size, size))


class DepthScenesDataset(torch.utils.data.Dataset):
    """`size` items of the depth kind (see data/common.depth_item); item i depends only on (seed, split, i)."""

    kind = "depth"
    num_classes = None

    def __init__(self, size: int | None = None, image_size: int = 64, split: str = "train", seed: int = 0):
        self.split = check_split(split, "builtin:depth-scenes")
        self.image_size = check_image_size(image_size, "builtin:depth-scenes")
        self.size = (10_000 if split == "train" else 1_000) if size is None else int(size)
        if self.size < 1:
            raise ValueError(f"builtin:depth-scenes: size must be >= 1, got {size!r}")
        self.seed = int(seed)

    def __len__(self) -> int:
        return self.size

    def scene(self, index: int) -> Scene:
        return random_scene(item_rng(self.seed, self.split, index))

    def __getitem__(self, index: int) -> dict:
        if not -self.size <= index < self.size:
            raise IndexError(f"builtin:depth-scenes: index {index} out of range for {self.size} items")
        rgb, depth, _ = render(self.scene(index % self.size), self.image_size)
        image = torch.from_numpy(rgb).permute(2, 0, 1).mul(2.0).sub(1.0)
        return depth_item(image, torch.from_numpy(depth)[None])
