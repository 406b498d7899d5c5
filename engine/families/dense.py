"""Any transformers model that no MoE family claims: built as transformers builds it, with no block to patch,
so adapters, routing and serving run on it unchanged. Not in `FAMILIES`, which lists the MoE families."""
from engine.families.base import Family

DENSE = Family("dense", (), None, None, auto_class="AutoModel")
