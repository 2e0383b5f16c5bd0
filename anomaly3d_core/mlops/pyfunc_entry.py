"""MLflow "models from code" entry: the model class is imported, never pickled."""

import mlflow.models

from anomaly3d_core.mlops.pyfunc_model import Anomaly3DModel

mlflow.models.set_model(Anomaly3DModel())
