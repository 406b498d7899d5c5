"""The layer below both `engine` and `merge`: safetensors reading, the dtype table, atomic writes and the cache
folder. It imports neither of them."""
