"""Running an experiment: its runs sequentially, as ``--jobs`` worker processes or as Ray tasks, with
resume checks, progress output and what each finished run leaves in MLflow.
"""
