"""Evaluation steps: trained models measured on data with known truth; figures go to
MLflow and onto the registered version, where the promotion gate reads them."""
