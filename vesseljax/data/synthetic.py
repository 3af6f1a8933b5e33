"""Seeded synthetic fundus photographs with exact vessel labels.

A stand-in for DRIVE-like data in tests and smoke runs: each image is drawn
from one seed with NumPy and OpenCV, so the same seed gives the same arrays
(for given NumPy and OpenCV versions), and no file is read.

The geometry is drawn first and both the label and the image follow from it:
vessel trees are polylines rasterised with `cv2.polylines` (thickness = vessel
width, 1 px and up) into a float "darkening" map; the label is exactly the set
of pixels that map touches, intersected with the field of view. The image
darkens the background by that same map (mostly in green, as in real fundus
photos), then gets noise and a slight blur, which softens vessel edges by a
fraction of a pixel while the label stays the rasterised mask.
"""

from __future__ import annotations

import collections
import dataclasses
import math

import cv2
import numpy as np

from vesseljax.data.sample import Sample

# Image seeds per split: seed * _SEEDS_PER_BASE + offset + i, so splits and
# base seeds never share an image.
_SPLIT_OFFSETS = {'train': 0, 'test': 10_000}
_MAX_IMAGES_PER_SPLIT = 10_000
_SEEDS_PER_BASE = 20_000
# Branching generations below the trunks.
_MAX_DEPTH = 5

# Vessel fraction inside the FOV; each image draws its target from this range.
_VESSEL_FRACTION_RANGE = (0.08, 0.125)
# Relative darkening per channel (R, G, B) for a vessel of contrast 1: vessels
# absorb green most, red least.
_VESSEL_CHANNEL_GAIN = np.array([0.45, 1.0, 0.8], np.float32)


@dataclasses.dataclass
class _Branch:
  """One vessel segment to grow: a curvy polyline from `start`.

  Attributes:
    start: (x, y) start point, pixels.
    angle: initial heading, radians (0 = +x, pi/2 = +y, i.e. down the image).
    width: starting width, pixels (>= 1).
    length: path length, pixels.
    contrast: darkening strength in (0, 1].
    waypoints: (x, y) points the path steers through in turn (arcades); a
      path without (or past its) waypoints drifts away from the disc.
    depth: branching generation, 0 for trunks.
  """
  start: tuple[float, float]
  angle: float
  width: float
  length: float
  contrast: float
  waypoints: tuple[tuple[float, float], ...] = ()
  depth: int = 0


def _gaussian_smooth_1d(x: np.ndarray, sigma: float) -> np.ndarray:
  """Smooths a 1-D float array with a normalised Gaussian ('same', edge)."""
  if sigma <= 0 or x.size < 2:
    return x
  r = max(1, int(math.ceil(3 * sigma)))
  t = np.arange(-r, r + 1, dtype=np.float64)
  k = np.exp(-0.5 * (t / sigma) ** 2)
  k /= k.sum()
  xp = np.pad(x, r, mode='edge')
  return np.convolve(xp, k, mode='valid')


def _turn_towards(a: float, target: float, gain: float) -> float:
  """Turns heading `a` by `gain` times its signed angle to `target`."""
  return a + gain * math.atan2(math.sin(target - a), math.cos(target - a))


def _grow_path(rng: np.random.Generator, branch: _Branch, step_px: float,
               centre: tuple[float, float], radius: float,
               disc: tuple[float, float], fovea: tuple[float, float],
               fovea_radius: float) -> np.ndarray:
  """Returns the branch's polyline as (n, 2) float (x, y) points, n >= 1.

  The heading follows smoothed random turns, steered through
  `branch.waypoints` where set, else weakly away from the disc; the path stops
  where it leaves the FOV circle or enters the avascular zone of radius
  `fovea_radius` around `fovea`.
  """
  n = max(2, int(branch.length / step_px) + 1)
  turns = _gaussian_smooth_1d(rng.normal(0.0, 0.25, n), 3.0)
  pts = np.empty((n, 2), np.float64)
  x, y = branch.start
  a = branch.angle
  waypoints = list(branch.waypoints)
  reach = 0.2 * radius
  for i in range(n):  # ~100 steps at most; steering needs the running point.
    pts[i] = x, y
    while waypoints and math.hypot(waypoints[0][0] - x,
                                   waypoints[0][1] - y) < reach:
      waypoints.pop(0)
    if waypoints:
      a = _turn_towards(
          a, math.atan2(waypoints[0][1] - y, waypoints[0][0] - x), 0.12)
    elif math.hypot(x - disc[0], y - disc[1]) > 1.0:
      a = _turn_towards(a, math.atan2(y - disc[1], x - disc[0]), 0.03)
    a += turns[i]
    x += step_px * math.cos(a)
    y += step_px * math.sin(a)
  r = np.hypot(pts[:, 0] - centre[0], pts[:, 1] - centre[1])
  r_fovea = np.hypot(pts[:, 0] - fovea[0], pts[:, 1] - fovea[1])
  outside = np.nonzero((r > radius) | (r_fovea < fovea_radius))[0]
  if outside.size:
    pts = pts[:max(1, outside[0] + 1)]
  return pts


def _vessel_map(rng: np.random.Generator, h: int, w: int,
                centre: tuple[float, float], radius: float,
                disc: tuple[float, float], fovea: tuple[float, float],
                temporal_sign: float, fov_u8: np.ndarray) -> np.ndarray:
  """Draws the vessel trees; returns (h, w) float32 darkening in [0, 1].

  Zero off vessels, the segment's contrast (> 0) on vessel pixels. Trees grow
  breadth first and stop once the vessel fraction inside the FOV reaches a
  target drawn from `_VESSEL_FRACTION_RANGE`.
  """
  size = min(h, w)
  dark = np.zeros((h, w), np.float32)
  step_px = max(1.5, 0.012 * size)
  w0 = max(1.0, 0.0085 * size * rng.uniform(0.9, 1.15))
  fov_px = max(1, int(cv2.countNonZero(fov_u8)))
  target_px = rng.uniform(*_VESSEL_FRACTION_RANGE) * fov_px
  fovea_radius = radius * rng.uniform(0.06, 0.1)
  # Temporal direction (towards the macula) is +x when temporal_sign > 0.
  temporal = 0.0 if temporal_sign > 0 else math.pi
  queue: collections.deque[_Branch] = collections.deque()
  # Two arcades (upper, lower), each an artery and a vein, curving around the
  # macula, plus a few shorter nasal trunks.
  for vertical in (-1.0, 1.0):
    for kind in ('vein', 'artery'):
      up = vertical * rng.uniform(1.0, 1.45)  # initial heading off horizontal
      # Around the macula, then on towards the temporal raphe.
      above = (fovea[0] + rng.normal(0, 0.1 * radius),
               fovea[1] + vertical * radius * rng.uniform(0.35, 0.55))
      raphe = (fovea[0] + temporal_sign * radius * rng.uniform(0.6, 0.9),
               fovea[1] + vertical * radius * rng.uniform(0.15, 0.35))
      queue.append(_Branch(
          start=(disc[0] + rng.normal(0, 0.01 * radius),
                 disc[1] + rng.normal(0, 0.01 * radius)),
          angle=temporal + temporal_sign * up,
          width=w0 * (1.0 if kind == 'vein' else 0.8),
          length=radius * rng.uniform(1.5, 1.9),
          contrast=rng.uniform(0.55, 0.75) if kind == 'vein'
          else rng.uniform(0.35, 0.55),
          waypoints=(above, raphe)))
  for _ in range(rng.integers(2, 4)):
    queue.append(_Branch(
        start=disc,
        angle=temporal + math.pi + rng.uniform(-1.2, 1.2),
        width=w0 * rng.uniform(0.55, 0.75),
        length=radius * rng.uniform(0.5, 0.8),
        contrast=rng.uniform(0.35, 0.65)))

  drawn = 0
  while queue:
    branch = queue.popleft()
    pts = _grow_path(rng, branch, step_px, centre, radius, disc, fovea,
                     fovea_radius)
    n = len(pts)
    # Width tapers along the branch; it also narrows after each side branch.
    widths = branch.width * np.linspace(1.0, rng.uniform(0.7, 0.9), n)
    num_children = 0
    if branch.depth < _MAX_DEPTH and n > 4:
      spacing = radius * rng.uniform(0.1, 0.2)
      num_children = int(rng.poisson(n * step_px / spacing))
    child_at = np.sort(
        rng.uniform(0.1, 0.95, num_children) * (n - 1)).astype(int)
    side = rng.choice([-1.0, 1.0])
    ipts = np.round(pts * 16).astype(np.int32)  # cv2 shift=4 sub-pixel points
    if n == 1:
      ipts = np.concatenate([ipts, ipts])
    # Segment i runs from point i to i + 1 and is 0.9x narrower after each
    # side branch before it; runs of equal thickness go to cv2 at once.
    seg = np.arange(len(ipts) - 1)
    narrowed = widths[seg] * 0.9 ** np.searchsorted(child_at, seg, 'left')
    thickness = np.maximum(1, np.round(narrowed)).astype(int)
    cuts = np.concatenate([[0], np.nonzero(np.diff(thickness))[0] + 1,
                           [len(seg)]])
    for lo, hi in zip(cuts[:-1].tolist(), cuts[1:].tolist()):
      cv2.polylines(dark, [ipts[lo:hi + 1]], False, float(branch.contrast),
                    thickness=int(thickness[lo]), lineType=cv2.LINE_8, shift=4)
    for k, i in enumerate(child_at.tolist()):
      j = min(i + 1, n - 1)
      local = math.atan2(pts[j, 1] - pts[i, 1], pts[j, 0] - pts[i, 0])
      cw = max(1.0, widths[i] * 0.9 ** (k + 1) * rng.uniform(0.4, 0.7))
      queue.append(_Branch(
          start=(float(pts[i, 0]), float(pts[i, 1])),
          angle=local + side * rng.uniform(0.5, 1.2),
          width=cw,
          length=max(4 * step_px, branch.length * rng.uniform(0.3, 0.55)),
          contrast=float(np.clip(branch.contrast * rng.uniform(0.75, 1.0),
                                 0.2, 1.0)),
          depth=branch.depth + 1))
      side = -side
    drawn += 1
    # All vessel pixels bound those inside the FOV from above: count those
    # (cheap) after every branch, and the exact number only when it may stop.
    if not queue or cv2.countNonZero(dark) >= target_px:
      inside = cv2.countNonZero(cv2.bitwise_and(
          (dark > 0).view(np.uint8), fov_u8))
      if inside >= target_px:
        break
      if not queue:  # Out of branches: sprout thin ones from vessel pixels.
        ys, xs = np.nonzero((dark > 0) & (fov_u8 > 0))
        if ys.size == 0 or drawn > 5000:
          break
        for _ in range(8):
          p = rng.integers(ys.size)
          queue.append(_Branch(
              start=(float(xs[p]), float(ys[p])),
              angle=rng.uniform(-math.pi, math.pi), width=1.0,
              length=radius * rng.uniform(0.15, 0.35),
              contrast=rng.uniform(0.25, 0.5), depth=9))
  return dark


def make_fundus(seed: int, size: tuple[int, int] = (256, 256)) -> Sample:
  """Draws one synthetic fundus photograph with its exact vessel label.

  Args:
    seed: non-negative int; the same seed gives identical arrays.
    size: (H, W) in pixels, each >= 16.

  Returns:
    A `Sample` with id f'synthetic/{seed:04d}': image (H, W, 3) uint8 RGB,
    label (H, W) bool (vessel pixels, all inside the FOV, about 8-13% of it),
    fov (H, W) bool (a disc), observer2 None.
  """
  h, w = int(size[0]), int(size[1])
  if h < 16 or w < 16:
    raise ValueError(f'size must be at least (16, 16), got {size}')
  if seed < 0:
    raise ValueError(f'seed must be non-negative, got {seed}')
  rng = np.random.default_rng(seed)
  s = min(h, w)

  # Field of view: a disc slightly inside the frame.
  centre = ((w - 1) / 2 + rng.normal(0, 0.005 * s),
            (h - 1) / 2 + rng.normal(0, 0.005 * s))
  radius = 0.5 * s * rng.uniform(0.9, 0.96)
  fov_u8 = np.zeros((h, w), np.uint8)
  cv2.circle(fov_u8, (int(round(centre[0] * 16)), int(round(centre[1] * 16))),
             int(round(radius * 16)), 1, thickness=-1, lineType=cv2.LINE_8,
             shift=4)
  fov = fov_u8.astype(bool)

  # Optic disc on a random side, the macula towards the centre.
  temporal_sign = rng.choice([-1.0, 1.0])  # +1: disc on the left, macula right
  disc = (centre[0] - temporal_sign * radius * rng.uniform(0.45, 0.6),
          centre[1] + rng.normal(0, 0.04 * radius))
  macula = (centre[0] + temporal_sign * radius * rng.uniform(0.0, 0.1),
            centre[1] + rng.normal(0, 0.03 * radius))
  disc_r = radius * rng.uniform(0.11, 0.14)

  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  rr = np.hypot(xx - centre[0], yy - centre[1]) / radius

  # Background: orange-red, with vignetting, a tilt and low-frequency blotches.
  base = np.array([rng.uniform(0.72, 0.9), rng.uniform(0.3, 0.42),
                   rng.uniform(0.1, 0.18)], np.float32)
  illum = 1.0 - rng.uniform(0.25, 0.5) * rr ** 2
  tilt_angle = rng.uniform(0, 2 * math.pi)
  illum += rng.uniform(0.0, 0.15) * (
      (xx - centre[0]) * math.cos(tilt_angle)
      + (yy - centre[1]) * math.sin(tilt_angle)) / radius
  blotch = cv2.resize(rng.normal(0, 1, (6, 6)).astype(np.float32), (w, h),
                      interpolation=cv2.INTER_CUBIC)
  illum += 0.05 * blotch
  d_mac = np.hypot(xx - macula[0], yy - macula[1]) / radius
  illum *= 1.0 - rng.uniform(0.15, 0.3) * np.exp(-0.5 * (d_mac / 0.13) ** 2)
  image = illum[..., None] * base

  # Optic disc: a bright yellowish disc with a soft rim and a brighter cup.
  d_disc = np.hypot(xx - disc[0], yy - disc[1])
  disc_mask = 1.0 / (1.0 + np.exp((d_disc - disc_r) / (0.15 * disc_r)))
  cup = np.exp(-0.5 * (d_disc / (0.4 * disc_r)) ** 2)
  disc_colour = np.array([1.0, 0.8, 0.55], np.float32)
  disc_gain = rng.uniform(0.5, 0.7)
  image += (disc_gain * disc_mask + 0.2 * cup)[..., None] * (
      disc_colour - 0.5 * image)

  # Vessels: label and darkening from the same rasterised trees.
  dark = _vessel_map(rng, h, w, centre, radius, disc, macula, temporal_sign,
                     fov_u8)
  label = (dark > 0) & fov
  image *= 1.0 - dark[..., None] * _VESSEL_CHANNEL_GAIN

  # Dark outside the FOV (anti-aliased rim), noise, slight blur.
  fov_soft = np.clip(radius - rr * radius + 0.5, 0.0, 1.0)
  image *= fov_soft[..., None]
  image += rng.standard_normal((h, w, 3), dtype=np.float32) * rng.uniform(
      0.008, 0.02)
  image = cv2.GaussianBlur(image, (3, 3), 0.6)
  image = np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8)
  return Sample(id=f'synthetic/{seed:04d}', image=image, label=label, fov=fov)


def split_seeds(split: str, num_images: int, seed: int = 0) -> list[int]:
  """The image seeds `make_split` uses; 'train' and 'test' never overlap.

  Args:
    split: 'train' or 'test'.
    num_images: in [0, 10000].
    seed: non-negative base seed; different base seeds give disjoint images.

  Returns:
    `num_images` distinct non-negative ints.
  """
  if split not in _SPLIT_OFFSETS:
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")
  if not 0 <= num_images <= _MAX_IMAGES_PER_SPLIT:
    raise ValueError(
        f'num_images must be in [0, {_MAX_IMAGES_PER_SPLIT}], got {num_images}')
  if seed < 0:
    raise ValueError(f'seed must be non-negative, got {seed}')
  first = seed * _SEEDS_PER_BASE + _SPLIT_OFFSETS[split]
  return list(range(first, first + num_images))


def make_split(split: str, num_images: int, size: tuple[int, int],
               seed: int = 0) -> list[Sample]:
  """Draws a synthetic split.

  Args:
    split: 'train' or 'test'; the two use disjoint image seeds.
    num_images: number of images, in [0, 10000].
    size: (H, W) in pixels.
    seed: non-negative base seed.

  Returns:
    `num_images` `Sample`s (see `make_fundus`), in seed order.
  """
  return [make_fundus(s, size) for s in split_seeds(split, num_images, seed)]
