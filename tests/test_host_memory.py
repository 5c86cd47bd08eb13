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
