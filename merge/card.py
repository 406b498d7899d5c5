"""The merged model's card (README.md): what was merged, how, and how large the result is.

Written in place of the base's README, which describes a different model."""
from __future__ import annotations

import json


def model_card(manifest: dict, spec) -> str:
    size = manifest["size"]
    groups = [len(b["groups"]) for b in manifest["blocks"] if b["name"] != "task_specific"]
    shared = sum(g == 1 for g in groups)
    lines = [
        "---",
        "tags: [merge, tessera, flexmerge]",
        "---",
        f"# {manifest['method']} merge of {len(manifest['tasks'])} fine-tuned models",
        "",
        f"Made with `tessera merge` (FlexMerge) from the base model `{spec.base}` and these fine-tuned models:",
        "",
        "| task | checkpoint | weight |",
        "|---|---|---|",
    ]
    for task in manifest["tasks"]:
        weight = spec.weights.get(task, 1.0)
        lines.append(f"| {task} | `{spec.models[task]}` | {weight} |")
    lines += [
        "",
        f"- **Method:** `{manifest['method']}` with parameters `{json.dumps(manifest['params'], sort_keys=True, default=str)}`",
        f"- **Size:** {size['bytes']:,} bytes, {size['multiplier']:.3f}× the base's {size['base_bytes']:,} bytes "
        f"(plan state {size['state']} of {size['states'] - 1})"
        + (f", plus {size['task_specific_bytes']:,} bytes of task-specific tensors" if size.get("task_specific_bytes") else ""),
        f"- **Blocks:** {len(groups)}, of which {shared} are one merged block shared by every task and "
        f"{len(groups) - shared} keep 2 to {max(groups) if groups else 1} groups of tasks",
        f"- **Base hash:** `{manifest['hashes']['base']}`",
        "",
        "Load one task's model with `engine.load(\"<this folder>\", task=\"<task>\")`, or write it as a plain "
        "checkpoint with `tessera export <this folder> --task <task> --out <dir>`. `manifest.json` lists every "
        "block's groups; `plan.json` has the merge order and the size of every state.",
        "",
    ]
    return "\n".join(lines)
