"""Training steps: the model's training loop fed from the object store, checkpoints
published there, runs tracked in MLflow."""
