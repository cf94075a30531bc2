"""The ``unetlab`` command line: one module per command group, each with its flags next to its handler.
"""
