"""Training data for RepVideo: precomputed latent datasets and the input pipelines that read them.

  records.py   the on-disk format (sharded ArrayRecord files + ``dataset.json``) and ``ExampleSource``
  prepare.py   ``python -m repvideo_jax.data.prepare``: videos + captions -> VAE latents + T5 embeddings
  pipeline.py  ``make_train_iterator``: shuffled, sharded, batched grain pipeline with checkpointable state
  online.py    ``OnlineIterator``: encodes videos and captions on the fly, for small runs without records

Both iterators yield the same batches: ``{"latents": (B, t, h, w, C) float32, "text": (B, L, D) float32}``
with scaled latents (what the transformer is trained on) and T5 embeddings as ``Pipeline.encode_prompts``
returns them.
"""
