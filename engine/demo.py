"""`tessera demo`: load a MoE model through the registry, run it on tessera's kernels, and print its parity and
speed against the same model on Hugging Face's own modules."""
from __future__ import annotations

import argparse
import copy

import torch

from foundation.timing import best_seconds


def _forward(model, input_ids, attention_mask):
    with torch.no_grad():
        if model.config.is_encoder_decoder and hasattr(model, "decoder"):
            out = model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=input_ids[:, :8])
        else:
            out = model(input_ids=input_ids, attention_mask=attention_mask)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def run_demo(model_name: str, batch: int, seq_len: int, repeats: int, backends: list[str] | None) -> list[dict]:
    from engine.moe.experts import default_backend
    from engine.families import patch_moe
    from engine.moe.patch import moe_blocks
    from engine.loader import load
    from engine.registry import default_device

    device = default_device()
    reference = load(model_name, backend="eager", device=device)
    vocab = reference.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(2, vocab, (batch, seq_len), generator=generator).to(device)
    attention_mask = torch.ones_like(input_ids)
    want = _forward(reference, input_ids, attention_mask)
    eager_s = best_seconds({"eager": lambda: _forward(reference, input_ids, attention_mask)}, device, repeats)["eager"]
    backends = backends or [default_backend(device)]
    print(f"model {model_name} ({type(reference).__name__}) on {device}: batch {batch} × {seq_len} tokens")
    print(f"{'implementation':22} {'max rel err':>12} {'ms/forward':>11} {'speed-up':>9}")
    print(f"{'hugging face eager':22} {0.0:>12.1e} {eager_s * 1e3:>11.2f} {1.0:>9.2f}")
    rows = []
    for backend in backends:
        model = patch_moe(copy.deepcopy(reference), backend=backend)
        got = _forward(model, input_ids, attention_mask)
        err = ((got - want).abs().max() / want.abs().max()).item()
        seconds = best_seconds({backend: lambda: _forward(model, input_ids, attention_mask)}, device, repeats)[backend]
        blocks = len(moe_blocks(model))
        print(f"{'tessera ' + backend:22} {err:>12.1e} {seconds * 1e3:>11.2f} {eager_s / seconds:>9.2f}"
              f"   ({blocks} MoE blocks on tessera)")
        rows.append(dict(backend=backend, max_rel_err=err, seconds=seconds, hf_eager_seconds=eager_s))
    return rows


def _main(args) -> int:
    rows = run_demo(args.model, args.batch, args.seq_len, args.repeats, args.backend)
    bad = [r for r in rows if r["max_rel_err"] > 1e-4]
    if bad:
        print(f"parity FAILED for {[r['backend'] for r in bad]}")
        return 1
    print("parity OK")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="demo-switch-encoder", help="registered name, folder or cached hub id")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backend", action="append", help="tessera backend(s) to run (default: the device's)")


def add_commands(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="run a MoE model on tessera's kernels: parity and speed vs HF")
    add_arguments(parser)
    parser.set_defaults(func=_main)
