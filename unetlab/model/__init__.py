"""The U-Net: assembly from registered components, deep supervision, sliding-window inference, and the
meta-device build that ``unetlab validate`` uses to catch factory errors without allocating memory.
"""
