"""The README's Python API section runs as written (against tiny local checkpoints)."""

import pathlib
import re

import numpy as np
import torch
from reference_models import sat_state_dict, tiny_diffusers_transformer

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def _python_blocks(text: str) -> list[str]:
  return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_python_api_runs(tmp_path, monkeypatch):
  model = tiny_diffusers_transformer(seed=0, num_layers=8, sample_height=16, sample_width=16)
  model.save_pretrained(tmp_path / "CogVideoX-2b" / "transformer")
  sat = tmp_path / "RepVideo"
  (sat / "1").mkdir(parents=True)
  (sat / "latest").write_text("1")
  torch.save(
    {"module": sat_state_dict(model, np.linspace(0, 1, 8))}, sat / "1" / "mp_rank_00_model_states.pt"
  )
  monkeypatch.chdir(tmp_path)  # the README's relative paths now point at the tiny checkpoints
  (tmp_path / "checkpoints").symlink_to(tmp_path)

  blocks = _python_blocks(README.read_text())
  assert len(blocks) >= 4, "README lost its Python API examples"
  namespace: dict = {}
  for block in blocks:
    exec(compile(block, str(README), "exec"), namespace)
  grads = namespace["grads"]
  identity = [0, 1, 7]
  assert np.all(np.asarray(grads["gates"])[identity] == 0)
  assert np.abs(np.asarray(grads["gates"])[[2, 3, 4, 5, 6]]).min() > 0
