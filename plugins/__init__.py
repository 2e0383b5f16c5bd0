"""Built-in anomaly3d components, registered through the ``anomaly3d`` entry points."""
