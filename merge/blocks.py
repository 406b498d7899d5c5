"""Cutting a model into the blocks that FlexMerge shares or keeps apart.

A block is a set of tensors that is merged as a unit: per transformer layer its attention, its MLP and its
norms, plus the embeddings, the head and the final norms. Rules are `(regex, name template)` pairs tried
in order on every tensor name; the template is expanded with the match's groups (`\\1`). `auto` infers
the layout from common naming conventions; presets pin the layouts of known families; users pass their
own rules for anything else (unmatched tensors then fall back to `auto`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

_LAYER = r"^(.*?\b(?:layers?|h|blocks?|resblocks)\.\d+)\."
_NORM = r"(?i:layer_?norm|norm|ln)"

AUTO = [
    (_LAYER + r"(?:.*\.)?\w*" + _NORM + r"\w*\.", r"\1.norms"),
    (_LAYER + r".*(?:EncDecAttention|encoder_attn|crossattention|cross_attn)", r"\1.cross_attn"),
    (_LAYER + r".*(?:attn|attention|SelfAttention)", r"\1.attn"),
    (_LAYER, r"\1.mlp"),
    (r"(?:^|\.)(?:embed\w*|wte|wpe|shared|embeddings?|patch_embed\w*|pos_embed\w*|cls_token|class_embedding)\b", "embeddings"),
    (r"(?:^|\.)(?:lm_head|classifier|head|pooler|visual_projection|text_projection|score|qa_outputs|cls)\b", "head"),
    (r"(?:^|\.)\w*" + _NORM + r"\w*\.", "final_norms"),
    (r".", "other"),
]

PRESETS: dict[str, list[tuple[str, str]]] = {
    "llama": [
        (r"^(model\.layers\.\d+)\.self_attn\.", r"\1.attn"),
        (r"^(model\.layers\.\d+)\.mlp\.", r"\1.mlp"),
        (r"^(model\.layers\.\d+)\.\w*norm\.", r"\1.norms"),
        (r"^model\.embed_tokens\.", "embeddings"),
        (r"^model\.norm\.", "final_norms"),
        (r"^(?:lm_head|score)\.", "head"),
    ],
    "bert": [
        (r"^(.*encoder\.layer\.\d+)\.(?:attention\.output\.LayerNorm|output\.LayerNorm)\.", r"\1.norms"),
        (r"^(.*encoder\.layer\.\d+)\.attention\.", r"\1.attn"),
        (r"^(.*encoder\.layer\.\d+)\.(?:intermediate|output)\.", r"\1.mlp"),
        (r"^(?:.*\.)?embeddings\.", "embeddings"),
        (r"^(?:.*\.)?(?:pooler|classifier|cls|qa_outputs)\.", "head"),
    ],
    "t5": [
        (r"^((?:encoder|decoder)\.block\.\d+)\.layer\.\d+\.layer_norm\.", r"\1.norms"),
        (r"^((?:encoder|decoder)\.block\.\d+)\.layer\.\d+\.SelfAttention\.", r"\1.attn"),
        (r"^((?:encoder|decoder)\.block\.\d+)\.layer\.\d+\.EncDecAttention\.", r"\1.cross_attn"),
        (r"^((?:encoder|decoder)\.block\.\d+)\.layer\.\d+\.DenseReluDense\.", r"\1.mlp"),
        (r"^(?:shared|(?:encoder|decoder)\.embed_tokens)\.", "embeddings"),
        (r"^(?:encoder|decoder)\.final_layer_norm\.", "final_norms"),
        (r"^lm_head\.", "head"),
    ],
    "clip": [
        (r"^(.*encoder\.layers\.\d+)\.layer_norm\d\.", r"\1.norms"),
        (r"^(.*encoder\.layers\.\d+)\.self_attn\.", r"\1.attn"),
        (r"^(.*encoder\.layers\.\d+)\.mlp\.", r"\1.mlp"),
        (r"^(?:.*\.)?embeddings\.", "embeddings"),
        (r"^(?:.*\.)?(?:pre_layrnorm|post_layernorm|final_layer_norm)\.", "final_norms"),
        (r"^(?:visual_projection|text_projection|logit_scale|classifier)\b", "head"),
    ],
    "vit": [
        (r"^(.*(?:encoder\.layer|layers)\.\d+)\.layernorm_(?:before|after)\.", r"\1.norms"),
        (r"^(.*(?:encoder\.layer|layers)\.\d+)\.attention\.", r"\1.attn"),
        (r"^(.*(?:encoder\.layer|layers)\.\d+)\.(?:intermediate|output|mlp)\.", r"\1.mlp"),
        (r"^(?:.*\.)?embeddings\.", "embeddings"),
        (r"^(?:.*\.)?layernorm\.", "final_norms"),
        (r"^(?:.*\.)?(?:pooler|classifier)\.", "head"),
    ],
}
for _alias in ("mistral", "qwen", "qwen2", "qwen3"):
    PRESETS[_alias] = PRESETS["llama"]


@dataclass
class Block:
    name: str
    tensors: list[str]


def parse_rules(spec) -> list[tuple[str, str]]:
    """`auto`, a preset name, or a list of rules: strings (block = group 1, or the whole match) or
    `{pattern: ..., name: ...}` mappings. User rules are followed by `auto` for what they leave out."""
    if spec is None or spec == "auto":
        return list(AUTO)
    if isinstance(spec, str):
        if spec not in PRESETS:
            raise ValueError(f"unknown block preset {spec!r}; presets: auto, {', '.join(sorted(PRESETS))}")
        return PRESETS[spec] + AUTO
    rules = []
    for item in spec:
        if isinstance(item, str):
            rules.append((item, None))
        elif isinstance(item, dict) and "pattern" in item:
            rules.append((item["pattern"], item.get("name")))
        else:
            raise ValueError(f"block rule must be a regex string or {{pattern, name}}, got {item!r}")
    for pattern, _ in rules:
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"invalid block regex {pattern!r}: {err}") from err
    return rules + AUTO


def assign(names: list[str], spec=None) -> list[Block]:
    """Group tensor names into blocks, in first-appearance order."""
    rules = [(re.compile(p), t) for p, t in parse_rules(spec)]
    blocks: dict[str, Block] = {}
    for name in names:
        for pattern, template in rules:
            m = pattern.search(name)
            if m is None:
                continue
            if template is not None:
                key = m.expand(template)
            else:
                key = m.group(1) if m.groups() else m.group(0)
            blocks.setdefault(key, Block(key, [])).tensors.append(name)
            break
    return list(blocks.values())
