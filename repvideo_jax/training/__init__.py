"""Training: the diffusion objective (``objective``) and the optimizer / train step (``optim``)."""
