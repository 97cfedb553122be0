"""Ray + MLflow composition of the ``vistr`` library (preprocess, train, tune, evaluate, registry)."""
