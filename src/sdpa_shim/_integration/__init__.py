"""The transformers integration: hooks per release band, the attention registry entries, flash availability,
remote code and its loading window, and activation (``patch``, the top of this layer)."""
