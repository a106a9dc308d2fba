"""Training stages (pure PyTorch): the resumable loop, the data windows, and one module per stage (vae, probe)."""
