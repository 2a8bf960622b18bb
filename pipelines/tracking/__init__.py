"""MLflow bookkeeping: runs, params, figures, the model registry."""
