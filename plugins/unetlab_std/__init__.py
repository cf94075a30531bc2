"""unetlab's first-party plugins: the standard encoders, upsamplers, fusions, decoder blocks,
initialisers, losses, metrics and datasets.

Each module is one plugin, registered through the ``unetlab`` entry point group exactly as a
third-party plugin is; the unetlab core never imports this package by name.
"""
