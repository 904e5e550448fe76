"""The model registry side: trained pipelines as MLflow pyfunc models, registered
versions with lineage tags, aliases (`candidate`, `champion`)."""
