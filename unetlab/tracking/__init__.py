"""MLflow: one run's tracker, a store client that survives faults, run ownership, per-image tables.
"""

from typing import Any


def __getattr__(name: str) -> Any:
    """The names of the 0.2.0 module ``unetlab.tracking`` (deprecated, removed in 0.3): see ``unetlab._legacy``."""
    from unetlab._legacy import old_attribute

    return old_attribute(__name__, name)
