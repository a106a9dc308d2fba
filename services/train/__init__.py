"""Training on Ray: `facecast train <stage>` runs a stage's loop through Ray Train's TorchTrainer (driver.py)."""
