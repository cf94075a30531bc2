"""Data: dataset sources and their options, splits, per-image normalisation, the decode cache of folder
images, and the patch loader that feeds training.
"""
