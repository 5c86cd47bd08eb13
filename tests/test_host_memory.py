"""repvideo_jax.host_memory: freed host memory is reused instead of faulted in again, and the
setting is chosen from the environment as documented."""

import os
import subprocess
import sys
import textwrap

import pytest

from repvideo_jax import host_memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A child process: apply the mode, then allocate, touch and free a 256 MB block twice (a stand-in
# for one compiled call's temporaries) and print the minor page faults of the second time.
_CHILD = textwrap.dedent(
  """
  import ctypes, resource
  from repvideo_jax import host_memory
  print(host_memory.setup_cli())
  libc = ctypes.CDLL(None)
  libc.malloc.restype = ctypes.c_void_p
  libc.free.argtypes = [ctypes.c_void_p]
  def touch():  # plain malloc, as XLA's runtime allocates (numpy would ask for huge pages)
    p = libc.malloc(256 * 2**20)
    ctypes.memset(p, 1, 256 * 2**20)  # every page written
    libc.free(p)
  touch()
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  touch()
  print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
  """
)


def _run_child(mode: str) -> tuple[str, int]:
  env = {**os.environ, host_memory.ENV: mode}
  out = subprocess.run(
    [sys.executable, "-c", _CHILD], env=env, cwd=REPO, capture_output=True, text=True, check=True
  ).stdout.split()
  return out[0], int(out[1])


@pytest.mark.skipif(host_memory._glibc() is None, reason="the setting exists for glibc only")
def test_reuse_stops_page_faults_on_a_second_allocation():
  pages = 256 * 2**20 // os.sysconf("SC_PAGE_SIZE")
  mode, faults = _run_child("system")
  assert mode == "system"
  assert faults > pages // 2, faults  # glibc's default: the block is mmapped afresh each time
  mode, faults = _run_child("reuse")
  assert mode == "reuse"
  assert faults < pages // 50, faults  # kept in the heap: (almost) no new faults


# A child process: apply the mode, then encode one clip eight times with write_mp4, after a JAX
# computation and numpy noise have filled the heap and been freed; print the files' hashes.
_ENCODE_CHILD = textwrap.dedent(
  """
  import contextlib, hashlib, os, sys, tempfile
  from repvideo_jax import host_memory
  print(host_memory.setup_cli())
  import jax.numpy as jnp
  import numpy as np
  from repvideo_jax import video_io
  if sys.argv[1] == "unguarded":  # the encoder as it was before zeroed_allocations
    host_memory.zeroed_allocations = contextlib.nullcontext
  t, y, x = np.meshgrid(np.arange(17), np.arange(64), np.arange(64), indexing="ij")
  frames = np.stack([(x * 4 + t * 9) % 256, (y * 4) % 256, ((x - y) * 3 + t * 5) % 256], -1)
  frames = frames.astype(np.uint8)
  rng = np.random.default_rng(0)
  with tempfile.TemporaryDirectory() as d:
    for i in range(8):
      product = jnp.full((1000, 1000), i + 1.5) @ jnp.ones((1000, 1000))  # XLA's buffers
      noise = [rng.integers(0, 256, 2**14 * (i + 1) * (k + 1), np.uint8) for k in range(24)]
      del product, noise  # freed into the heap, which reuse keeps
      path = os.path.join(d, f"{i}.mp4")
      video_io.write_mp4(path, frames)
      print(hashlib.sha256(open(path, "rb").read()).hexdigest())
  """
)


def _encode_hashes(mode: str, variant: str = "guarded") -> list[str]:
  env = {**os.environ, host_memory.ENV: mode}
  out = subprocess.run(
    [sys.executable, "-c", _ENCODE_CHILD, variant],
    env=env,
    cwd=REPO,
    capture_output=True,
    text=True,
    check=True,
  ).stdout.split()
  assert out[0] == mode
  return out[1:]


@pytest.mark.skipif(host_memory._glibc() is None, reason="the setting exists for glibc only")
def test_mp4_bytes_do_not_depend_on_freed_memory():
  """The same frames give the same MP4 bytes whatever the heap held before: under reuse (CLI default
  on CPU) as in a fresh process with glibc's defaults."""
  reuse = _encode_hashes("reuse")
  system = _encode_hashes("system")
  assert len(set(reuse + system)) == 1, (reuse, system)


@pytest.mark.skipif(host_memory._glibc() is None, reason="the setting exists for glibc only")
def test_zeroed_allocations_hide_freed_data():
  """A block freed with data in it and allocated again under reuse shows that data; inside
  zeroed_allocations it shows zeros, and after the block the process is back to plain malloc."""
  child = textwrap.dedent(
    """
    import ctypes
    from repvideo_jax import host_memory
    host_memory.reuse_freed_memory()
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    n = 2**20
    def fresh_after_dirty():
      p = libc.malloc(n)
      ctypes.memset(p, 0xAB, n)
      libc.free(p)
      q = libc.malloc(n)
      seen = ctypes.string_at(q, n)
      libc.free(q)
      return seen.count(0xAB), seen.count(0)
    print(*fresh_after_dirty())
    with host_memory.zeroed_allocations():
      print(*fresh_after_dirty())
    print(*fresh_after_dirty())
    """
  )
  out = subprocess.run([sys.executable, "-c", child], cwd=REPO, capture_output=True, text=True, check=True)
  (dirty_ab, _), (zeroed_ab, zeroed_zero), (after_ab, _) = (
    map(int, line.split()) for line in out.stdout.splitlines()
  )
  n = 2**20
  assert dirty_ab > n // 2  # the precondition: reused memory holds the last user's bytes
  assert (zeroed_ab, zeroed_zero) == (0, n)
  assert after_ab > n // 2  # the setting was undone


def test_auto_follows_jax_platforms(monkeypatch):
  applied = []
  monkeypatch.setattr(host_memory, "reuse_freed_memory", lambda: applied.append(1) or True)
  monkeypatch.delenv(host_memory.ENV, raising=False)
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert host_memory.configure_from_env() == "reuse" and applied == [1]
  for platforms in ("tpu", "cuda", "cuda,cpu"):
    monkeypatch.setenv("JAX_PLATFORMS", platforms)
    assert host_memory.accelerator_likely()
    assert host_memory.configure_from_env() == "system"
  assert applied == [1]
  monkeypatch.setenv(host_memory.ENV, "reuse")  # forced, even with an accelerator
  assert host_memory.configure_from_env() == "reuse" and applied == [1, 1]
  monkeypatch.setenv(host_memory.ENV, "system")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert host_memory.configure_from_env() == "system" and applied == [1, 1]


def test_bad_setting_names_the_variable_and_the_choices(monkeypatch):
  monkeypatch.setenv(host_memory.ENV, "keep")
  with pytest.raises(
    ValueError, match=r"REPVIDEO_HOST_MEMORY must be one of auto, reuse, system, got 'keep'"
  ):
    host_memory.configure_from_env()


def test_cli_refuses_a_bad_setting_cleanly():
  env = {**os.environ, host_memory.ENV: "keep"}
  res = subprocess.run(
    [sys.executable, "sample.py", "--help"], env=env, cwd=REPO, capture_output=True, text=True
  )
  assert res.returncode == 2
  assert "error: REPVIDEO_HOST_MEMORY must be one of" in res.stderr
  assert "Traceback" not in res.stderr
