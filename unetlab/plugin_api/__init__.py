"""The plugin API: the hooks a plugin implements, the component registry they fill, parameter declarations
(``Range``, ``FilePath``), the plugin host that loads entry points, the contracts and the conformance kit.

The lowest layer above ``unetlab.errors``: it imports nothing else of unetlab.
"""
