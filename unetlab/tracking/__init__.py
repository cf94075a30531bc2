"""MLflow: one run's tracker, a store client that survives faults, run ownership, per-image tables.
"""
