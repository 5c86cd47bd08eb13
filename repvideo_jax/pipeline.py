"""A whole model folder in one call: transformer, T5 text encoder, VAE and tokenizer.

``load_pipeline(path)`` accepts a folder written by ``python -m repvideo_jax.convert pipeline``
(``pipeline.json`` + one converted folder per component) or, directly, a diffusers-layout CogVideoX
folder (``transformer/ vae/ text_encoder/ tokenizer/``), which is converted in memory on each load.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import pathlib
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from repvideo_jax import config as config_lib
from repvideo_jax import (
  lora,
  memory,
  outputs,
  quantize,
  samplers,
  schedule,
  sharding,
  step_cache,
  text_encoder_weights,
  transformer_weights,
  vae_weights,
  video_io,
)
from repvideo_jax import text_encoder as TE
from repvideo_jax import transformer as T
from repvideo_jax import vae as V
from repvideo_jax.text_encoder import T5Config
from repvideo_jax.transformer import TransformerConfig, check_positional_table
from repvideo_jax.vae import VAEConfig

log = logging.getLogger(__name__)
COMPONENTS = ("transformer", "text_encoder", "vae", "tokenizer")


@dataclasses.dataclass
class Pipeline:
  """Configs, params (plain nested dicts) and the tokenizer of one model."""

  transformer_config: TransformerConfig
  transformer_params: dict[str, Any] | None  # None when loaded with load_transformer=False
  text_encoder_config: T5Config
  text_encoder_params: dict[str, Any]
  vae_config: VAEConfig
  vae_params: dict[str, Any]
  tokenizer: Any
  path: pathlib.Path
  manifest: dict[str, Any] = dataclasses.field(default_factory=dict)
  # LoRAs loaded with the model: (lora tree, scale) pairs applied unmerged by the sampler (empty when
  # merged into transformer_params), and a description of every LoRA loaded (path, scale, ...).
  transformer_loras: list[tuple[dict[str, Any], float]] = dataclasses.field(default_factory=list)
  loras: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  quantized: tuple[str, ...] = ()  # components whose layer kernels are int8 (repvideo_jax.quantize)
  # Where the weights live (repvideo_jax.memory): made on first use, for this object only.
  _residency: Any = dataclasses.field(default=None, repr=False, compare=False)

  def residency(self, offload: str | None = None) -> memory.Residency:
    """The ``memory.Residency`` that moves this pipeline's weights to and from the device. ``offload``
    None keeps the current one (made with "auto" on first use); a different mode moves every model
    back to the host and starts a new one."""
    res = self._residency
    if res is not None and res.pipe is self and offload in (None, res.requested):
      return res
    if res is not None and res.pipe is self:
      res.release_all()
    self._residency = memory.Residency(self, offload or "auto")
    return self._residency

  def merged_transformer_params(self) -> dict[str, Any]:
    """``transformer_params`` with the unmerged LoRAs folded in: what the sampler applies layer by
    layer, for code that runs the transformer outside the sampler (evaluate's and analysis' feature
    passes)."""
    params = self.transformer_params
    for tree, scale in self.transformer_loras:
      params = lora.merge(params, tree, scale)
    return params

  def encode_prompts(self, prompts, use_mask: bool = False):
    """Prompts -> T5 embeddings (B, text_length, d_model), as released (no mask, pads kept). The text
    encoder is placed on the device first (and the models the offload mode moves out for it leave)."""
    return TE.encode_prompts(
      self.residency().stage("text_encoder"),
      self.text_encoder_config,
      self.tokenizer,
      prompts,
      use_mask=use_mask,
      max_length=self.transformer_config.text_length,
    )


MANIFEST_FORMAT = "repvideo-jax-pipeline"
COMPONENTS = ("transformer", "text_encoder", "vae", "tokenizer")


def write_manifest(folder: str | pathlib.Path, **fields: Any) -> None:
  """Writes ``folder/pipeline.json`` (atomically): the format header, the component list and
  ``fields`` (``source``, ``defaults`` for generation, ...)."""
  manifest = {"format": MANIFEST_FORMAT, "version": 1, "components": list(COMPONENTS), **fields}
  outputs.atomic_write(pathlib.Path(folder) / "pipeline.json", json.dumps(manifest, indent=2))


def load_pipeline(
  path: str | pathlib.Path,
  *,
  transformer_overrides: dict | None = None,
  text_encoder_overrides: dict | None = None,
  vae_overrides: dict | None = None,
  load_transformer: bool = True,
  verify: bool = True,
  loras: Sequence[tuple[str | pathlib.Path, float]] = (),
  lora_merge: bool = False,
  quantize_weights: Sequence[str] = (),
) -> Pipeline:
  """Loads every component of a model folder; overrides replace config fields (e.g. dtype).

  ``load_transformer=False`` reads only the transformer's config (for data preparation, which
  needs the VAE, T5 and the text length but not the multi-GB denoiser); SAT transformers, whose
  config comes from their weights' shapes, are still read in full. ``verify=False`` skips the
  SHA-256 check of converted weight files.

  ``loras``: (path, scale) pairs of LoRAs for the transformer (``repvideo_jax.lora``, either file
  format), checked against it. Unmerged (default) the sampler applies them layer by layer inside
  the layer scan; ``lora_merge=True`` folds them into the transformer params once, here.

  ``quantize_weights``: components ("text_encoder", "transformer") whose layer kernels are stored as
  int8 with per-channel scales (``repvideo_jax.quantize``; after merging LoRAs, if any).
  """
  quantize_weights = tuple(quantize_weights)
  bad = sorted(set(quantize_weights) - set(quantize.COMPONENTS))
  if bad:
    raise ValueError(f"quantize_weights: unknown component(s) {bad}; choose from {quantize.COMPONENTS}")
  if "transformer" in quantize_weights and not load_transformer:
    raise ValueError("quantize_weights names the transformer, but load_transformer=False")
  path = pathlib.Path(path)
  loras = _check_loras(loras, load_transformer)
  if not path.is_dir():
    raise FileNotFoundError(
      f"no model folder at {path}: convert one with "
      "`python -m repvideo_jax.convert pipeline --src COGVIDEOX_DIR --dst DIR`"
    )
  missing = [c for c in COMPONENTS if not (path / c).is_dir()]
  if missing:
    raise FileNotFoundError(
      f"{path} is not a model folder: missing {missing} (found {sorted(p.name for p in path.iterdir())})"
    )
  manifest = {}
  if (path / "pipeline.json").exists():
    try:
      manifest = json.loads((path / "pipeline.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ValueError(
        f"{path}/pipeline.json is not valid JSON ({e}); re-create the folder with "
        "`python -m repvideo_jax.convert pipeline`"
      ) from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("defaults") or {}, dict):
      raise ValueError(
        f'{path}/pipeline.json must be a JSON object (with an optional "defaults" '
        "object of generation settings); re-create the folder with "
        "`python -m repvideo_jax.convert pipeline`"
      )
  else:
    log.info(
      "%s has no pipeline.json: loading the diffusers layout directly (convert it once with "
      "`python -m repvideo_jax.convert pipeline` for faster loads)",
      path,
    )
  t_cfg, t_params = None, None
  if not load_transformer:
    t_cfg = transformer_weights.read_config(path / "transformer")
    if t_cfg is not None and transformer_overrides:
      t_cfg = dataclasses.replace(t_cfg, **transformer_overrides)
  if t_cfg is None:
    t_cfg, t_params = transformer_weights.load(
      path / "transformer", verify=verify, **(transformer_overrides or {})
    )
  e_cfg, e_params = text_encoder_weights.load(
    path / "text_encoder", verify=verify, **(text_encoder_overrides or {})
  )
  v_cfg, v_params = vae_weights.load(path / "vae", verify=verify, **(vae_overrides or {}))
  if e_cfg.d_model != t_cfg.text_embed_dim:
    raise ValueError(
      f"text encoder width {e_cfg.d_model} != transformer text_embed_dim "
      f"{t_cfg.text_embed_dim}: the components come from different models"
    )
  if v_cfg.latent_channels != t_cfg.in_channels:
    raise ValueError(
      f"VAE latent channels {v_cfg.latent_channels} != transformer in_channels "
      f"{t_cfg.in_channels}: the components come from different models"
    )
  tokenizer = TE.load_tokenizer(path / "tokenizer")
  pipe = Pipeline(t_cfg, t_params, e_cfg, e_params, v_cfg, v_params, tokenizer, path, manifest)
  for lora_path, scale in loras:
    loaded = lora.load(lora_path, t_cfg)
    if lora_merge:
      pipe.transformer_params = lora.merge(pipe.transformer_params, loaded.lora, scale)
    else:
      pipe.transformer_loras.append((loaded.lora, scale))
    pipe.loras.append(
      {
        "path": str(pathlib.Path(lora_path).resolve()),
        "scale": scale,
        "merged": lora_merge,
        "format": loaded.format,
        **config_lib.to_dict(loaded.config),
      }
    )
  if "transformer" in quantize_weights and pipe.transformer_loras:
    raise ValueError(
      "int8 transformer weights with unmerged LoRAs: pass lora_merge=True (sample.py --lora-merge), "
      "so the LoRAs are folded in before the weights are quantized"
    )
  for name in quantize_weights:
    setattr(pipe, f"{name}_params", quantize.quantize_params(getattr(pipe, f"{name}_params")))
  pipe.quantized = tuple(c for c in quantize.COMPONENTS if c in quantize_weights)
  return pipe


def _check_loras(loras, load_transformer: bool) -> list[tuple[pathlib.Path, float]]:
  """``load_pipeline``'s LoRA arguments checked before any weights are read: each path holds a LoRA
  and each scale is a finite number."""
  out = []
  for item in loras:
    try:
      lora_path, scale = item
    except (TypeError, ValueError):
      raise ValueError(f"loras must be (path, scale) pairs, got {item!r}") from None
    lora.detect_format(lora_path)  # FileNotFoundError / ValueError naming what is there
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
      raise ValueError(f"LoRA scale must be a finite number, got {scale!r} for {lora_path}")
    out.append((pathlib.Path(lora_path), float(scale)))
  if out and not load_transformer:
    raise ValueError("loras adapt the transformer: they need load_transformer=True")
  return out


# ----------------------------------------------------------------------------------------------
# Text -> video.
#
# Settings are checked once, where they enter: a ``GenerationSettings`` checks its own values when it
# is constructed, and its fit to a model (``validate``) when it first meets that model, in
# ``settings_for`` (the command lines' constructor) or in the public function it is handed to
# (``generate``, ``sample_latents``). A fit that passed is remembered for that (settings, model
# configs) pair, so the batches of one run and the calls inside ``generate`` do not check it again.

SAMPLERS = ("dpmpp2m", "ddim")
CFG_SCHEDULES = ("released", "constant", "smooth")


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
  """Everything that determines a video besides the prompt and the weights."""

  num_frames: int = 49
  height: int = 480
  width: int = 720
  steps: int = 50
  guidance: float = 6.0  # guidance scale: constant w, or the `scale` of the dynamic/smooth schedules
  # released (dynamic, raw-t formula) | constant | smooth (by step). The one "cfg" that means guidance:
  # a user-facing name (--cfg-schedule, saved settings), as in diffusers' use_dynamic_cfg. In code cfg
  # is always a config.
  cfg_schedule: str = "released"
  sampler: str = "dpmpp2m"  # dpmpp2m (released SDE sampler) | ddim (diffusers' deterministic)
  seed: int = 0
  negative_prompt: str | None = None  # None: zero uncond embedding as released; str: encode it
  step_cache: str | None = (
    None  # None: every step in full; e.g. "residual:0.3+cfg:2" (repvideo_jax.step_cache)
  )

  def __post_init__(self):
    """The checks that need no model; the video size is checked against one by ``validate``."""
    step_cache.parse(self.step_cache)
    if self.steps < 1:
      raise ValueError(f"steps must be >= 1, got {self.steps}")
    if not math.isfinite(self.guidance) or self.guidance < 1:
      raise ValueError(f"guidance must be a finite number >= 1 (1 = no guidance), got {self.guidance}")
    if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
      raise ValueError(
        f"seed must be an integer in [0, 2^32 - 1] (the range the sampler's random keys "
        f"use; larger seeds would repeat smaller ones), got {self.seed}"
      )
    if self.sampler not in SAMPLERS:
      raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
    if self.cfg_schedule not in CFG_SCHEDULES:
      raise ValueError(f"cfg_schedule must be one of {CFG_SCHEDULES}, got {self.cfg_schedule!r}")

  @property
  def uses_guidance(self) -> bool:
    """Whether sampling runs the unconditional branch: every schedule except a constant w = 1."""
    return self.guidance > 1 or self.cfg_schedule != "constant"

  def validate(self, tcfg: TransformerConfig, vcfg: VAEConfig) -> None:
    """Raises ValueError naming the bad setting and what to use instead when the video size does not
    fit the model (the VAE's compression, the patch size, the positional table). Passing is
    remembered per (settings, configs), so calling it again costs nothing."""
    try:
      hash((self, tcfg, vcfg))
    except TypeError:  # a config built by hand with a list field: check without remembering
      _check_fit.__wrapped__(self, tcfg, vcfg)
    else:
      _check_fit(self, tcfg, vcfg)

  def latent_shape(self, tcfg: TransformerConfig, vcfg: VAEConfig) -> tuple[int, int, int, int]:
    """(frames, height, width, channels) of one video's latents."""
    return (*vcfg.latent_size(self.num_frames, self.height, self.width), tcfg.in_channels)


@functools.lru_cache(maxsize=64)
def _check_fit(settings: GenerationSettings, tcfg: TransformerConfig, vcfg: VAEConfig) -> None:
  """``GenerationSettings.validate``; cached, so only the first call for a triple does the work."""
  n, height, width = settings.num_frames, settings.height, settings.width
  tcr, s, p = vcfg.temporal_compression_ratio, vcfg.spatial_compression, tcfg.patch_size
  if n < 1 or (n - 1) % tcr:
    k = max(0, round((n - 1) / tcr))
    raise ValueError(
      f"num_frames={n} must be {tcr}k+1 (the VAE keeps frame 0 and compresses the rest "
      f"{tcr}x), e.g. {tcr * k + 1} or {tcr * (k + 1) + 1}"
    )
  lat_t, lat_h, lat_w = vcfg.latent_size(n, height, width)
  if lat_t % 2 == 0:  # the VAE keeps a lone first frame only for an odd latent count
    raise ValueError(
      f"num_frames={n} gives {lat_t} latent frames, and the VAE decodes an even count to "
      f"{tcr} frames each ({tcr * lat_t}, not {n}): use {2 * tcr}k+1 frames, e.g. "
      f"{tcr * (lat_t - 2) + 1} or {tcr * lat_t + 1}"
    )
  unit = s * p
  if height % unit or width % unit or height <= 0 or width <= 0:
    raise ValueError(
      f"height and width must be positive multiples of {unit} (VAE {s}x times patch "
      f"{p}), got {height}x{width}"
    )
  try:
    check_positional_table(tcfg, lat_t, lat_h, lat_w)
  except ValueError as e:
    raise ValueError(
      f"{n} frames at {height}x{width} exceed what this model's positional table covers "
      f"(at most {tcr * (tcfg.sample_frames - 1) + 1} frames at "
      f"{s * tcfg.sample_height}x{s * tcfg.sample_width}): {e}"
    ) from None


def model_defaults(pipe: Pipeline) -> dict[str, Any]:
  """The model folder's own generation defaults (``pipeline.json`` "defaults": any
  ``GenerationSettings`` field, plus "fps"), e.g. 17 frames at 64x64 for the bundled demo model.
  Folders without them (converted CogVideoX / RepVideo) use the released settings."""
  defaults = dict(pipe.manifest.get("defaults") or {})
  fields = {f.name for f in dataclasses.fields(GenerationSettings)} | {"fps"}
  unknown = sorted(set(defaults) - fields)
  if unknown:
    raise ValueError(
      f"{pipe.path}/pipeline.json: unknown generation default(s) {unknown}; valid keys are {sorted(fields)}"
    )
  return defaults


def settings_for(pipe: Pipeline, **overrides) -> GenerationSettings:
  """``GenerationSettings`` from the model folder's defaults, then ``overrides`` (None = keep),
  checked against the folder's model (``validate``): what the command lines build their settings with."""
  values = {k: v for k, v in model_defaults(pipe).items() if k != "fps"}
  values.update({k: v for k, v in overrides.items() if v is not None})
  settings = config_lib.from_dict(GenerationSettings, values, where=f"{pipe.path}/pipeline.json defaults")
  settings.validate(pipe.transformer_config, pipe.vae_config)
  return settings


def guidance_weights(settings: GenerationSettings, timesteps) -> np.ndarray:
  """The guidance weight of each sampler step, by the settings' CFG schedule."""
  n = len(timesteps)
  if settings.cfg_schedule == "constant":
    return schedule.constant_guidance_weights(n, settings.guidance)
  if settings.cfg_schedule == "smooth":
    return schedule.smooth_guidance_weights(n, settings.guidance)
  return schedule.dynamic_guidance_weights(timesteps, scale=settings.guidance, sampler_steps=n)


def unconditional_text(pipe: Pipeline, settings: GenerationSettings, text):
  """The text of the unconditional branch of classifier-free guidance for prompt embeddings ``text``
  (B, L, D): None when the settings sample without guidance, the encoded negative prompt when they
  name one, else the released zero embedding (``force_uc_zero_embeddings``; the zeros themselves come
  from ``samplers.unconditional_text``). Every sampling path of the package chooses it here."""
  if not settings.uses_guidance:
    return None
  if settings.negative_prompt is not None:
    return pipe.encode_prompts([settings.negative_prompt] * text.shape[0])
  return samplers.unconditional_text(text)


@dataclasses.dataclass(frozen=True)
class SamplingPreset:
  """A sampling preset (``configs/sample-*.yaml``, section ``sample:``): sizes, dtypes, mesh and the
  TPU topology it is checked for. ``sample.py --preset`` runs it; ``python -m repvideo_jax.aot sample
  --preset`` compiles it for ``topology`` and says whether each stage fits."""

  model_config: str = "repvideo-2b"  # transformer preset the AOT check compiles (sample.py: --model)
  topology: str | None = None  # libtpu name, e.g. v5e:1x1 or v5e:2x2
  batch: int = 1  # videos per call (the denoiser sees 2 x batch with CFG)
  frames: int = 49
  height: int = 480
  width: int = 720
  use_guidance: bool = True  # plan for the CFG pair (2 network calls per step)
  transformer: dict | None = None  # TransformerConfig overrides (dtype, param_dtype, attention_backend)
  text_encoder: dict | None = None  # T5Config overrides
  vae: dict | None = None  # VAEConfig overrides
  vae_tiling: bool = False  # decode in overlapping spatial tiles (diffusers' tiled_decode)
  mesh: dict | None = None  # {data, fsdp, tensor, context}; default: default_sample_mesh
  offload: str = "auto"  # which models stay on the device between stages (memory.OFFLOAD_MODES)
  quantize: str = "none"  # int8 layer kernels: none | text-encoder | transformer | all

  def __post_init__(self):
    for name in ("batch", "frames", "height", "width"):
      if getattr(self, name) < 1:
        raise ValueError(f"sample.{name} must be >= 1, got {getattr(self, name)}")
    if self.offload not in memory.OFFLOAD_MODES:
      raise ValueError(f"sample.offload must be one of {memory.OFFLOAD_MODES}, got {self.offload!r}")
    if self.quantize not in quantize.CHOICES:
      raise ValueError(f"sample.quantize must be one of {tuple(quantize.CHOICES)}, got {self.quantize!r}")


def load_sampling_preset(name_or_path, overrides=()) -> SamplingPreset:
  """A ``SamplingPreset`` from ``configs/<name>.yaml`` (or a YAML path) plus ``key=value`` overrides."""
  overrides = [o if o.startswith("sample.") else f"sample.{o}" for o in overrides]
  tree = config_lib.load_yaml(name_or_path, overrides)
  if set(tree) != {"sample"}:
    raise ValueError(f"{name_or_path}: a sampling preset has one section, 'sample:' (has {sorted(tree)})")
  return config_lib.from_dict(SamplingPreset, tree["sample"] or {}, where=f"{name_or_path}:sample")


def default_sample_mesh(devices: int, batch: int, use_guidance: bool = True) -> dict[str, int]:
  """The batch and its CFG pair over ``data`` as far as they divide the devices, the remaining
  devices over ``context`` (each video's sequence), so one video's latency falls with devices."""
  data = math.gcd(batch * (2 if use_guidance else 1), devices)
  return {"data": data, "fsdp": 1, "tensor": 1, "context": devices // data}


def initial_noise(settings: GenerationSettings, shape, batch: int, first_index: int = 0):
  """x_T ~ N(0, I) per video, keyed by (seed, the video's index in the whole prompt list): a prompt's
  starting noise does not depend on which other prompts share its batch."""
  base = jax.random.key(settings.seed)
  return jnp.stack(
    [jax.random.normal(jax.random.fold_in(base, first_index + i), shape, jnp.float32) for i in range(batch)]
  )


def sample_latents(
  pipe: Pipeline,
  text,
  settings: GenerationSettings,
  *,
  text_uncond=None,
  noise=None,
  mesh=None,
  progress=None,
  first_index: int = 0,
  return_changes: bool = False,
):
  """Runs the sampler on prompt embeddings (B, L, D); returns latents (B, T, h, w, C), scaled.
  ``text_uncond`` None: the settings' unconditional text (``unconditional_text``).
  ``return_changes``: run every step in full through the step cache's residual path and also return
  the residual's relative change per step (``step_cache.calibrate``): ``(latents, changes)``."""
  settings.validate(pipe.transformer_config, pipe.vae_config)
  if text_uncond is None:
    text_uncond = unconditional_text(pipe, settings, text)
  return _sample(
    pipe,
    text,
    text_uncond,
    settings,
    noise=noise,
    mesh=mesh,
    progress=progress,
    first_index=first_index,
    return_changes=return_changes,
  )


def step_cache_plan(pipe: Pipeline, settings: GenerationSettings) -> np.ndarray | None:
  """The per-step plan of ``settings.step_cache`` for this model (None without a step cache); the
  residual method reads the folder's calibration (a clear error naming the command when missing)."""
  cache = step_cache.parse(settings.step_cache)
  if cache is None:
    return None
  changes = None
  if cache.residual is not None:
    changes = step_cache.calibration_for(pipe.path, settings.sampler, settings.steps)
  return step_cache.plan(cache, settings.steps, use_guidance=settings.uses_guidance, changes=changes)


def _sample(
  pipe: Pipeline,
  text,
  text_uncond,
  settings: GenerationSettings,
  *,
  noise,
  mesh,
  progress,
  first_index: int,
  return_changes: bool = False,
):
  """``sample_latents`` on settings already validated for ``pipe``."""
  tcfg, vcfg = pipe.transformer_config, pipe.vae_config
  b = text.shape[0]
  if noise is None:
    noise = initial_noise(settings, settings.latent_shape(tcfg, vcfg), b, first_index)
  replicated = None if mesh is None else jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  params = pipe.residency().stage("transformer", replicated)  # placed once, kept per the offload mode
  if pipe.transformer_loras:  # unmerged LoRAs ride with the params (scales traced: no recompile)
    params = (params, [(tree, jnp.float32(scale)) for tree, scale in pipe.transformer_loras])
  if mesh is not None:
    batch = sharding.batch_sharding(mesh, b)
    noise, text = jax.device_put(noise, batch), jax.device_put(text, batch)
    if text_uncond is not None:
      text_uncond = jax.device_put(text_uncond, batch if text_uncond.shape[0] == b else replicated)
    params = jax.device_put(params, replicated)  # the LoRAs (the base params are placed already)
  model_fn = _lora_model_fn(tcfg) if pipe.transformer_loras else _model_fn(tcfg)
  plan = step_cache_plan(pipe, settings)
  if return_changes:
    plan = np.full(settings.steps, samplers.FULL, np.int32)
  if plan is not None:
    model_fn = _cached_model(tcfg, bool(pipe.transformer_loras))
  if settings.sampler == "ddim":
    sched = schedule.diffusers_sampling_schedule(settings.steps, "trailing")
  else:
    sched = schedule.sampling_schedule(settings.steps)
  weights = guidance_weights(settings, sched.timesteps)
  kwargs = dict(
    schedule=sched,
    guidance_weights=weights,
    params=params,
    use_guidance=settings.uses_guidance,
    progress=progress is not None,
    step_cache_plan=plan,
    return_changes=return_changes,
  )
  # On a mesh the model's sharding hints and attention's shard_map read it from the context.
  with samplers.progress_hook(progress), jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
    if settings.sampler == "ddim":
      out = samplers.sample_ddim(model_fn, noise, text, text_uncond, **kwargs)
    else:
      # Per-step SDE noise: its own stream per batch (batches start at distinct first_index).
      key = jax.random.fold_in(jax.random.fold_in(jax.random.key(settings.seed), 1 << 30), first_index)
      out = samplers.sample_dpmpp2m_sde(model_fn, noise, text, text_uncond, key=key, **kwargs)
    out = jax.block_until_ready(out)
  return out


def _residual_with_loras(params_and_loras, latents, timesteps, text, *, config: TransformerConfig):
  params, loras = params_and_loras
  return T.apply_with_residual(params, latents, timesteps, text, config=config, lora=loras)


def _from_residual_with_loras(params_and_loras, latents, timesteps, text, residual, *, config):
  return T.apply_from_residual(params_and_loras[0], latents, timesteps, text, residual, config=config)


@functools.lru_cache(maxsize=8)
def _cached_model(tcfg: TransformerConfig, loras: bool) -> samplers.CachedModel:
  """The model as the step cache calls it (one object per config, so the compiled loop is reused);
  ``loras``: params come as (base params, [(lora, scale), ...]). The output head is never adapted by
  a LoRA, so a reused residual needs only the base params."""
  if loras:
    return samplers.CachedModel(
      functools.partial(_residual_with_loras, config=tcfg),
      functools.partial(_from_residual_with_loras, config=tcfg),
    )
  return samplers.CachedModel(
    functools.partial(T.apply_with_residual, config=tcfg),
    functools.partial(T.apply_from_residual, config=tcfg),
  )


@functools.lru_cache(maxsize=8)
def _model_fn(tcfg: TransformerConfig):
  """One function object per config, so the compiled sampler is reused across calls."""
  return T.make_apply(tcfg)


def _apply_with_loras(params_and_loras, latents, timesteps, text, *, config: TransformerConfig):
  params, loras = params_and_loras
  return T.apply(params, latents, timesteps, text, config=config, lora=loras)


@functools.lru_cache(maxsize=8)
def _lora_model_fn(tcfg: TransformerConfig):
  """``_model_fn`` for params given as (base params, [(lora, scale), ...]): the unmerged LoRAs."""
  return functools.partial(_apply_with_loras, config=tcfg)


TILING_MODES = memory.TILING_MODES


def _tiling_mode(tiling) -> str:
  """``vae_tiling`` as auto/on/off (True and False are on and off)."""
  if isinstance(tiling, bool):
    return "on" if tiling else "off"
  if tiling not in TILING_MODES:
    raise ValueError(f"vae_tiling must be one of {TILING_MODES}, got {tiling!r}")
  return tiling


@functools.lru_cache(maxsize=8)
def _decode_program(vcfg: VAEConfig, chunking: str):
  """The untiled decode of a whole batch as one jitted program (one object per config: compiled once)."""
  return jax.jit(functools.partial(V.decode, config=vcfg, chunking=chunking))


_DECODE_BYTES: dict[tuple, int] = {}


def _replicated_like(x):
  """Weights replicated over the mesh ``x`` is sharded on (a batch sampled on a mesh decodes there,
  each device its share of the videos); None (the default device) for a single-device array."""
  sh = getattr(x, "sharding", None)
  if isinstance(sh, jax.sharding.NamedSharding) and len(sh.device_set) > 1:
    return jax.sharding.NamedSharding(sh.mesh, jax.sharding.PartitionSpec())
  return None


def untiled_decode_bytes(pipe: Pipeline, latents) -> int:
  """Device bytes the untiled decode of ``latents`` needs beyond the VAE's weights (already placed):
  the compiler's memory analysis of the program ``decode_latents`` runs (temporaries, the latents and
  the video; compiled once per shape, and the compilation is reused by the decode itself)."""
  vcfg = pipe.vae_config
  latents = jnp.asarray(latents)
  chunking = "released" if latents.shape[1] % 2 == 1 else "framewise"
  key = (vcfg, chunking, tuple(latents.shape), str(latents.dtype), str(latents.sharding))
  if key not in _DECODE_BYTES:
    params = pipe.residency().stage("vae", _replicated_like(latents))
    compiled = _decode_program(vcfg, chunking).lower(params, latents).compile()
    _DECODE_BYTES[key] = max(0, memory.compiled_bytes(compiled) - memory.tree_bytes(params))
  return _DECODE_BYTES[key]


def tiled_step_bytes(pipe: Pipeline, latents, tile: V.TilingConfig) -> int:
  """Device bytes the largest step of the tiled, streamed decode needs beyond the VAE's weights: every
  distinct step (the first temporal chunk of a tile, then the later chunks with the conv cache) from
  the compiler's memory analysis, the largest taken. The compilations are the ones the decode runs."""
  vcfg = pipe.vae_config
  latents = jnp.asarray(latents)
  target = _replicated_like(latents)
  steps = V.streamed_steps(vcfg, tuple(latents.shape[1:]), tile)
  key = ("tile", vcfg, tuple(steps), str(target))
  if key not in _DECODE_BYTES:
    params = pipe.residency().stage("vae", target)
    first = jax.ShapeDtypeStruct(steps[0][0], jnp.float32)
    cache = jax.eval_shape(lambda p, z: V._decode_chunk(p, z, None, config=vcfg)[1], params, first)
    need = 0
    for shape, with_cache in steps:
      z = jax.ShapeDtypeStruct(shape, jnp.float32)
      compiled = V._decode_chunk.lower(params, z, cache if with_cache else None, config=vcfg).compile()
      need = max(need, memory.compiled_bytes(compiled) - memory.tree_bytes(params))
    _DECODE_BYTES[key] = need
  return _DECODE_BYTES[key]


def decode_latents(
  pipe: Pipeline, latents, tiling: str | bool = "off", tile: V.TilingConfig | None = None, info=None
):
  """Scaled latents -> float video in [-1, 1]-ish, (B, F, H, W, 3), with the released chunking.

  ``tiling``: "off" decodes the batch as one program; "on" decodes in overlapping spatial tiles
  (diffusers' ``tiled_decode``, ``tile`` sets their size and overlap), streamed one video, tile and
  chunk at a time (``vae.decode_streamed``): the memory of one tile-chunk step; "auto" tiles only when
  the untiled decode would not fit the device's free memory (``untiled_decode_bytes``, with
  ``memory.RESERVE`` of headroom). With "auto", when even the chosen decode would not fit beside the
  models the offload mode keeps (the transformer), those leave the device first
  (``Residency.make_room``). ``info`` (a dict) receives what was chosen and why."""
  mode = _tiling_mode(tiling)
  latents = jnp.asarray(latents)
  res = pipe.residency()
  params = res.stage("vae", _replicated_like(latents))
  record = {"vae_tiling_requested": mode}
  auto = mode == "auto"
  if auto:
    need, free = untiled_decode_bytes(pipe, latents), memory.free_bytes()
    mode = "off" if need <= (1.0 - memory.RESERVE) * free else "on"
    record.update(untiled_decode_gib=round(need / 2**30, 3), free_gib=round(free / 2**30, 2))
  if mode == "on":
    if tile is not None:  # asked for: refuse tiles that cannot tile (the defaults fall back, below)
      check_tiles(pipe.vae_config, tile, latents.shape[2], latents.shape[3])
    # diffusers' default tiles (half the VAE's sample size) are too small for a tiny VAE to tile
    # evenly: vae._tile_plan then decodes untiled, as before
    tile = tile or V.TilingConfig()
  if auto:  # the decode's own need, against what the models kept on the device leave free
    need = tiled_step_bytes(pipe, latents, tile) if mode == "on" else need
    record["decode_gib"] = round(need / 2**30, 3)
    record["moved_out_for_decode"] = res.make_room("vae", need)
  record["vae_tiling"] = mode
  if info is not None:
    info.update(record)
  if mode == "on":
    return V.decode_streamed(params, latents, config=pipe.vae_config, tiling=tile)
  chunking = "released" if latents.shape[1] % 2 == 1 else "framewise"
  return _decode_program(pipe.vae_config, chunking)(params, latents)


def check_tiles(vcfg: VAEConfig, tile: V.TilingConfig, latent_h: int, latent_w: int) -> None:
  """Raises ValueError when ``tile`` would not tile latents of this size although they are larger
  than one tile: diffusers' tile plan needs its strides (tile x (1 - overlap), in latents) to meet
  the cropped tiles exactly in pixels, and otherwise the decode would fall back to untiled, with the
  memory tiling was asked to save."""
  sh, sw, lh, lw, _, _ = tile.resolve(vcfg)
  if (latent_h > lh or latent_w > lw) and V._tile_plan(tile, vcfg, latent_h, latent_w) is None:
    s = vcfg.spatial_compression
    raise ValueError(
      f"VAE tiles of {sh}x{sw} pixels with overlaps {tile.overlap_factor_height:.4g} x "
      f"{tile.overlap_factor_width:.4g} do not meet evenly at this VAE's {s}x compression: use tile "
      f"sizes in multiples of {s} pixels whose latent size times (1 - overlap) is a whole number, "
      f"e.g. 240x360, 192x240 or 96x120 "
      f"with the default overlaps 1/6 x 1/5"
    )


def encode_for_sampling(pipe: Pipeline, prompts, settings: GenerationSettings):
  """Prompts -> (text, unconditional text) embeddings as the sampler takes them: what ``generate``
  computes first. Encode every prompt of a run with it before sampling, and the text encoder can
  leave the device for the rest of the run (``Pipeline.residency``)."""
  prompts = [prompts] if isinstance(prompts, str) else list(prompts)
  text = pipe.encode_prompts(prompts)
  return text, unconditional_text(pipe, settings, text)


def generate(
  pipe: Pipeline,
  prompts,
  settings: GenerationSettings = GenerationSettings(),
  *,
  mesh=None,
  progress=None,
  timings: dict | None = None,
  noise=None,
  output: str = "uint8",
  first_index: int = 0,
  vae_tiling: str | bool = "auto",
  vae_tile: V.TilingConfig | None = None,
  offload: str | None = None,
  embeddings=None,
):
  """Prompts -> frames (B, num_frames, height, width, 3): uint8, or float in [0, 1] with
  ``output="float"``. ``noise`` overrides the seeded initial latents; ``timings`` is filled in with
  each stage's seconds, the VAE tiling chosen and what was copied to and from the device.

  Randomness: the initial latents of video k are keyed by (seed, first_index + k), and the sampler's
  per-step noise by (seed, first_index); the same seed, prompts and batching give the same videos.
  ``mesh``: shard the batch over the mesh's data axes and each video's sequence over its context
  axis (params replicated).

  Memory (repvideo_jax.memory): ``offload`` none | text | stage | auto says which models stay on the
  device between stages (None: keep the pipeline's current mode, "auto" at first); ``vae_tiling``
  auto | on | off and ``vae_tile`` (tile size and overlap) as in ``decode_latents``. ``embeddings``:
  (text, unconditional text) from ``encode_for_sampling``, to skip the text encoder here.
  """
  prompts = [prompts] if isinstance(prompts, str) else list(prompts)
  settings.validate(pipe.transformer_config, pipe.vae_config)
  res = pipe.residency(offload)
  first_copy = len(res.copies)
  t0 = time.perf_counter()
  text, uncond = embeddings if embeddings is not None else encode_for_sampling(pipe, prompts, settings)
  if text.shape[0] != len(prompts):
    raise ValueError(f"embeddings hold {text.shape[0]} prompts, but {len(prompts)} prompts were given")
  t1 = time.perf_counter()
  latents = _sample(
    pipe, text, uncond, settings, mesh=mesh, progress=progress, noise=noise, first_index=first_index
  )
  t2 = time.perf_counter()
  decode_info: dict = {}
  video = np.asarray(decode_latents(pipe, latents, tiling=vae_tiling, tile=vae_tile, info=decode_info))
  t3 = time.perf_counter()
  if timings is not None:
    timings.update(
      text_encode_s=t1 - t0,
      sampling_s=t2 - t1,
      vae_decode_s=t3 - t2,
      seconds_per_step=(t2 - t1) / settings.steps,
      vae=decode_info,
      memory=res.summary(first_copy),
    )
  if output == "float":
    return np.clip((video + 1.0) / 2.0, 0.0, 1.0)
  return video_io.to_uint8(video)
