"""Built-in preprocessing steps, registered like any plugin's (the classes live in the core's
``anomaly3d_core.preprocess.steps``, which builds the chain from ``data.preprocessing``)."""

from anomaly3d_core.hookspecs import hookimpl
from anomaly3d_core.preprocess.steps import BUILTIN_STEPS


@hookimpl
def anomaly3d_register_steps():
    return list(BUILTIN_STEPS)
