"""The demo's text side: a sentencepiece tokenizer trained on the captions, and a small T5 encoder
pretrained on them with a token-denoising objective.

Tokenizer: a sentencepiece model with T5's special ids (pad 0, EOS 1, unk 2, no BOS), saved as
``spiece.model`` so ``text_encoder.load_tokenizer`` reads it like the CogVideoX one. The demo uses
``model_type='word'``: one piece per caption word (the subword trainers split the few words of a
template vocabulary into letters), and any other word becomes <unk>. Text is NFKC-normalised and
case-folded (sentencepiece's ``nmt_nfkc_cf``), so "A Red Circle" reads as "a red circle".

Encoder pretraining (the encoder alone; T5's span corruption needs a decoder). Each real token
(not padding) is replaced, with probability ``corrupt_rate``, by a uniformly random ordinary token.
The encoder then predicts the original token at every real position through the tied embedding:
    logits = encoder(corrupted ids) @ embedding^T / sqrt(d_model)
    loss   = cross-entropy(logits, original ids) averaged over real positions (EOS included)
So every output keeps the identity of its own word (the transformer reads colour, shape and motion
off them) and gets context from its neighbours. As released, the encoder runs without an attention
mask over prompts padded to the full length, in training as at inference.
"""

from __future__ import annotations

import dataclasses
import io
import pathlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import sentencepiece as spm
from transformers import T5Tokenizer

from repvideo_jax import text_encoder as TE
from repvideo_jax.demo import loop

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
FIRST_ORDINARY_ID = 3


def train_tokenizer(
  texts: Sequence[str], folder: str | pathlib.Path, *, vocab_size: int = 64, model_type: str = "word"
):
  """Trains a sentencepiece model (``model_type``: word, unigram, bpe or char) on ``texts``;
  writes ``folder/spiece.model`` (plus the tokenizer config) and returns the loaded
  ``T5Tokenizer``. ``vocab_size`` is an upper bound: a small corpus yields fewer pieces."""

  texts = [t for t in texts if t.strip()]
  if not texts:
    raise ValueError("no texts to train the tokenizer on")
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(texts),
    model_writer=buf,
    vocab_size=vocab_size,
    hard_vocab_limit=False,
    model_type=model_type,
    pad_id=PAD_ID,
    eos_id=EOS_ID,
    unk_id=UNK_ID,
    bos_id=-1,
    character_coverage=1.0,
    normalization_rule_name="nmt_nfkc_cf",
    minloglevel=2,
  )
  (folder / "spiece.model").write_bytes(buf.getvalue())
  tokenizer = T5Tokenizer.from_pretrained(folder, extra_ids=0)
  tokenizer.save_pretrained(folder)  # records extra_ids=0, so a plain from_pretrained works later
  return tokenizer


@dataclasses.dataclass(frozen=True)
class TextTrainConfig(loop.LoopConfig):
  steps: int = 300
  batch_size: int = 64
  lr: float = 3e-3
  save_every: int = 100
  corrupt_rate: float = 0.3


def corrupt(key: jax.Array, ids: jax.Array, rate: float, vocab_size: int) -> jax.Array:
  """Replaces each non-padding token with a random ordinary token with probability ``rate``."""
  k_where, k_what = jax.random.split(key)
  hit = jax.random.bernoulli(k_where, rate, ids.shape) & (ids != PAD_ID)
  random_ids = jax.random.randint(k_what, ids.shape, FIRST_ORDINARY_ID, vocab_size, ids.dtype)
  return jnp.where(hit, random_ids, ids)


def denoising_loss(params, ids: jax.Array, key: jax.Array, *, config: TE.T5Config, corrupt_rate: float):
  """(loss, {accuracy}) of predicting ``ids`` (B, L) from their corrupted copy (module docstring)."""
  hidden = TE.apply(params, corrupt(key, ids, corrupt_rate, config.vocab_size), config=config)
  logits = jnp.einsum(
    "bld,vd->blv", hidden.astype(jnp.float32), params["embedding"].astype(jnp.float32)
  ) / np.sqrt(config.d_model)
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, ids[..., None], axis=-1)[..., 0]
  real = (ids != PAD_ID).astype(jnp.float32)
  loss = jnp.sum(nll * real) / jnp.sum(real)
  accuracy = jnp.sum((jnp.argmax(logits, -1) == ids) * real) / jnp.sum(real)
  return loss, {"accuracy": accuracy}


def pretrain_encoder(
  config: TE.T5Config,
  tokenizer,
  texts: Sequence[str],
  train_config: TextTrainConfig,
  out_dir: str | pathlib.Path,
  *,
  max_length: int,
  progress: bool = True,
  stop_at: int | None = None,
):
  """Pretrains a fresh T5 encoder on ``texts`` (resumes in ``out_dir``; ``stop_at``: see
  ``loop.train``). Returns (params, log rows)."""
  tc = train_config
  if len(tokenizer) > config.vocab_size:
    raise ValueError(
      f"the tokenizer has {len(tokenizer)} tokens but text_encoder.vocab_size is "
      f"{config.vocab_size}: raise vocab_size to at least {len(tokenizer)}"
    )
  ids, _ = TE.tokenize(tokenizer, list(texts), max_length)
  params = TE.init(config, jax.random.key(tc.seed))

  def loss_fn(p, batch, key):
    return denoising_loss(p, batch, key, config=config, corrupt_rate=tc.corrupt_rate)

  def batches(step):
    rng = np.random.default_rng([tc.seed, step])
    return jnp.asarray(ids[rng.integers(0, len(ids), tc.batch_size)])

  return loop.train(
    loss_fn, params, batches, tc, out_dir, desc="text encoder", progress=progress, stop_at=stop_at
  )
