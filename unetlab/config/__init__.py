"""Experiment files: YAML read with line numbers, the schema of every key, and expansion into runs.
"""
