"""`tessera merge CONFIG.yaml [flags]` and `tessera export ARTIFACT --task NAME --out DIR`."""
from __future__ import annotations

import argparse
import json


def _kv(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    import yaml

    key, value = text.split("=", 1)
    return key, yaml.safe_load(value)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def cmd_merge(args) -> int:
    from merge import flexmerge
    from merge.config import load_spec

    overrides = {
        "base": args.base, "method": args.method, "size": args.size, "blocks": args.blocks, "out": args.out,
        "similarity": args.similarity, "device": args.device, "dtype": args.dtype, "plan": args.plan,
        "overwrite": args.overwrite or None, "max_shard_size": args.max_shard_size, "tokenizer_source": args.tokenizer_source,
        "rng": args.rng,
        "models": dict(args.model) if args.model else None, "params": dict(args.param) if args.param else None,
    }
    spec = load_spec(args.config, overrides)
    if args.dry_run:
        report = flexmerge.dry_run(spec)
        if args.json:
            print(json.dumps(report, indent=1))
            return 0
        print(f"tasks ({len(report['tasks'])}): {', '.join(report['tasks'])}")
        print(f"method: {report['method']} {report['params']}")
        print(f"{'block':<48} {'tensors':>7} {'size':>12}")
        for b in report["blocks"]:
            print(f"{b['name']:<48} {b['tensors']:>7} {_fmt_bytes(b['bytes']):>12}")
        s = report["sizes"]
        print(f"base model: {_fmt_bytes(report['base_bytes'])}; sizes reachable: {s['min_parameter_only']}x to {s['max']}x "
              f"in {s['steps']} steps of at least {s['smallest_step']:.4f}x (methods with masks/scales add their modulators)")
        print(f"expected peak memory ~{_fmt_bytes(report['expected_peak_memory_bytes'])}, "
              f"time ~{report['expected_seconds']} s ({report['passes']} streaming pass(es), rough estimate)")
        return 0
    report = flexmerge.run(spec)
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"merged {len(report['tasks'])} tasks with {report['method']} in {report['seconds']} s "
          f"(peak memory {_fmt_bytes(report['peak_rss_bytes'])})")
    if "size" in report:
        size = report["size"]
        print(f"artifact: {report['out']}  size {size['multiplier']:.3f}x = {_fmt_bytes(size['bytes'])} "
              f"(base {_fmt_bytes(size['base_bytes'])}); plan state {size['state']} of {size['states'] - 1}")
        groups = report["groups_per_block"]
        print(f"groups per block: min {min(groups)}, max {max(groups)}, blocks kept apart: {sum(g > 1 for g in groups)}/{len(groups)}")
    else:
        print(f"size curve: {report['states']} states; size -> mean relative task-vector error:")
        curve = report["curve"]
        stride = max(1, len(curve) // 12)
        for size, err in curve[::stride] + ([curve[-1]] if (len(curve) - 1) % stride else []):
            print(f"  {size:8.3f}x  {err:.4f}")
        if report["out"]:
            print(f"plan and curve: {report['out']}/plan.json")
    return 0


def cmd_export(args) -> int:
    from merge.artifact import export

    out = export(args.artifact, args.task, args.out, overwrite=args.overwrite)
    print(f"exported task {args.task!r} of {args.artifact} to {out}")
    return 0


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("merge", help="FlexMerge fine-tuned checkpoints into an artifact of any size",
                              description="Merge M fine-tuned checkpoints of one base into an artifact of size 1x..Mx.")
    p.add_argument("config", nargs="?", help="YAML config (base, models, method, params, size, blocks, out), or a mergekit config")
    p.add_argument("--base", help="pretrained checkpoint folder")
    p.add_argument("--model", action="append", type=_kv, metavar="TASK=DIR", help="a fine-tuned model (repeatable)")
    p.add_argument("--method", help="merge algorithm, e.g. task_arithmetic, ties, dare_ties, emr, tsv_m")
    p.add_argument("--param", action="append", type=_kv, metavar="KEY=VALUE", help="algorithm parameter (repeatable)")
    p.add_argument("--size", help="multiplier (2.25), byte budget (800MB), 'min' (everything merged) or 'all' (the whole size curve)")
    p.add_argument("--blocks", help="block layout: auto, clip, vit, bert, t5, llama, mistral, qwen")
    p.add_argument("--similarity", choices=["cosine", "euclidean", "sign"])
    p.add_argument("--out", help="artifact folder (written atomically)")
    p.add_argument("--device", help="where the algebra runs: cpu (default) or cuda")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16", "float64"], help="output dtype (default: the base's)")
    p.add_argument("--plan", help="replay a plan.json written by an earlier merge")
    p.add_argument("--tokenizer-source", help="vocabularies that differ: base, union, or a model's task name (mergekit's)")
    p.add_argument("--rng", choices=["tessera", "mergekit"],
                   help="random drops (dare_*, della*): tessera's per-task generators, or mergekit's stream for `--param seed=N` "
                        "(equals mergekit-yaml --random-seed N)")
    p.add_argument("--max-shard-size", help="largest output shard, e.g. 2GiB")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--dry-run", action="store_true", help="print blocks, reachable sizes, memory and time; read no weights")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_merge)

    e = subparsers.add_parser("export", help="write one task of a FlexMerge artifact as a standard HF checkpoint")
    e.add_argument("artifact")
    e.add_argument("--task", required=True)
    e.add_argument("--out", required=True)
    e.add_argument("--overwrite", action="store_true")
    e.set_defaults(func=cmd_export)


def main(argv: list[str] | None = None) -> int:
    """`python -m merge.cli merge|export ...`: the same commands without the rest of the `tessera` CLI."""
    import sys

    parser = argparse.ArgumentParser(prog="python -m merge.cli")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, KeyError, RuntimeError) as err:
        print(f"{parser.prog} {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
