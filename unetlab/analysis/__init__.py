"""Comparing finished runs: paired statistics, verdicts, figures and the dashboard written into MLflow.
"""
