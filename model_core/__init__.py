"""facecast model core: pure PyTorch causal avatar DiT, caches, sampler, VAE, audio, checkpoints, engine."""
