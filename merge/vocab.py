"""Models whose vocabularies differ: mergekit's `tokenizer_source` (`base`, `union`, or a model's name).

The merged vocabulary is the base's, a named model's, or the union (the base's tokens, then every new
token of the models in order). Each checkpoint's token-indexed tensors (input embeddings and output head)
are re-indexed to it before the merge, so a token means the same row everywhere. A token a checkpoint
lacks gets, as in mergekit: the row of the only model that has it; else the base's row if the base has it;
else the mean of the rows of the models that have it (zero if none has it). The tokenizer of the source
(or, for `union`, the base's with the new tokens added) is written next to the merged weights."""
from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import torch

from merge.stats import read_rows


TOKEN_TENSORS = re.compile(r"(?:^|\.)(?:embed_tokens|wte|word_embeddings|shared|lm_head|embed_out)\.weight$")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def read_vocab(folder: Path) -> dict[str, int]:
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: tokenizer_source needs every input's tokenizer.json")
    tok = json.loads(path.read_text())
    vocab = tok["model"]["vocab"]
    out = {t: i for i, (t, _) in enumerate(vocab)} if isinstance(vocab, list) else dict(vocab)
    out.update({a["content"]: a["id"] for a in tok.get("added_tokens", [])})
    return out


def merged_vocab(source: str, base: dict, models: dict[str, dict]) -> dict[str, int]:
    if source == "base":
        return dict(base)
    if source == "union":
        out = dict(base)
        for vocab in models.values():
            for token, _ in sorted(vocab.items(), key=lambda kv: kv[1]):
                if token not in out:
                    out[token] = len(out)
        return out
    if source in models:
        return dict(models[source])
    raise ValueError(f"tokenizer_source must be 'base', 'union' or a model's name {sorted(models)}, got {source!r}")


def token_tensors(ckpt) -> list[str]:
    return [n for n in ckpt.names if TOKEN_TENSORS.search(n) and len(ckpt.shape[n]) == 2]


def reindex(out_vocab: dict[str, int], vocabs: list[dict[str, int]], rows: list[torch.Tensor], base_index: int) -> list[torch.Tensor]:
    """Every checkpoint's `[vocab, d]` tensor re-indexed to `out_vocab`, missing tokens filled by the rule above."""
    n, d = len(out_vocab), rows[0].shape[1]
    out = [torch.empty((n, d), dtype=torch.float32) for _ in rows]
    for token, i in out_vocab.items():
        have = [k for k, v in enumerate(vocabs) if token in v and v[token] < rows[k].shape[0]]
        if len(have) == len(vocabs):
            for k in have:
                out[k][i] = rows[k][vocabs[k][token]].float()
            continue
        if len(have) == 1:
            fill = rows[have[0]][vocabs[have[0]][token]].float()
        elif base_index in have:
            fill = rows[base_index][vocabs[base_index][token]].float()
        elif have:
            fill = torch.stack([rows[k][vocabs[k][token]].float() for k in have]).mean(0)
        else:
            fill = torch.zeros(d)
        for k in range(len(vocabs)):
            out[k][i] = rows[k][vocabs[k][token]].float() if k in have else fill
    return out


class Reindexed:
    """A checkpoint whose token-indexed tensors are served re-indexed (held in memory: one block's worth
    per checkpoint); everything else is read from the files as usual."""

    def __init__(self, ckpt, replaced: dict[str, torch.Tensor]):
        self._ckpt, self._replaced = ckpt, replaced
        self.shape = {**ckpt.shape, **{n: tuple(t.shape) for n, t in replaced.items()}}
        self.dtype = {**ckpt.dtype, **{n: ckpt.dtype[n] for n in replaced}}

    def __getattr__(self, name):
        return getattr(self._ckpt, name)

    def nbytes(self, name):
        return self.dtype[name].itemsize * math.prod(self.shape[name])

    def read(self, names):
        rest = [n for n in names if n not in self._replaced]
        out = self._ckpt.read(rest)
        out.update({n: self._replaced[n].to(self._ckpt.dtype[n]) for n in names if n in self._replaced})
        return out

    def read_rows(self, name, span, out=None):
        if name not in self._replaced:
            return read_rows(self._ckpt, name, span, out)
        t = self._replaced[name]
        t = (t if span is None else t[span[0] : span[1]]).to(self._ckpt.dtype[name])
        return t if out is None else out.copy_(t)

    def read_into(self, bufs):
        rest = {n: b for n, b in bufs.items() if n not in self._replaced}
        self._ckpt.read_into(rest)
        for n, b in bufs.items():
            if n in self._replaced:
                b.copy_(self._replaced[n])


def align(source: str, base, models: dict) -> tuple[object, dict, dict[str, int]]:
    """Wrap the base and the models so their token tensors share the merged vocabulary."""
    base_vocab = read_vocab(base.folder)
    vocabs = {t: read_vocab(c.folder) for t, c in models.items()}
    out_vocab = merged_vocab(source, base_vocab, vocabs)
    names = token_tensors(base)
    ckpts = [base, *models.values()]
    all_vocabs = [base_vocab, *vocabs.values()]
    replaced = [dict() for _ in ckpts]
    for n in names:
        rows = [c.read([n])[n] for c in ckpts]
        for k, t in enumerate(reindex(out_vocab, all_vocabs, rows, 0)):
            replaced[k][n] = t
    wrapped = [Reindexed(c, r) for c, r in zip(ckpts, replaced)]
    return wrapped[0], dict(zip(models, wrapped[1:])), out_vocab


def write_tokenizer(source: str, base_folder: Path, model_folders: dict[str, Path], out_vocab: dict[str, int], dst: Path) -> None:
    """The merged model's tokenizer and its `vocab_size` in config.json."""
    src = Path(model_folders[source]) if source in model_folders else Path(base_folder)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    if source == "union":
        tok = json.loads((dst / "tokenizer.json").read_text())
        known = read_vocab(base_folder)
        for token, i in sorted(out_vocab.items(), key=lambda kv: kv[1]):
            if token not in known:
                tok.setdefault("added_tokens", []).append({"id": i, "content": token, "single_word": False, "lstrip": False,
                                                          "rstrip": False, "normalized": False, "special": False})
        (dst / "tokenizer.json").write_text(json.dumps(tok))
    cfg_path = dst / "config.json"
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
        cfg["vocab_size"] = len(out_vocab)
        cfg_path.write_text(json.dumps(cfg, indent=2))
