"""The layer below both `engine` and `merge`: safetensors reading, the dtype table, atomic writes, the cache
folder and hub ids from the local Hugging Face cache. It imports neither of them."""
