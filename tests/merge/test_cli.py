"""`tessera merge CONFIG.yaml` and `tessera export` through the engine's CLI dispatcher."""
from __future__ import annotations

import json

import pytest
import torch
import yaml
from merge_helpers import make_family
from safetensors.torch import load_file, save_file

from engine.cli import main


@pytest.fixture
def config(tmp_path):
    base, models = make_family(tmp_path / "ckpt", "llama", tasks=("a", "b", "c", "d"))
    cfg = {
        "base": "ckpt/base",  # relative to the YAML file
        "models": {t: f"ckpt/{t}" for t in models} | {"d": {"path": "ckpt/d", "weight": 0.5}},
        "method": "ties",
        "params": {"density": 0.5, "lambda": 1.0},
        "size": 2.25,
        "blocks": "llama",
        "out": "merged",
    }
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def manifest(folder):
    return json.loads((folder / "manifest.json").read_text())


@pytest.mark.parametrize("size", ["1", "2.25", "3.5x", "4"])
def test_merge_produces_any_requested_size(config, size, capsys):
    out = config.parent / f"out-{size}"
    assert main(["merge", str(config), "--size", size, "--out", str(out)]) == 0
    m = manifest(out)
    target = float(size.rstrip("x"))
    assert m["size"]["multiplier"] <= target
    assert m["params"]["density"] == 0.5 and m["method"] == "ties"
    assert "artifact:" in capsys.readouterr().out
    if target == 4:
        assert m["size"]["state"] == 0
    if target == 1:
        assert all(len(b["groups"]) == 1 for b in m["blocks"])


def test_min_size_merges_every_block_even_with_modulators(config):
    cfg = yaml.safe_load(config.read_text())
    cfg.update(method="emr", params={}, size="min")
    config.write_text(yaml.safe_dump(cfg))
    assert main(["merge", str(config)]) == 0
    m = manifest(config.parent / "merged")
    assert all(len(b["groups"]) == 1 and b["groups"][0]["kind"] == "modulated" for b in m["blocks"])
    assert m["size"]["state"] == m["size"]["states"] - 1 and m["size"]["multiplier"] > 2


def test_config_relative_paths_byte_budget_and_flags_override(config):
    assert main(["merge", str(config), "--size", "50KB", "--method", "dare_ties", "--param", "seed=3"]) == 0
    m = manifest(config.parent / "merged")
    assert m["method"] == "dare_ties" and m["size"]["bytes"] <= 50_000 and m["params"]["seed"] == 3


def test_dry_run_reads_no_weights(config, capsys):
    # Values are poisoned but headers are intact: a dry run must not notice.
    path = config.parent / "ckpt" / "a" / "model.safetensors"
    tensors = load_file(path)
    for t in tensors.values():
        t.fill_(float("nan"))
    save_file(tensors, path)
    assert main(["merge", str(config), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "model.layers.0.attn" in out and "sizes reachable: 1.0x to 4.0x" in out and "expected peak memory" in out
    assert not (config.parent / "merged").exists()
    assert main(["merge", str(config), "--dry-run", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["sizes"]["steps"] == len(report["blocks"]) * 3


def test_size_all_writes_a_replayable_plan(config, capsys):
    assert main(["merge", str(config), "--size", "all", "--out", str(config.parent / "curve")]) == 0
    assert "size curve" in capsys.readouterr().out
    plan = json.loads((config.parent / "curve" / "plan.json").read_text())
    curve = plan["curve"]
    assert curve[0]["size"] == pytest.approx(4.0) and curve[-1]["size"] == pytest.approx(1.0)
    assert curve[0]["mean_relative_error"] == 0.0 and curve[-1]["mean_relative_error"] > 0
    assert len(plan["steps"]) == len(plan["blocks"]) * 3

    assert main(["merge", str(config), "--out", str(config.parent / "fresh")]) == 0
    assert main(["merge", str(config), "--plan", str(config.parent / "curve" / "plan.json"),
                 "--out", str(config.parent / "replayed")]) == 0
    fresh, replayed = manifest(config.parent / "fresh"), manifest(config.parent / "replayed")
    assert fresh["blocks"] == replayed["blocks"] and fresh["size"] == replayed["size"]


def test_similarity_options_and_global_scope(config):
    for sim in ("euclidean", "sign"):
        assert main(["merge", str(config), "--similarity", sim, "--out", str(config.parent / sim)]) == 0
    assert main(["merge", str(config), "--param", "scope=global", "--size", "all"]) == 0


def test_export_command(config, capsys):
    assert main(["merge", str(config)]) == 0
    out = config.parent / "exported"
    assert main(["export", str(config.parent / "merged"), "--task", "b", "--out", str(out)]) == 0
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 64)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_device_cuda_without_gpu_is_a_clear_error(config, capsys):
    assert main(["merge", str(config), "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


@pytest.mark.cuda
def test_device_cuda_matches_cpu(config):
    assert main(["merge", str(config), "--out", str(config.parent / "cpu")]) == 0
    assert main(["merge", str(config), "--device", "cuda", "--out", str(config.parent / "gpu")]) == 0
    cpu, gpu = load_file(config.parent / "cpu" / "model.safetensors"), load_file(config.parent / "gpu" / "model.safetensors")
    for n, t in cpu.items():
        torch.testing.assert_close(gpu[n], t, atol=1e-5, rtol=1e-4)


def test_size_curve_linear_fast_path_equals_generic_path(config):
    """The batched path of linear methods (errors from the Gram matrix) matches per-group merging."""
    cfg = yaml.safe_load(config.read_text())
    cfg.update(method="task_arithmetic", params={"lambda": 0.5})
    config.write_text(yaml.safe_dump(cfg))
    curves = []
    for dare in (None, 1.0):  # `dare: 1.0` keeps every entry but forces the generic per-group path
        extra = ["--param", f"dare={dare}"] if dare else []
        out = config.parent / f"curve-{dare}"
        assert main(["merge", str(config), "--size", "all", "--out", str(out), *extra]) == 0
        curves.append([p["mean_relative_error"] for p in json.loads((out / "plan.json").read_text())["curve"]])
    assert curves[0] == pytest.approx(curves[1], rel=1e-4, abs=1e-6)
