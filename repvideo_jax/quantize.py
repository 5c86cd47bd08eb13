"""Int8 weight-only quantisation of the layer stacks (T5 encoder and transformer), with qwix.

The stacked layer kernels (``params["blocks"][...]["kernel"]``, shape (layers, in, out)) are stored as
``qwix.QArray``: int8 values and one scale per layer and output channel (symmetric absmax, the scale
in the weights' own dtype). Everything else (embeddings, norms, biases, the small heads) stays as
loaded. The models dequantize one layer's kernels inside the layer scan (``dequantize_layer``), so a
step holds the int8 stack plus one layer's kernels in the compute dtype: weight memory is about half
of bfloat16's (a quarter of float32's), and the matmuls themselves run as before.

Only the weights change; the cost in output quality is measured in ``docs/memory.md`` (PSNR of the
demo model's frames, its held-out evaluation, and the output error of a tiny 2B-shaped model).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import qwix

MODES = ("none", "int8")
COMPONENTS = ("text_encoder", "transformer")
# The command lines' --quantize choices -> the components whose layer kernels become int8.
CHOICES = {
  "none": (),
  "text-encoder": ("text_encoder",),
  "transformer": ("transformer",),
  "all": ("text_encoder", "transformer"),
}


def is_quantized(x: Any) -> bool:
  return isinstance(x, qwix.QArray)


def _quantize_kernel(kernel) -> qwix.QArray:
  """(layers, in, out) -> int8 with one scale per (layer, output channel), scale in the kernel's dtype.
  qwix keeps the values in an int8 array and the scale as (layers, 1, out): both stack and slice
  along the layer axis with the rest of the layer's params."""
  return qwix.quantize(jnp.asarray(kernel), jnp.int8, channelwise_axes=(0, np.ndim(kernel) - 1))


def quantize_params(params: dict[str, Any], mode: str = "int8", *, to_host: bool = True) -> dict[str, Any]:
  """The model's params with every stacked layer kernel (ndim 3 under ``blocks``) as an int8 QArray.
  ``mode`` "none" returns ``params`` unchanged; already-quantized kernels are kept as they are.

  ``to_host`` (default): each kernel is quantized on the CPU, one at a time, and kept as numpy, so
  host memory grows by one kernel at most and nothing lands on an accelerator until the pipeline
  places it. ``to_host=False`` stays traceable (``jax.eval_shape`` of a quantized model, for AOT)."""
  if mode not in MODES:
    raise ValueError(f"quantize must be one of {MODES}, got {mode!r}")
  if mode == "none":
    return params
  if "blocks" not in params:
    raise ValueError("quantize_params expects a model's params with a stacked 'blocks' subtree")

  def one(v):
    if is_quantized(v) or np.ndim(v) != 3:
      return v
    if not to_host:
      return _quantize_kernel(v)
    with jax.default_device(jax.devices("cpu")[0]):
      return jax.device_get(_quantize_kernel(v))

  def visit(tree):
    if isinstance(tree, dict):
      return {k: (one(v) if k == "kernel" else visit(v)) for k, v in tree.items()}
    return tree

  return {**params, "blocks": visit(params["blocks"])}


def dequantize_layer(tree: Any, dtype=None) -> Any:
  """One layer's (or a whole model's) params with each QArray replaced by its float values, in
  ``dtype`` (default the scale's dtype, i.e. the weights' dtype before quantisation). A tree without
  QArrays is returned as it is (no copy), so the models call this unconditionally."""
  leaves = jax.tree.leaves(tree, is_leaf=is_quantized)
  if not any(is_quantized(x) for x in leaves):
    return tree

  def one(x):
    if not is_quantized(x):
      return x
    y = qwix.dequantize(x)
    return y if dtype is None else y.astype(dtype)

  return jax.tree.map(one, tree, is_leaf=is_quantized)


def count_quantized(params: Any) -> int:
  """How many QArray kernels a param tree holds (0: not quantized)."""
  return sum(is_quantized(x) for x in jax.tree.leaves(params, is_leaf=is_quantized))
