"""Video reading, clip sampling and writing for RepVideo (numpy only, no jax).

Layout conventions (channels last, as everywhere in this package):
  uint8 frames   (T, H, W, 3)  RGB, 0..255, what ``read_video`` returns and ``write_*`` take
  model video    (T, H, W, 3)  float32 RGB in [-1, 1], what ``load_clip`` returns

Reading goes through PyAV (FFmpeg). Frames are decoded lazily, one at a time, and decoding stops at
the last frame that is needed; only the frames that are kept are converted to RGB. Every failure to
read a file (missing, empty, not a video, corrupt / truncated, no video stream, no decodable frame,
too short for the requested clip) raises ``VideoError`` (a ``ValueError``) whose message names the
file and the problem.

Frame timing: frame ``i`` is taken to be shown at ``i / fps`` (constant frame rate), with ``fps``
the stream's average rate. For variable-frame-rate files this is an approximation. Rotation
metadata is ignored (frames are returned as stored).

Typical use:
    video = load_clip("clip.mp4", num_frames=49, height=480, width=720, fps=8)  # (49, 480, 720, 3)
    write_mp4("out.mp4", to_uint8(video), fps=8)
"""

from __future__ import annotations

import dataclasses
import fractions
import math
import os
from collections.abc import Iterator

import av
import numpy as np
from PIL import Image

from repvideo_jax import host_memory
from repvideo_jax.outputs import atomic_path

__all__ = [
  "VideoError",
  "VideoInfo",
  "probe",
  "read_video",
  "sample_frame_indices",
  "resize_center_crop",
  "load_clip",
  "to_uint8",
  "write_mp4",
  "write_gif",
]

# Seek (to the keyframe before the first wanted frame) instead of decoding from the start only when
# the clip starts at least this far in: short skips are cheaper to decode than to seek.
_SEEK_MIN_SECONDS = 2.0


class VideoError(ValueError):
  """A video file cannot be read, or does not hold what was asked of it."""


@dataclasses.dataclass(frozen=True)
class VideoInfo:
  """Metadata of the first video stream of a file.

  frames:   number of frames (from the container header; counted by demuxing if it has none)
  fps:      average frame rate (frames per second)
  width, height: frame size in pixels
  duration: seconds (stream duration if known, else container duration, else frames / fps)
  codec:    FFmpeg decoder name, e.g. "h264"
  """

  frames: int
  fps: float
  width: int
  height: int
  duration: float
  codec: str


# ------------------------------------------------------------------------------------------------
# Opening files


def _check_path(path) -> str:
  path = os.fspath(path)
  if not os.path.exists(path):
    raise VideoError(f"video file not found: {path!r}")
  if not os.path.isfile(path):
    raise VideoError(f"not a file: {path!r}")
  if os.path.getsize(path) == 0:
    raise VideoError(f"video file is empty (0 bytes): {path!r}")
  return path


def _open(path) -> tuple[str, av.container.InputContainer, av.video.stream.VideoStream]:
  """Opens ``path`` and returns (path, container, first video stream); the caller closes it."""
  path = _check_path(path)
  try:
    container = av.open(path, mode="r")
  except av.FFmpegError as e:
    raise VideoError(f"cannot open {path!r}: not a video file, or corrupt / truncated ({e})") from e
  if not container.streams.video:
    kinds = sorted({s.type for s in container.streams}) or ["none"]
    container.close()
    raise VideoError(f"no video stream in {path!r} (not a video file? streams found: {', '.join(kinds)})")
  return path, container, container.streams.video[0]


def _stream_fps(path: str, stream) -> float:
  for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
    if rate is not None and rate > 0:
      return float(rate)
  raise VideoError(f"cannot determine the frame rate of {path!r}")


def _decode(
  path: str, container, stream, start: int = 0, fps: float | None = None
) -> Iterator[tuple[int, av.VideoFrame]]:
  """Yields (frame index, frame) for frames with index >= ``start``, decoding lazily.

  Indices count decoded frames from the start of the stream. When ``start`` is far enough in, seeks
  to the keyframe before it and derives indices from presentation timestamps instead (constant frame
  rate assumed); if the seek lands past ``start`` it falls back to decoding from the beginning.
  """
  if start > 0 and fps and start / fps >= _SEEK_MIN_SECONDS and stream.time_base:
    origin = stream.start_time or 0
    target = origin + int((start / fps) / stream.time_base)
    try:
      container.seek(target, stream=stream, backward=True, any_frame=False)
      frames = _wrap_decode(path, container, stream)
      first = True
      for frame in frames:
        if frame.pts is None:
          if not first:
            raise VideoError(f"frame without timestamp in {path!r} after seeking; corrupt?")
          break  # no timestamps: cannot place the frames, decode from the start instead
        index = round(float((frame.pts - origin) * stream.time_base) * fps)
        if first and index > start:
          break  # landed past the wanted frame: decode from the start instead
        first = False
        if index >= start:
          yield index, frame
      else:
        return
      frames.close()
    except av.FFmpegError:
      pass  # seek failed: decode from the start
    container.seek(stream.start_time or 0, stream=stream, backward=True, any_frame=False)
  for index, frame in enumerate(_wrap_decode(path, container, stream)):
    if index >= start:
      yield index, frame


def _wrap_decode(path: str, container, stream) -> Iterator[av.VideoFrame]:
  count = 0
  try:
    for frame in container.decode(stream):
      count += 1
      yield frame
  except av.FFmpegError as e:
    raise VideoError(f"corrupt video data in {path!r} after {count} decoded frame(s): {e}") from e


# ------------------------------------------------------------------------------------------------
# Reading


def probe(path) -> VideoInfo:
  """Reads the metadata of the first video stream of ``path`` without decoding any frame.

  Only the container header is read, so a file whose header is intact but whose frame data is
  truncated still probes fine; ``read_video`` / ``load_clip`` report such files when decoding.
  """
  path, container, stream = _open(path)
  with container:
    fps = _stream_fps(path, stream)
    frames = int(stream.frames or 0)
    if frames <= 0:  # e.g. Matroska / WebM headers carry no frame count: count the packets
      try:
        frames = sum(1 for p in container.demux(stream) if p.size > 0)
      except av.FFmpegError as e:
        raise VideoError(f"corrupt video data in {path!r}: {e}") from e
    if stream.duration is not None and stream.time_base is not None:
      duration = float(stream.duration * stream.time_base)
    elif container.duration is not None:
      duration = container.duration / av.time_base
    else:
      duration = frames / fps
    width, height = stream.codec_context.width, stream.codec_context.height
    if frames <= 0 or width <= 0 or height <= 0:
      raise VideoError(f"{path!r} holds no usable video (frames={frames}, size={width}x{height}); corrupt?")
    return VideoInfo(
      frames=frames, fps=fps, width=width, height=height, duration=duration, codec=stream.codec_context.name
    )


def read_video(path, *, max_frames: int | None = None) -> tuple[np.ndarray, float]:
  """Decodes the first video stream of ``path``.

  Returns (frames uint8 (T, H, W, 3) RGB, fps). With ``max_frames`` decoding stops after that many
  frames. Raises ``VideoError`` if the file is missing, not a video, corrupt, or has no frame.
  """
  if max_frames is not None and max_frames < 1:
    raise ValueError(f"max_frames must be >= 1 or None, got {max_frames}")
  path, container, stream = _open(path)
  with container:
    fps = _stream_fps(path, stream)
    frames = []
    for _, frame in _decode(path, container, stream):
      frames.append(frame.to_ndarray(format="rgb24"))
      if max_frames is not None and len(frames) >= max_frames:
        break
  if not frames:
    raise VideoError(f"{path!r} contains no decodable video frames (truncated or corrupt?)")
  return np.stack(frames), fps


# ------------------------------------------------------------------------------------------------
# Clip selection and resizing


def sample_frame_indices(
  num_frames: int, src_fps: float, target_fps: float, count: int, start: int = 0
) -> np.ndarray:
  """Indices of ``count`` frames taken at ``target_fps`` from ``num_frames`` frames at ``src_fps``.

  Frame ``k`` of the result is source frame ``start + round(k * src_fps / target_fps)`` (the source
  frame nearest to time ``start / src_fps + k / target_fps``). If ``target_fps > src_fps`` source
  frames repeat. Raises ``VideoError`` if the clip is too short, saying what it has and needs.
  """
  if count < 1:
    raise ValueError(f"count must be >= 1, got {count}")
  if not (src_fps > 0 and target_fps > 0):
    raise ValueError(f"frame rates must be positive, got src_fps={src_fps}, target_fps={target_fps}")
  if start < 0:
    raise ValueError(f"start must be >= 0, got {start}")
  stride = src_fps / target_fps
  # floor(x + 0.5): round half up, so the choice never depends on numpy's round-half-to-even.
  indices = start + np.floor(np.arange(count) * stride + 0.5).astype(np.int64)
  needed = int(indices[-1]) + 1
  if needed > num_frames:
    raise VideoError(
      f"clip too short: {count} frames at {target_fps:g} fps (starting at frame {start}, "
      f"{start / src_fps:.2f} s) need {needed} source frames ({needed / src_fps:.2f} s at "
      f"{src_fps:.4g} fps), but it has only {num_frames} frames ({num_frames / src_fps:.2f} s)"
    )
  return indices


def _resize_crop_one(image: Image.Image, height: int, width: int) -> Image.Image:
  w, h = image.size
  if h * width > w * height:  # source is taller than the target aspect: crop rows
    crop_h = w * height / width
    box = (0.0, (h - crop_h) / 2, float(w), (h + crop_h) / 2)
  else:  # source is wider (or equal): crop columns
    crop_w = h * width / height
    box = ((w - crop_w) / 2, 0.0, (w + crop_w) / 2, float(h))
  return image.resize((width, height), Image.Resampling.BICUBIC, box=box)


def resize_center_crop(frames: np.ndarray, height: int, width: int) -> np.ndarray:
  """Aspect-preserving resize so the frame covers (height, width), then center crop.

  ``frames``: (T, H, W, C) or (H, W, C), uint8 or floating point; the result has the same layout and
  dtype. Implemented with PIL bicubic resampling per frame (and per channel for float input, in
  32-bit float mode): the centered source region with the target aspect ratio (a fractional box, so
  no rounding of the intermediate size) is resampled straight to (height, width). PIL widens the
  bicubic kernel when shrinking, so downscaling is antialiased (area-like). Bicubic can overshoot:
  uint8 output is clipped to 0..255 by PIL, float output is not clipped.
  """
  frames = np.asarray(frames)
  if frames.ndim == 3:
    return resize_center_crop(frames[None], height, width)[0]
  if frames.ndim != 4:
    raise ValueError(f"expected frames of shape (T, H, W, C) or (H, W, C), got {frames.shape}")
  if height < 1 or width < 1:
    raise ValueError(f"target size must be positive, got {height}x{width}")
  t, h, w, c = frames.shape
  if (h, w) == (height, width):
    return frames.copy()
  if frames.dtype == np.uint8 and c in (1, 3, 4):
    out = np.empty((t, height, width, c), np.uint8)
    for i in range(t):
      img = Image.fromarray(np.ascontiguousarray(frames[i, ..., 0] if c == 1 else frames[i]))
      out[i] = np.asarray(_resize_crop_one(img, height, width)).reshape(height, width, c)
    return out
  if not np.issubdtype(frames.dtype, np.floating):
    raise ValueError(f"frames must be uint8 or floating point, got {frames.dtype}")
  out = np.empty((t, height, width, c), np.float32)
  for i in range(t):
    for k in range(c):
      img = Image.fromarray(np.ascontiguousarray(frames[i, ..., k], dtype=np.float32))
      out[i, ..., k] = np.asarray(_resize_crop_one(img, height, width))
  return out.astype(frames.dtype, copy=False)


def load_clip(
  path, *, num_frames: int = 49, height: int = 480, width: int = 720, fps: float = 8, start_sec: float = 0.0
) -> np.ndarray:
  """Loads a model-ready clip: float32 (num_frames, height, width, 3) in [-1, 1].

  Frames are taken at ``fps`` starting at ``start_sec`` (see ``sample_frame_indices``), resized to
  cover (height, width) and center-cropped (see ``resize_center_crop``). Decoding stops after the
  last needed frame and seeks when ``start_sec`` is far in; only the kept frames are converted.

  ``num_frames`` must be 4k + 1 (the VAE compresses time 4x and keeps frame 0 on its own) and
  ``height`` / ``width`` multiples of 16 (VAE downsampling 8 x transformer patch 2). A clip too
  short for ``num_frames`` at ``fps`` raises ``VideoError``.
  """
  if not isinstance(num_frames, (int, np.integer)) or num_frames < 1 or (num_frames - 1) % 4:
    raise ValueError(
      f"num_frames must be of the form 4k+1 (1, 5, 9, ..., 49), got {num_frames}: the VAE "
      f"compresses time 4x keeping frame 0 separate"
    )
  for name, value in (("height", height), ("width", width)):
    if not isinstance(value, (int, np.integer)) or value < 16 or value % 16:
      raise ValueError(
        f"{name} must be a positive multiple of 16 (VAE 8x downsampling x patch size 2), got {value}"
      )
  if not fps > 0:
    raise ValueError(f"fps must be positive, got {fps}")
  if not start_sec >= 0:
    raise ValueError(f"start_sec must be >= 0, got {start_sec}")

  path, container, stream = _open(path)
  with container:
    src_fps = _stream_fps(path, stream)
    start = int(math.floor(start_sec * src_fps + 0.5))
    # The header count may be missing (0); then sample as if unbounded and find out while decoding.
    total = int(stream.frames or 0)
    try:
      indices = sample_frame_indices(total or np.iinfo(np.int64).max, src_fps, fps, num_frames, start)
    except VideoError as e:
      raise VideoError(f"{path!r}: {e}") from None
    wanted = {}  # source index -> positions in the clip (repeats when fps > src_fps)
    for pos, idx in enumerate(indices.tolist()):
      wanted.setdefault(idx, []).append(pos)
    last = int(indices[-1])
    out = np.empty((num_frames, height, width, 3), np.uint8)
    decoded = 0
    for idx, frame in _decode(path, container, stream, start=start, fps=src_fps):
      decoded = idx + 1
      if idx in wanted:
        rgb = resize_center_crop(frame.to_ndarray(format="rgb24"), height, width)
        for pos in wanted.pop(idx):
          out[pos] = rgb
      if idx >= last:
        break
  if wanted:
    if decoded == 0 and start == 0:
      raise VideoError(f"{path!r} contains no decodable video frames (truncated or corrupt?)")
    if decoded == 0:
      raise VideoError(
        f"{path!r}: no decodable video frame at or after frame {start} "
        f"({start_sec:g} s); clip too short, truncated or corrupt?"
      )
    # Only reachable if the header frame count was missing or wrong.
    try:
      sample_frame_indices(decoded, src_fps, fps, num_frames, start)
    except VideoError as e:
      raise VideoError(f"{path!r}: {e}") from None
    raise VideoError(f"{path!r}: missing frames {sorted(wanted)} (corrupt?)")
  return from_uint8(out)


# ------------------------------------------------------------------------------------------------
# Writing


def from_uint8(frames: np.ndarray) -> np.ndarray:
  """Maps uint8 frames 0..255 to float32 in [-1, 1] (what the VAE takes): x / 127.5 - 1."""
  return np.asarray(frames, np.float32) / np.float32(127.5) - np.float32(1.0)


def to_uint8(video: np.ndarray) -> np.ndarray:
  """Maps a video in [-1, 1] to uint8 0..255: clip((x + 1) / 2, 0, 1) * 255, rounded."""
  x = np.asarray(video, dtype=np.float32)
  return np.round(np.clip((x + 1.0) * 0.5, 0.0, 1.0) * 255.0).astype(np.uint8)


def _check_uint8_frames(frames) -> np.ndarray:
  frames = np.asarray(frames)
  if frames.dtype != np.uint8:
    raise ValueError(f"frames must be uint8 (use to_uint8 for [-1, 1] video), got {frames.dtype}")
  if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
    raise ValueError(f"frames must have shape (T >= 1, H, W, 3), got {frames.shape}")
  return frames


def write_mp4(path, frames: np.ndarray, fps: float = 8, *, crf: int = 18) -> None:
  """Writes uint8 RGB frames (T, H, W, 3) as H.264 (libx264, yuv420p) MP4, atomically.

  yuv420p subsamples chroma 2x in both directions, so H and W must be even: odd sizes raise
  ``ValueError`` (crop or pad the frames yourself) rather than being silently changed. ``crf`` is
  the x264 constant rate factor (0 = lossless YUV, 18 ~ visually lossless, 23 = x264 default); the
  RGB -> yuv420p conversion itself costs ~1-2 levels of mean error on smooth content.
  The file is encoded to a temporary file in the same directory and renamed over ``path``, so
  ``path`` never holds a partial video.
  """
  frames = _check_uint8_frames(frames)
  _, h, w, _ = frames.shape
  if h % 2 or w % 2:
    raise ValueError(f"write_mp4 needs an even height and width for yuv420p, got {h}x{w}")
  if not fps > 0:
    raise ValueError(f"fps must be positive, got {fps}")
  rate = fractions.Fraction(fps).limit_denominator(1001)

  # libx264 reads bytes it never writes: zero the allocations, so the file cannot depend on what the
  # process freed before (repvideo_jax/host_memory.py).
  with (
    host_memory.zeroed_allocations(),
    atomic_path(path, suffix=".mp4") as tmp,
    av.open(str(tmp), mode="w", format="mp4") as container,
  ):
    stream = container.add_stream("libx264", rate=rate)
    stream.width, stream.height = w, h
    stream.pix_fmt = "yuv420p"
    # One encoder thread: with frame threads x264's output varied run to run under load, and the
    # same frames must always give the same file bytes.
    stream.options = {"crf": str(int(crf)), "threads": "1"}
    for index, image in enumerate(frames):
      frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
      # Convert to yuv420p ourselves: leaving it to the encoder path gave different bitstreams
      # from identical frames run to run, and the same seed must give the same file bytes.
      frame = frame.reformat(format="yuv420p")
      frame.pts = index
      container.mux(stream.encode(frame))
    container.mux(stream.encode(None))  # flush delayed (B-) frames


def write_gif(path, frames: np.ndarray, fps: float = 8, *, loop: int = 0) -> None:
  """Writes uint8 RGB frames (T, H, W, 3) as an animated GIF with PIL, atomically.

  Each frame gets its own adaptive 256-colour palette. GIF delays are in 1/100 s, so per-frame
  delays alternate (e.g. 120 / 130 ms at 8 fps) to keep the total duration right (to 10 ms).
  ``loop=0`` loops forever.
  Note: PIL merges identical consecutive frames into one (summing their delays), so a GIF of a
  static stretch plays correctly but decodes to fewer frames.
  """
  frames = _check_uint8_frames(frames)
  if not fps > 0:
    raise ValueError(f"fps must be positive, got {fps}")
  ends = [int(round(100 * (i + 1) / fps)) for i in range(len(frames))]
  durations = [10 * max(1, b - a) for a, b in zip([0] + ends[:-1], ends)]
  images = [Image.fromarray(np.ascontiguousarray(f)).quantize(256) for f in frames]

  with atomic_path(path, suffix=".gif") as tmp:
    images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=durations, loop=loop)
