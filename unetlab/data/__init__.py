"""Data: dataset sources and their options, splits, per-image normalisation, the decode cache of folder
images, and the patch loader that feeds training.
"""

from typing import Any


def __getattr__(name: str) -> Any:
    """The names of the 0.2.0 module ``unetlab.data`` (deprecated, removed in 0.3): see ``unetlab._legacy``."""
    from unetlab._legacy import old_attribute

    return old_attribute(__name__, name)
