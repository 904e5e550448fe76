"""Platform plumbing every step shares: settings, the object store, MLflow tracking."""
