"""Model definitions tessera adds to transformers' own (registered with its Auto classes on import)."""
