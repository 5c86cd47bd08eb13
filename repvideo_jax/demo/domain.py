"""A tiny procedural text-to-video domain: one coloured shape moving on a black background.

Every clip is described by a ``Spec`` (shape, colour, motion); ``caption`` turns it into text such
as "a red circle moving left on a black background" and ``render`` draws it (numpy only,
deterministic given the seed). ``split_specs`` holds out whole (shape, colour, motion) combinations
for compositional-generalisation tests, ``write_dataset`` writes mp4s plus a ``captions.csv`` that
``python -m repvideo_jax.data.prepare`` reads, and ``detect`` / ``score`` are simple pixel-level
detectors for evaluating generated clips.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import pathlib

import numpy as np

from repvideo_jax.outputs import atomic_path
from repvideo_jax.video_io import write_mp4

__all__ = [
  "SHAPES",
  "COLORS",
  "MOTIONS",
  "PALETTE",
  "NEW_PALETTE",
  "Spec",
  "caption",
  "parse_caption",
  "render",
  "draw",
  "trajectory",
  "fit_render",
  "all_specs",
  "split_specs",
  "write_dataset",
  "detect",
  "score",
]

SHAPES = ("circle", "square", "triangle")
PALETTE = {
  "red": (255, 0, 0),
  "green": (0, 255, 0),
  "blue": (0, 0, 255),
  "yellow": (255, 255, 0),
  "white": (255, 255, 255),
}
COLORS = tuple(PALETTE)
# Colours outside the base domain: no caption or clip of the bundled model's training has them (its
# tokenizer reads the word as unknown). The LoRA lesson (repvideo_jax.demo.lesson) teaches one.
# Orange, between red and yellow, is one the demo VAE reproduces (detected right on every round trip);
# purple is not (red + blue never occur together in its training), so it cannot serve.
NEW_PALETTE = {"orange": (255, 128, 0)}
_ALL_COLORS = COLORS + tuple(NEW_PALETTE)
MOTIONS = ("moving left", "moving right", "moving up", "moving down", "growing", "shrinking")
BACKGROUND = "black"

# Geometry, as fractions of min(height, width). Shapes are large enough to survive the demo VAE's 8x
# spatial compression: under a Gaussian blur of sigma 1.5 px at 64x64 the detector still reads every
# combination's shape right. The earlier half-sizes (0.12-0.18, small end 0.10-0.13) fell to 0.94 at
# sigma 1.5 and 0.59 at sigma 2, squares and triangles read as circles.
_TRAVEL = 0.35  # distance travelled by a translating shape over the clip
_SIZE = (0.17, 0.25)  # half-size range of a translating shape
_GROW_SMALL = (0.14, 0.18)  # half-size range at the small end of growing / shrinking
_GROW_FACTOR = 2.0  # large half-size / small half-size
_MIN_HALF = 6.0  # pixels: below this the shapes' fill ratios start to overlap


@dataclasses.dataclass(frozen=True)
class Spec:
  """What one clip shows: ``shape`` in SHAPES, ``color`` in COLORS (or NEW_PALETTE), ``motion`` in MOTIONS."""

  shape: str
  color: str
  motion: str

  def __post_init__(self):
    if self.shape not in SHAPES:
      raise ValueError(f"shape must be one of {SHAPES}, got {self.shape!r}")
    if self.color not in _ALL_COLORS:
      raise ValueError(f"color must be one of {_ALL_COLORS}, got {self.color!r}")
    if self.motion not in MOTIONS:
      raise ValueError(f"motion must be one of {MOTIONS}, got {self.motion!r}")


def caption(spec: Spec) -> str:
  """E.g. "a red circle moving left on a black background" ("an orange ...": no base colour starts with
  a vowel)."""
  article = "an" if spec.color[0] in "aeiou" else "a"
  return f"{article} {spec.color} {spec.shape} {spec.motion} on a {BACKGROUND} background"


def parse_caption(text: str) -> Spec | None:
  """The ``Spec`` a caption of ``caption``'s template describes, or None for any other text."""
  words = " ".join(text.lower().split())
  for spec in all_specs():
    if caption(spec) == words:
      return spec
  return None


def all_specs() -> list[Spec]:
  """Every (shape, colour, motion) combination, in a fixed order."""
  return [Spec(s, c, m) for s, c, m in itertools.product(SHAPES, COLORS, MOTIONS)]


# ------------------------------------------------------------------------------------------------
# Rendering


def _mask(shape: str, cx: float, cy: float, r: float, height: int, width: int) -> np.ndarray:
  """Boolean (H, W) mask of ``shape`` with centre (cx, cy) and half-size r (pixel centres)."""
  y, x = np.mgrid[0:height, 0:width].astype(np.float64)
  if shape == "circle":
    return (x - cx) ** 2 + (y - cy) ** 2 <= r * r
  if shape == "square":
    return (np.abs(x - cx) <= r) & (np.abs(y - cy) <= r)
  # Triangle pointing up: apex (cx, cy - r), base from (cx - r, cy + r) to (cx + r, cy + r).
  t = (y - (cy - r)) / (2 * r)  # 0 at the apex, 1 at the base
  return (t >= 0) & (t <= 1) & (np.abs(x - cx) <= r * t)


def trajectory(motion: str, num_frames: int, height: int, width: int, rng: np.random.Generator):
  """A random path of ``motion`` drawn from ``rng``: (cx, cy, r) arrays of length num_frames (the
  centre and half-size of each frame, as ``draw`` takes them), keeping the shape inside the frame."""
  m = min(height, width)
  t = np.linspace(0.0, 1.0, num_frames)
  if motion in ("growing", "shrinking"):
    r_small = rng.uniform(*_GROW_SMALL) * m
    r_small = max(r_small, _MIN_HALF)
    r_big = r_small * _GROW_FACTOR
    cx = rng.uniform(r_big, width - 1 - r_big)
    cy = rng.uniform(r_big, height - 1 - r_big)
    r0, r1 = (r_small, r_big) if motion == "growing" else (r_big, r_small)
    return np.full(num_frames, cx), np.full(num_frames, cy), r0 + (r1 - r0) * t
  r = max(rng.uniform(*_SIZE) * m, _MIN_HALF)
  travel = _TRAVEL * m
  dx, dy = {"moving left": (-1, 0), "moving right": (1, 0), "moving up": (0, -1), "moving down": (0, 1)}[
    motion
  ]

  # Start range so that start and end positions are both fully inside the frame.
  def start(d, size):
    lo, hi = r, size - 1 - r
    if d < 0:
      lo += travel
    elif d > 0:
      hi -= travel
    if lo > hi:
      raise ValueError(f"frame {height}x{width} too small for motion {motion!r}")
    return rng.uniform(lo, hi)

  x0, y0 = start(dx, width), start(dy, height)
  return x0 + dx * travel * t, y0 + dy * travel * t, np.full(num_frames, r)


def render(
  spec: Spec, *, num_frames: int = 9, height: int = 64, width: int = 64, seed: int = 0
) -> np.ndarray:
  """Draws ``spec`` as uint8 RGB frames (T, H, W, 3) on black, with exact palette colours.

  Start position and size are drawn from ``seed`` (same seed, same frames), constrained so that the
  whole shape stays in frame for the whole clip. The motion spans the clip from the first frame to
  the last (linear in time).
  """
  if num_frames < 2:
    raise ValueError(f"num_frames must be >= 2 to show a motion, got {num_frames}")
  if min(height, width) < 32:
    raise ValueError(f"frames must be at least 32x32, got {height}x{width}")
  rng = np.random.default_rng(
    np.random.SeedSequence(
      [int(seed), SHAPES.index(spec.shape), _ALL_COLORS.index(spec.color), MOTIONS.index(spec.motion)]
    )
  )
  cxs, cys, rs = trajectory(spec.motion, num_frames, height, width, rng)
  return draw(spec.shape, spec.color, cxs, cys, rs, height=height, width=width)


def draw(shape: str, color: str, cx, cy, r, *, height: int = 64, width: int = 64) -> np.ndarray:
  """uint8 frames (T, H, W, 3): ``shape`` in ``color`` on black, frame i with centre (cx[i], cy[i])
  and half-size r[i] (pixels; a triangle's centre is its bounding box's). ``render`` draws a seeded
  path with it; the demo's tuning stages draw the same shape on another clip's path."""
  cx, cy, r = (np.asarray(a, np.float64) for a in (cx, cy, r))
  frames = np.zeros((len(cx), height, width, 3), np.uint8)
  rgb = np.array({**PALETTE, **NEW_PALETTE}[color], np.uint8)
  for i in range(len(cx)):
    frames[i][_mask(shape, cx[i], cy[i], r[i], height, width)] = rgb
  return frames


def fit_render(frames: np.ndarray, spec: Spec, *, per_frame: bool = True, min_half: float = 5.0):
  """The clean render of ``spec`` on the path of the shape in ``frames`` (uint8 (T, H, W, 3), e.g. a
  generated clip), or None when fewer than half of the frames show a shape.

  Each frame's foreground (as ``detect`` sees it) gives a centre (its centroid) and a half-size
  (the one at which ``spec.shape`` has the foreground's area). With ``per_frame`` every frame keeps
  its own; frames with fewer than 8 foreground pixels, and with ``per_frame=False`` all frames, take
  a straight line in time fitted to the others. Half-sizes are at least ``min_half`` pixels."""
  fg = _foreground(frames)
  n, (height, width) = len(fg), fg.shape[1:]
  cx, cy, r, ok = np.zeros(n), np.zeros(n), np.zeros(n), np.zeros(n, bool)
  for i, mask in enumerate(fg):
    ys, xs = np.nonzero(mask)
    if len(ys) < 8:
      continue
    area = float(len(ys))
    half = {"square": (np.sqrt(area) - 1) / 2, "circle": np.sqrt(area / np.pi), "triangle": np.sqrt(area / 2)}
    r[i] = half[spec.shape]
    # A triangle's centroid lies a third of its half-size below its bounding box's centre.
    cx[i], cy[i] = xs.mean(), ys.mean() - (r[i] / 3 if spec.shape == "triangle" else 0.0)
    ok[i] = True
  if ok.sum() < max(2, (n + 1) // 2):
    return None
  t = np.linspace(0.0, 1.0, n)
  cx, cy, r = (np.where(ok & per_frame, y, np.polyval(np.polyfit(t[ok], y[ok], 1), t)) for y in (cx, cy, r))
  return draw(spec.shape, spec.color, cx, cy, np.maximum(r, min_half), height=height, width=width)


# ------------------------------------------------------------------------------------------------
# Held-out split


def split_specs(seed: int = 0, holdout_fraction: float = 0.2) -> tuple[list[Spec], list[Spec]]:
  """Splits ``all_specs()`` into (train, heldout) by whole (shape, colour, motion) combination.

  About ``holdout_fraction`` of the combinations are held out, chosen at random from ``seed``
  (deterministic), under the constraint that every shape, colour and motion value keeps at least
  two combinations in train — so held-out captions are novel compositions of seen words.
  """
  if not 0 <= holdout_fraction < 1:
    raise ValueError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")
  specs = all_specs()
  target = int(round(holdout_fraction * len(specs)))
  counts = {}
  for s in specs:
    for key in ((0, s.shape), (1, s.color), (2, s.motion)):
      counts[key] = counts.get(key, 0) + 1
  held = set()
  for i in np.random.default_rng(seed).permutation(len(specs)):
    if len(held) >= target:
      break
    s = specs[i]
    keys = ((0, s.shape), (1, s.color), (2, s.motion))
    if all(counts[k] > 2 for k in keys):
      for k in keys:
        counts[k] -= 1
      held.add(int(i))
  train = [s for i, s in enumerate(specs) if i not in held]
  heldout = [s for i, s in enumerate(specs) if i in held]
  return train, heldout


# ------------------------------------------------------------------------------------------------
# Dataset writing


def _slug(spec: Spec) -> str:
  return f"{spec.shape}_{spec.color}_{spec.motion.replace(' ', '_')}"


def write_dataset(
  out_dir,
  specs,
  *,
  per_spec: int = 2,
  num_frames: int = 9,
  height: int = 64,
  width: int = 64,
  fps: float = 8,
  seed: int = 0,
) -> pathlib.Path:
  """Renders ``per_spec`` clips of each spec to ``out_dir/videos/*.mp4`` and writes
  ``out_dir/captions.csv`` (columns path,caption; paths relative to ``out_dir``), so that
  ``python -m repvideo_jax.data.prepare --videos out_dir --captions out_dir/captions.csv`` reads it.
  Returns the path of the CSV. Clip k of a spec is rendered with seed ``seed * 1000 + k``.
  """

  if per_spec < 1:
    raise ValueError(f"per_spec must be >= 1, got {per_spec}")
  specs = list(specs)
  if not specs:
    raise ValueError("no specs to write")
  out = pathlib.Path(out_dir)
  (out / "videos").mkdir(parents=True, exist_ok=True)
  rows = []
  for spec in specs:
    for k in range(per_spec):
      rel = f"videos/{_slug(spec)}_{k}.mp4"
      frames = render(spec, num_frames=num_frames, height=height, width=width, seed=seed * 1000 + k)
      write_mp4(out / rel, frames, fps)
      rows.append((rel, caption(spec)))
  csv_path = out / "captions.csv"
  with atomic_path(csv_path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(["path", "caption"])
    writer.writerows(rows)
  return csv_path


# ------------------------------------------------------------------------------------------------
# Detectors

_FG_THRESHOLD = 96  # a pixel is foreground when its brightest channel exceeds this
_MOVE_MIN = 0.08  # min centroid travel, as a fraction of min(H, W), to call a translation
_AREA_CHANGE = 1.5  # area ratio last/first beyond which the shape is growing (or 1/x shrinking)


def _foreground(frames: np.ndarray) -> np.ndarray:
  return frames.max(axis=-1) > _FG_THRESHOLD


def detect(frames: np.ndarray, palette: dict[str, tuple[int, int, int]] | None = None) -> dict:
  """Guesses (color, shape, motion) from uint8 frames (T, H, W, 3) of one shape on black.

  color:  the colour of ``palette`` (default PALETTE) nearest to the mean of all foreground pixels
  shape:  from the median fill ratio of the shape's bounding box (square ~1, circle ~0.79,
          triangle ~0.5)
  motion: growing / shrinking when the foreground area changes by more than 1.5x between the first
          and last frames, else the dominant direction of the centroid displacement
  Values are None when they cannot be decided (e.g. no foreground, or no clear motion).
  """
  frames = np.asarray(frames)
  if frames.ndim != 4 or frames.shape[-1] != 3:
    raise ValueError(f"expected frames (T, H, W, 3), got shape {frames.shape}")
  fg = _foreground(frames)
  result = {"color": None, "shape": None, "motion": None}
  if not fg.any():
    return result
  mean = frames[fg].astype(np.float64).mean(axis=0)
  palette = PALETTE if palette is None else palette
  names = list(palette)
  dists = [np.sum((mean - np.array(palette[n], np.float64)) ** 2) for n in names]
  result["color"] = names[int(np.argmin(dists))]

  fills, centroids, areas = [], [], []
  for mask in fg:
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
      continue
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    fills.append(len(ys) / box)
    centroids.append((xs.mean(), ys.mean()))
    areas.append(len(ys))
  fill = float(np.median(fills))
  result["shape"] = "square" if fill > 0.92 else "circle" if fill > 0.63 else "triangle"

  if len(areas) >= 2:
    ratio = areas[-1] / areas[0]
    dx = centroids[-1][0] - centroids[0][0]
    dy = centroids[-1][1] - centroids[0][1]
    if ratio > _AREA_CHANGE:
      result["motion"] = "growing"
    elif ratio < 1 / _AREA_CHANGE:
      result["motion"] = "shrinking"
    elif max(abs(dx), abs(dy)) >= _MOVE_MIN * min(frames.shape[1:3]):
      if abs(dx) >= abs(dy):
        result["motion"] = "moving right" if dx > 0 else "moving left"
      else:
        result["motion"] = "moving down" if dy > 0 else "moving up"
  return result


def score(spec: Spec, detected: dict) -> dict:
  """Per-attribute 0/1 agreement between ``spec`` and ``detect(...)``'s output."""
  return {k: int(detected.get(k) == getattr(spec, k)) for k in ("color", "shape", "motion")}
