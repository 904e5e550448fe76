"""The registered pyfunc's model code (MLflow's models from code): the model is this
module's `VideoPipelineModel`, imported from the installed package when MLflow loads the
version, not a pickled object."""

from mlflow.models import set_model

from components.registry.pipeline_model import VideoPipelineModel

set_model(VideoPipelineModel())
