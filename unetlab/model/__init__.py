"""The U-Net: assembly from registered components, deep supervision, sliding-window inference, and the
meta-device build that ``unetlab validate`` uses to catch factory errors without allocating memory.
"""

from typing import Any


def __getattr__(name: str) -> Any:
    """The names of the 0.2.0 module ``unetlab.model`` (deprecated, removed in 0.3): see ``unetlab._legacy``."""
    from unetlab._legacy import old_attribute

    return old_attribute(__name__, name)
