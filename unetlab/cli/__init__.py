"""The ``unetlab`` command line: one module per command group, each with its flags next to its handler.
"""

from typing import Any


def __getattr__(name: str) -> Any:
    """The names of the 0.2.0 module ``unetlab.cli`` (deprecated, removed in 0.3): see ``unetlab._legacy``."""
    from unetlab._legacy import old_attribute

    return old_attribute(__name__, name)
