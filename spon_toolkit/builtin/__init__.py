"""The built-in plugins. Every module here is registered as plugin ``spon.<module>``, exactly like a
third-party plugin, so each can be blocked with ``SPON_BLOCK_PLUGINS``."""
