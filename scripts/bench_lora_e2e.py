"""End-to-end LoRA routing: does choosing adapters per query give the right answers? CPU, one thread.

Tasks. Twelve string transforms of real words from wordfreq's lists, in four families of three languages:
  reverse   de, nl, da     each word spelt backwards
  upper     es, pt, it     each word in capitals
  romanize  ru, uk, bg     each word transliterated to ASCII (unidecode)
  deaccent  pl, cs, sk     each word's diacritics removed (unidecode; only words that have some)
An input is two words of the task's language, "słońce między"; the answer is the two words transformed,
"slonce miedzy". Nothing in the input names the task: the router must tell it from the words themselves.
A word belongs to one language only (words listed for two languages are dropped) and to one split only.

Base model. A small character-level Llama (391k parameters), trained by this script from scratch (no
download) on the four transforms where the input starts with a marker token naming the transform, and on
copying where it does not; words of the adapter, validation and test splits are never seen. The benchmark's
inputs have no marker, so the base model alone copies: it has the skills but not the task. The trained base
is shipped in configs/lora/e2e_base (training.json records how it was made; `--train-base` remakes it, about
13 minutes on one busy core), so a run trains only the adapters. One LoRA adapter per task (PEFT, rank 8,
all linear layers), trained on that task's unmarked pairs.

Methods, scored by exact match of the greedy answer on held-out test inputs:
  base        the base model alone
  oracle      the task's own adapter
  uniform     an equal mixture of every adapter in the pool
  arrow       PEFT's Arrow routing (create_arrow_model + ArrowConfig, top_k=3): per token, per layer
  arrow_k1    the same with top_k=1: one adapter per token and layer
  knn1/knn3   LoraRetriever-style retrieval: the adapter(s) of the query's nearest 1 / 3 validation
              examples, an equal mixture of the distinct ones (same encoder as tessera_k1/k3)
  tessera_k1  tessera's TaskRouter (LoRAuter: nearest task representations, softmax weights), k = 1 and 3,
  tessera_k3  with the encoder and the k = 3 temperature chosen on the validation split (below)
  tessera_minilm_k1/k3  the same router with its default encoder, all-MiniLM-L6-v2, at T = 0.2
Every mixture runs through tessera's per-row mixture (engine.lora.attach_adapters), Arrow through PEFT.

Settings chosen on validation, never on test: each task's validation pairs are cut in halves, one half
represents the tasks and the other is routed, then they swap. The encoder is the candidate (MiniLM, or a
character n-gram TF-IDF fitted on the router's validation inputs, n-grams 1-2, 1-3 or 1-4) whose top-1 task is
the query's own most often; the k = 3 temperature (0.2 to 0.01) is the one whose mixtures answer most
validation queries exactly. MiniLM's uncased tokenizer strips diacritics, so "dílny" and "dilny" are one input
to it: the deaccent tasks' inputs look like their answers and like other Latin-script languages.
Adapters are cached under $TESSERA_CACHE/lora_e2e (keyed by the base weights, the task's training pairs and
the training settings), so a second run with the same cache only evaluates.
Regimes:
  all            every task has its adapter and its validation set in the router
  task_removed   leave one out: the query's task, its adapter and its validation set are absent (each task
                 in turn); its two sibling tasks in the family remain
  family_unseen  the query's whole family is absent (each family in turn)
"% of oracle" is a method's mean accuracy over the regime's queries divided by the oracle's on the same
queries (the oracle uses the task's own adapter even where the regime removed it).

  python scripts/bench_lora_e2e.py                 # writes benchmarks/results/lora_e2e_cpu.json
                                                   # (measured: 5.6 min of CPU time from an empty cache)
  python scripts/bench_lora_e2e.py --quick         # a smaller run to check the pipeline
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import platform
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from foundation.atomic import write_json  # noqa: E402
from foundation.cache import build_once, cache_dir  # noqa: E402

FAMILIES = {"reverse": ["de", "nl", "da"], "upper": ["es", "pt", "it"], "romanize": ["ru", "uk", "bg"],
            "deaccent": ["pl", "cs", "sk"]}
PAD, BOS, SEP, EOS = 0, 1, 2, 3
MARKERS = {family: 4 + i for i, family in enumerate(FAMILIES)}
FIRST_CHAR = 4 + len(FAMILIES)
BASE_DIR = ROOT / "configs" / "lora" / "e2e_base"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def transform(family: str, text: str) -> str:
    from unidecode import unidecode

    if family == "reverse":
        return text[::-1]
    if family == "upper":
        return text.upper()
    return unidecode(text)  # romanize and deaccent: unidecode's transliteration tables


# ---- data ----------------------------------------------------------------------------------------------
def word_lists(n_words: int) -> dict[str, list[str]]:
    """Per language: wordfreq's most frequent words of 3-10 letters that no other task language lists and
    that the language's transform changes."""
    import wordfreq

    langs = [lang for langs in FAMILIES.values() for lang in langs]
    lists = {lang: [w for w in wordfreq.top_n_list(lang, n_words) if w.isalpha() and 3 <= len(w) <= 10]
             for lang in langs}
    seen = Counter(w for lang in langs for w in set(lists[lang]))
    return {lang: [w for w in lists[lang] if seen[w] == 1 and transform(family, w) != w]
            for family, family_langs in FAMILIES.items() for lang in family_langs}


def build_data(lists: dict[str, list[str]], args, rng: random.Random):
    """Disjoint word splits per language: adapter training, validation and test pairs of two words each;
    the remaining words are the base model's pretraining vocabulary."""
    tasks, pretrain = {}, []
    for family, langs in FAMILIES.items():
        for lang in langs:
            words = list(lists[lang])
            rng.shuffle(words)
            need = 2 * (args.n_val + args.n_test + args.n_adapter)
            if len(words) < need + 500:
                raise SystemExit(f"{lang}: only {len(words)} usable words; raise --words")
            pre, rest = words[: len(words) - need], words[len(words) - need:]

            def pairs(ws):
                return [(f"{a} {b}", transform(family, f"{a} {b}")) for a, b in zip(ws[::2], ws[1::2])]

            tasks[f"{family}_{lang}"] = {
                "family": family, "lang": lang, "val": pairs(rest[: 2 * args.n_val]),
                "test": pairs(rest[2 * args.n_val: 2 * (args.n_val + args.n_test)]),
                "train": pairs(rest[2 * (args.n_val + args.n_test):])}
            pretrain.append(pre)
    return tasks, pretrain


class Chars:
    """Character vocabulary: ids 0-3 are pad/bos/sep/eos, then one marker per family, then characters."""

    def __init__(self, chars):
        self.chars = sorted(set(chars))
        self.id = {c: FIRST_CHAR + i for i, c in enumerate(self.chars)}
        self.char = {i: c for c, i in self.id.items()}
        self.size = FIRST_CHAR + len(self.chars)

    def prompt(self, text: str, marker: int | None = None) -> list[int]:
        return [BOS] + ([marker] if marker is not None else []) + [self.id[c] for c in text] + [SEP]

    def answer(self, text: str) -> list[int]:
        return [self.id[c] for c in text] + [EOS]

    def decode(self, ids) -> str:
        out = []
        for i in ids:
            if i == EOS:
                break
            out.append(self.char.get(i, "\ufffd"))
        return "".join(out)


def batch_of(examples):
    """(prompt ids, answer ids) pairs -> right-padded input ids, labels on the answer only, attention mask."""
    width = max(len(p) + len(a) for p, a in examples)
    ids = torch.full((len(examples), width), PAD)
    labels = torch.full((len(examples), width), -100)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (p, a) in enumerate(examples):
        seq = p + a
        ids[row, : len(seq)] = torch.tensor(seq)
        labels[row, len(p): len(seq)] = torch.tensor(a)
        mask[row, : len(seq)] = 1
    return ids, labels, mask


def train(model, sample, steps: int, lr: float, log_name: str, logs: int = 4):
    """AdamW, linear warm-up over a tenth of the steps, cosine decay; `sample()` returns (ids, labels, mask)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    start, loss = time.perf_counter(), None
    for step in range(steps):
        ids, labels, mask = sample()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if (step + 1) % max(1, steps // logs) == 0:
            print(f"  {log_name}: step {step + 1}/{steps} loss {loss.item():.4f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    model.eval()
    return float(loss.item())


def pretrain_base(args, chars: Chars, pretrain_words, folder: Path) -> dict:
    """Train the base model from scratch and save it with its vocabulary; returns what was done."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=chars.size, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=96, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
                         tie_word_embeddings=True)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed + 1)
    model = LlamaForCausalLM(config)
    families = list(FAMILIES)

    def sample():
        examples = []
        for _ in range(args.base_batch):
            text = " ".join(rng.sample(rng.choice(pretrain_words), 2))
            if rng.random() < 0.2:
                examples.append((chars.prompt(text), chars.answer(text)))
            else:
                family = rng.choice(families)
                examples.append((chars.prompt(text, MARKERS[family]), chars.answer(transform(family, text))))
        return batch_of(examples)

    start = time.perf_counter()
    loss = train(model, sample, args.base_steps, args.base_lr, "base", logs=20)
    info = {"steps": args.base_steps, "batch": args.base_batch, "lr": args.base_lr, "seed": args.seed,
            "final_loss": round(loss, 4), "seconds": round(time.perf_counter() - start, 1),
            "threads": torch.get_num_threads(), "params": sum(p.numel() for p in model.parameters())}
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    (folder / "chars.json").write_text(json.dumps(chars.chars, ensure_ascii=False))
    (folder / "training.json").write_text(json.dumps(info, indent=1))
    return info


def adapter_folder(base_folder: Path, name: str, task: dict, args) -> Path:
    """Where the task's adapter is cached: `$TESSERA_CACHE/lora_e2e/<task>-<hash>`, the hash over the base
    weights, the task's training pairs and every training setting, so a changed input retrains."""
    digest = hashlib.sha256((base_folder / "model.safetensors").read_bytes())
    digest.update(json.dumps([name, task["train"], TARGETS, args.adapter_steps, args.adapter_lr, args.batch,
                              args.seed]).encode())
    return cache_dir("lora_e2e", f"{name}-{digest.hexdigest()[:16]}")


def train_adapter(base, name: str, task: dict, chars: Chars, folder: Path, args) -> float | None:
    """Train the task's adapter into `folder` once (PEFT, rank 8); returns its final loss, None when cached.
    Each adapter has its own seed, so it does not depend on which others were trained in the same run."""
    from peft import LoraConfig, get_peft_model

    if folder.is_dir():
        return None
    seed = args.seed * 1000 + int(hashlib.sha256(name.encode()).hexdigest()[:6], 16)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                          target_modules=TARGETS))
    pairs = [(chars.prompt(x), chars.answer(y)) for x, y in task["train"]]

    def sample():
        return batch_of(rng.sample(pairs, min(args.batch, len(pairs))))

    loss = train(model, sample, args.adapter_steps, args.adapter_lr, name, logs=1)
    build_once(folder, model.save_pretrained)
    return loss


# ---- decoding ------------------------------------------------------------------------------------------
@torch.no_grad()
def greedy(model, prompts: list[list[int]], chars: Chars, max_new: int, batch: int, **kwargs) -> list[str]:
    """Greedy answers, prompts left-padded in batches of similar length. kwargs per row (adapter_weights)
    are sliced with the batch."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out = [""] * len(prompts)
    for s in range(0, len(order), batch):
        rows = order[s: s + batch]
        width = max(len(prompts[i]) for i in rows)
        ids = torch.full((len(rows), width), PAD)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            ids[r, width - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[r, width - len(prompts[i]):] = 1
        extra = {k: [v[i] for i in rows] for k, v in kwargs.items()}
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                             pad_token_id=PAD, eos_token_id=EOS, **extra)
        for r, i in enumerate(rows):
            out[i] = chars.decode(gen[r, width:].tolist())
    return out


def exact(answers: list[str], gold: list[str]) -> list[int]:
    return [int(a == g) for a, g in zip(answers, gold)]


# ---- encoders -----------------------------------------------------------------------------------------
class MemoEncoder:
    """The sentence encoder with each text embedded once per run (regimes re-use the same texts)."""

    def __init__(self, encoder):
        self.encoder, self.name, self.dim = encoder, encoder.name, encoder.dim
        self.memo: dict[str, torch.Tensor] = {}

    def encode(self, texts: list[str]) -> torch.Tensor:
        new = [t for t in dict.fromkeys(texts) if t not in self.memo]
        if new:
            self.memo.update(zip(new, self.encoder.encode(new)))
        return torch.stack([self.memo[t] for t in texts]) if texts else torch.zeros(0, self.dim)


class CharTfidfEncoder:
    """Character n-gram TF-IDF (scikit-learn's TfidfVectorizer, n-grams inside word boundaries, sublinear term
    frequency, case and diacritics kept), its vocabulary and IDF fitted on the router's validation inputs only.
    all-MiniLM-L6-v2's uncased WordPiece tokenizer strips diacritics ("dílny" and "dilny" are one input to it),
    and these tasks differ mostly in letters and diacritics."""

    def __init__(self, texts: list[str], ngram_range: tuple[int, int]):
        from sklearn.feature_extraction.text import TfidfVectorizer

        self.vectorizer = TfidfVectorizer(analyzer="char_wb", ngram_range=ngram_range, sublinear_tf=True,
                                          lowercase=False).fit(texts)
        self.name = encoder_label(ngram_range)
        self.dim = len(self.vectorizer.vocabulary_)

    def encode(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor(self.vectorizer.transform(list(texts)).toarray(), dtype=torch.float32)


ENCODERS = ["minilm", (1, 2), (1, 3), (1, 4)]  # the candidates the validation split chooses from
TEMPERATURES = [0.2, 0.1, 0.05, 0.02, 0.01]  # k = 3 candidates; 0.2 is LoRAuter's published setting


def encoder_label(spec) -> str:
    return "minilm" if spec == "minilm" else f"char-tfidf-{spec[0]}-{spec[1]}"


def make_encoder(spec, bank: dict[str, list[str]], minilm):
    """MiniLM, or a TF-IDF encoder fitted on the validation inputs the router holds (never on queries)."""
    return minilm if spec == "minilm" else CharTfidfEncoder([x for xs in bank.values() for x in xs], spec)


# ---- routing ---------------------------------------------------------------------------------------------
def knn_mixtures(encoder, bank: dict[str, list[str]], queries: list[str], k: int) -> list[dict]:
    """LoraRetriever-style: the tasks of the query's k nearest validation examples; equal weight on each
    distinct adapter among them."""
    names = [t for t, xs in bank.items() for _ in xs]
    store = torch.nn.functional.normalize(encoder.encode([x for xs in bank.values() for x in xs]).float(), dim=-1)
    emb = torch.nn.functional.normalize(encoder.encode(queries).float(), dim=-1)
    mixes = []
    for row in torch.topk(emb @ store.T, k, dim=1).indices.tolist():
        chosen = list(dict.fromkeys(names[j] for j in row))
        mixes.append({t: 1.0 / len(chosen) for t in chosen})
    return mixes


def router_mixtures(encoder, bank: dict[str, list[str]], pool, queries: list[str], k: int, temperature: float):
    """tessera's TaskRouter over the bank's tasks (each served by its adapter of the same name). No fallback
    to the base model (min_confidence 0): base is its own row, and the threshold's scale depends on the encoder."""
    from engine.lora import TaskRouter

    router = TaskRouter.build(bank, encoder, pool, max_examples=max(map(len, bank.values())), k=k,
                              temperature=temperature, min_confidence=0.0)
    decisions = router.route(queries)
    return [dict(d.adapters) for d in decisions], [d.tasks[0] for d in decisions]


def select_settings(lm, minilm, tasks: dict, chars: Chars, args) -> dict:
    """Router settings chosen on the validation split alone. Each task's validation pairs are cut in two
    halves: one half represents the tasks, the other is routed (and answered), then the halves swap. The encoder
    is the one whose top-1 task is the query's own most often; the k = 3 temperature is the one whose mixtures
    answer most validation queries exactly (ties: the earlier, LoRAuter's 0.2 first)."""
    half = args.n_val // 2
    folds = []
    for rep, query in ((slice(0, half), slice(half, None)), (slice(half, None), slice(0, half))):
        bank = {t: [x for x, _ in task["val"][rep]] for t, task in tasks.items()}
        folds.append((bank, [(x, y, t) for t, task in tasks.items() for x, y in task["val"][query]]))
    own = {}
    for spec in ENCODERS:
        hits = []
        for bank, queries in folds:
            _, top = router_mixtures(make_encoder(spec, bank, minilm), bank, lm.pool, [q for q, _, _ in queries],
                                     1, TEMPERATURES[0])
            hits += [int(r == t) for r, (_, _, t) in zip(top, queries)]
        own[encoder_label(spec)] = sum(hits) / len(hits)
    encoder = max(ENCODERS, key=lambda spec: own[encoder_label(spec)])
    answered = {}
    for temperature in TEMPERATURES:
        hits = []
        for bank, queries in folds:
            mixes, _ = router_mixtures(make_encoder(encoder, bank, minilm), bank, lm.pool,
                                       [q for q, _, _ in queries], 3, temperature)
            hits += exact(greedy(lm, [chars.prompt(q) for q, _, _ in queries], chars, args.max_new,
                                 args.eval_batch, adapter_weights=mixes), [y for _, y, _ in queries])
        answered[temperature] = sum(hits) / len(hits)
    temperature = max(TEMPERATURES, key=lambda t: answered[t])
    hits = []
    for bank, queries in folds:  # k = 1 with the chosen encoder, for the record
        mixes, _ = router_mixtures(make_encoder(encoder, bank, minilm), bank, lm.pool, [q for q, _, _ in queries],
                                   1, temperature)
        hits += exact(greedy(lm, [chars.prompt(q) for q, _, _ in queries], chars, args.max_new, args.eval_batch,
                             adapter_weights=mixes), [y for _, y, _ in queries])
    print(f"validation: top-1 own task {own} -> {encoder_label(encoder)}; k=3 exact match {answered} -> "
          f"T={temperature}", flush=True)
    return {"encoder": encoder, "temperature": temperature, "validation_top1_own_task": own,
            "validation_k3_exact_match": {str(t): v for t, v in answered.items()},
            "validation_k1_exact_match": sum(hits) / len(hits)}


def arrow_answers(base_folder: Path, adapter_folders: dict, available: list[str], prompts, chars, args,
                  top_k: int):
    from peft import ArrowConfig, create_arrow_model
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(base_folder).eval()
    model = create_arrow_model(base, [str(adapter_folders[t]) for t in available],
                               ArrowConfig(top_k=top_k, router_temperature=1.0, rng_seed=args.seed)).eval()
    return greedy(model, prompts, chars, args.max_new, args.eval_batch)


# ---- the benchmark ---------------------------------------------------------------------------------------
METHODS = ["base", "oracle", "uniform", "arrow", "arrow_k1", "knn1", "knn3", "tessera_k1", "tessera_k3",
           "tessera_minilm_k1", "tessera_minilm_k3"]

def evaluate(lm, minilm, tasks, adapter_folders, base_folder, chars, args, query_tasks, available, cached,
             chosen: dict) -> dict:
    """Per method, whether each test query of `query_tasks` was answered exactly, with the pool and the
    routers' task sets restricted to `available`; and tessera's top-1 task per query."""
    queries = [x for t in query_tasks for x, _ in tasks[t]["test"]]
    gold = [y for t in query_tasks for _, y in tasks[t]["test"]]
    prompts = [chars.prompt(x) for x in queries]
    run = lambda mixes: exact(greedy(lm, prompts, chars, args.max_new, args.eval_batch,  # noqa: E731
                                     adapter_weights=mixes), gold)
    bank = {t: [x for x, _ in tasks[t]["val"]] for t in available}
    encoder = make_encoder(chosen["encoder"], bank, minilm)
    scores = {m: [v for t in query_tasks for v in cached[m][t]] for m in ("base", "oracle")}
    scores["uniform"] = run([{t: 1.0 / len(available) for t in available}] * len(queries))
    for name, top_k in (("arrow", 3), ("arrow_k1", 1)):  # PEFT's default top_k, and one adapter per token
        scores[name] = exact(arrow_answers(base_folder, adapter_folders, available, prompts, chars, args, top_k),
                             gold)
    for k in (1, 3):
        scores[f"knn{k}"] = run(knn_mixtures(encoder, bank, queries, k))
    top1 = {}
    for name, enc, temperature in (("tessera", encoder, chosen["temperature"]), ("tessera_minilm", minilm, 0.2)):
        for k in (1, 3):
            mixes, top = router_mixtures(enc, bank, lm.pool, queries, k, temperature)
            scores[f"{name}_k{k}"] = run(mixes)
            if k == 1:
                top1[f"{name}_k1"] = top
    return {"scores": scores, "top1": top1, "owner": [t for t in query_tasks for _ in tasks[t]["test"]]}


def summarise(result: dict, family: dict[str, str]) -> dict:
    """Accuracy and % of oracle per method (overall and per task), and tessera's top-1 routing: how often the
    query's own task, how often a task of its family, and where each task's queries went."""
    scores, owner = result["scores"], result["owner"]
    oracle = sum(scores["oracle"]) / len(scores["oracle"])
    out = {}
    for method in METHODS:
        acc = sum(scores[method]) / len(scores[method])
        per_task = {}
        for t, hit in zip(owner, scores[method]):
            per_task.setdefault(t, []).append(hit)
        out[method] = {"accuracy": round(acc, 4), "pct_of_oracle": round(100 * acc / oracle, 1) if oracle else None,
                       "per_task": {t: round(sum(v) / len(v), 3) for t, v in per_task.items()}}
    out["routing"] = {}
    for method, top in result["top1"].items():
        went: dict[str, Counter] = {}
        for t, r in zip(owner, top):
            went.setdefault(t, Counter())[r] += 1
        out["routing"][method] = {
            "top1_own_task": round(sum(r == t for r, t in zip(top, owner)) / len(top), 4),
            "top1_same_family": round(sum(family[r] == family[t] for r, t in zip(top, owner)) / len(top), 4),
            "top1_counts": {t: dict(c.most_common()) for t, c in went.items()}}
    out["queries"] = len(owner)
    return out


def _pct(value: float | None) -> str:
    return "  n/a " if value is None else f"{value:5.1f}%"


def merge_results(parts: list[dict]) -> dict:
    return {"scores": {m: [v for p in parts for v in p["scores"][m]] for m in parts[0]["scores"]},
            "top1": {m: [v for p in parts for v in p["top1"][m]] for m in parts[0]["top1"]},
            "owner": [t for p in parts for t in p["owner"]]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and queries (pipeline check)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--words", type=int, default=8000, help="wordfreq list length per language")
    parser.add_argument("--base-dir", default=str(BASE_DIR),
                        help="the shipped base model; trained here (and saved there) when absent")
    parser.add_argument("--train-base", action="store_true", help="train the base model even if shipped")
    parser.add_argument("--hidden", type=int, default=96)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--base-steps", type=int, default=1200)
    parser.add_argument("--base-batch", type=int, default=48)
    parser.add_argument("--base-lr", type=float, default=3e-3)
    parser.add_argument("--batch", type=int, default=32, help="adapter training batch")
    parser.add_argument("--adapter-steps", type=int, default=80)
    parser.add_argument("--adapter-lr", type=float, default=5e-3)
    parser.add_argument("--n-adapter", type=int, default=300, help="training pairs per task")
    parser.add_argument("--n-val", type=int, default=48, help="validation pairs per task (routers' view)")
    parser.add_argument("--n-test", type=int, default=40, help="test pairs per task")
    parser.add_argument("--max-new", type=int, default=32)
    parser.add_argument("--eval-batch", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "lora_e2e_cpu.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.adapter_steps, args.n_test, args.n_val = 30, 12, 24
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(tempfile.mkdtemp(prefix="tessera-lora-e2e-"))
    os.environ.setdefault("TESSERA_CACHE", str(work / "cache"))
    t0 = time.perf_counter()
    rng = random.Random(args.seed)

    lists = word_lists(args.words)
    tasks, pretrain_words = build_data(lists, args, rng)
    needed = set("".join(x + y for t in tasks.values() for split in ("train", "val", "test") for x, y in t[split]))
    base_folder = Path(args.base_dir)
    shipped = (base_folder / "chars.json").is_file() and not args.train_base
    if shipped:
        chars = Chars(json.loads((base_folder / "chars.json").read_text()))
        missing = needed - set(chars.chars)
        if missing:
            raise SystemExit(f"the shipped base in {base_folder} lacks characters {sorted(missing)[:10]}: "
                             "rerun with --train-base")
        base_info = {"shipped": True, **json.loads((base_folder / "training.json").read_text())}
    else:
        all_words = "".join(w + "".join(transform(f, w) for f in FAMILIES) for ws in pretrain_words for w in ws)
        chars = Chars(needed | set(all_words) | {" "})
        print(f"training the base model ({args.base_steps} steps) into {base_folder}", flush=True)
        base_info = {"shipped": False, **pretrain_base(args, chars, pretrain_words, base_folder)}
    print(f"{len(tasks)} tasks, {chars.size} tokens", flush=True)
    t_base = time.perf_counter() - t0
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(base_folder).eval()
    adapter_folders, adapter_loss = {}, {}
    for name, task in tasks.items():
        adapter_folders[name] = adapter_folder(base_folder, name, task, args)
        adapter_loss[name] = train_adapter(base, name, task, chars, adapter_folders[name], args)
    t_adapters = time.perf_counter() - t0 - t_base

    # the base model has the skills: with the marker it transforms the test inputs itself
    skills = {}
    for t, task in tasks.items():
        prompts = [chars.prompt(x, MARKERS[task["family"]]) for x, _ in task["test"]]
        skills[t] = sum(exact(greedy(base, prompts, chars, args.max_new, args.eval_batch),
                              [y for _, y in task["test"]])) / len(prompts)
    print("base model with the marker:", {t: round(a, 2) for t, a in skills.items()}, flush=True)

    from engine.lora import MiniLMEncoder, attach_adapters

    lm = attach_adapters(LlamaForCausalLM.from_pretrained(base_folder).eval(), adapter_folders, backend="torch")
    encoder = MemoEncoder(MiniLMEncoder())
    names = list(tasks)
    # base and oracle do not depend on the regime: score them once per task
    cached = {"base": {}, "oracle": {}}
    for t in names:
        prompts = [chars.prompt(x) for x, _ in tasks[t]["test"]]
        gold = [y for _, y in tasks[t]["test"]]
        cached["base"][t] = exact(greedy(lm, prompts, chars, args.max_new, args.eval_batch), gold)
        cached["oracle"][t] = exact(greedy(lm, prompts, chars, args.max_new, args.eval_batch,
                                           adapter_weights=[{t: 1.0}] * len(prompts)), gold)
    per_task_oracle = {t: sum(v) / len(v) for t, v in cached["oracle"].items()}
    print("oracle per task:", {t: round(a, 2) for t, a in per_task_oracle.items()}, flush=True)

    chosen = select_settings(lm, encoder, tasks, chars, args)
    print(f"settings chosen on validation ({time.perf_counter() - t0:.0f} s)", flush=True)
    regimes = {}
    common = (lm, encoder, tasks, adapter_folders, base_folder, chars, args)
    regimes["all"] = evaluate(*common, names, names, cached, chosen)
    print(f"regime all done ({time.perf_counter() - t0:.0f} s)", flush=True)
    regimes["task_removed"] = merge_results([evaluate(*common, [t], [o for o in names if o != t], cached, chosen)
                                             for t in names])
    print(f"regime task_removed done ({time.perf_counter() - t0:.0f} s)", flush=True)
    regimes["family_unseen"] = merge_results([
        evaluate(*common, [t for t in names if tasks[t]["family"] == f],
                 [t for t in names if tasks[t]["family"] != f], cached, chosen) for f in FAMILIES])
    family = {t: tasks[t]["family"] for t in names}
    summary = {regime: summarise(result, family) for regime, result in regimes.items()}
    total = time.perf_counter() - t0

    header = f"{'method':<12}" + "".join(f"{r:>24}" for r in summary)
    print("\nexact match (% of oracle)\n" + header)
    for method in METHODS:
        cells = "".join(f"{s[method]['accuracy']:>15.3f} ({_pct(s[method]['pct_of_oracle'])})"
                        for s in summary.values())
        print(f"{method:<12}{cells}")
    print("\ntop-1 routing accuracy (no lenient counting)")
    for regime, s in summary.items():
        for method, r in s["routing"].items():
            print(f"  {regime:<14} {method:<18} own task {r['top1_own_task']:.3f}   "
                  f"same family {r['top1_same_family']:.3f}")
    print(f"\ntotal {total:.0f} s (base {t_base:.0f} s, adapters {t_adapters:.0f} s)")

    result = {
        "benchmark": "bench_lora_e2e", "device": "cpu", "threads": args.threads,
        "platform": platform.platform(), "torch": torch.__version__,
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "tasks": {t: {"family": v["family"], "language": v["lang"], "train": len(v["train"]),
                      "val": len(v["val"]), "test": len(v["test"]), "example": v["test"][0]}
                  for t, v in tasks.items()},
        "base_model": {**base_info, "with_marker_per_task": skills},
        "adapter_final_loss": {t: None if v is None else round(v, 4) for t, v in adapter_loss.items()},
        "oracle_per_task": per_task_oracle,
        "base_per_task": {t: sum(v) / len(v) for t, v in cached["base"].items()},
        "chosen_on_validation": {**chosen, "encoder": encoder_label(chosen["encoder"])},
        "regimes": summary,
        "seconds": {"total": round(total, 1), "base": round(t_base, 1), "adapters": round(t_adapters, 1)},
    }
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
