"""Corrupt or mismatched checkpoints give clear errors that name the tensor and file, and write nothing."""
from __future__ import annotations

import json
import os

import pytest
import torch
from merge_helpers import build, make_family, rewrite, spec

from engine.cli import main
from merge.artifact import export, load_task_model
from merge.config import load_spec
from merge.flexmerge import run

TENSOR = "bert.encoder.layer.0.attention.self.query.weight"


def assert_nothing_written(out):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t: t.pop(TENSOR), f"lacks tensor {TENSOR}"),
        (lambda t: t[TENSOR].__setitem__((0, 0), float("nan")), f"tensor {TENSOR} has non-finite values"),
        (lambda t: t.__setitem__(TENSOR, t[TENSOR].to(torch.int32)), f"tensor {TENSOR} is torch.int32"),
    ],
)
def test_mismatched_or_corrupt_model_is_named(tmp_path, change, message):
    base, models = make_family(tmp_path, "bert")
    rewrite(models["b"], change)
    bad = models["b"] / "model.safetensors"
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=message) as err:
        run(spec(base, models, out, size=2))
    assert str(models["b"]) in str(err.value) or str(bad) in str(err.value)
    assert_nothing_written(out)


def test_truncated_file(tmp_path):
    base, models = make_family(tmp_path, "bert")
    path = models["a"] / "model.safetensors"
    os.truncate(path, path.stat().st_size - 100)
    with pytest.raises(ValueError, match=f"{path}: truncated"):
        run(spec(base, models, tmp_path / "out"))
    assert_nothing_written(tmp_path / "out")


def test_different_architecture_and_different_base(tmp_path):
    base, models = make_family(tmp_path, "bert")
    cfg = json.loads((models["c"] / "config.json").read_text())
    cfg["architectures"] = ["BertForMaskedLM"]
    (models["c"] / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=f"{models['c']}/config.json: architectures"):
        run(spec(base, models, tmp_path / "out"))

    base2, models2 = make_family(tmp_path / "other", "bert")
    build("bert", seed=99).save_pretrained(models2["a"])  # not a fine-tune of base2: an unrelated init
    with pytest.raises(ValueError, match=f"model 'a' \\({models2['a']}\\).*does not look fine-tuned"):
        run(spec(base2, models2, tmp_path / "out"))
    with pytest.raises(ValueError, match="expected deadbeef"):
        run(spec(base, {"a": models["a"], "b": models["b"]}, tmp_path / "out", base_hash="deadbeef"))
    assert_nothing_written(tmp_path / "out")


def test_existing_output_is_not_replaced_without_overwrite(tmp_path):
    base, models = make_family(tmp_path, "bert")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="already exists"):
        run(spec(base, models, out))
    assert (out / "keep.txt").read_text() == "mine"
    run(spec(base, models, out, overwrite=True))
    assert not (out / "keep.txt").exists() and (out / "manifest.json").exists()


def test_artifact_errors(tmp_path):
    base, models = make_family(tmp_path, "bert")
    out = tmp_path / "out"
    run(spec(base, models, out, size=2))
    with pytest.raises(KeyError, match="task 'zzz' is not in artifact"):
        load_task_model(out, "zzz")
    with pytest.raises(FileNotFoundError, match="not a FlexMerge artifact"):
        load_task_model(base, "a")
    rewrite(out, lambda t: t[next(iter(t))].mul_(2))
    with pytest.raises(ValueError, match="do not match the hash"):
        export(out, "a", tmp_path / "exp")
    assert_nothing_written(tmp_path / "exp")


def test_config_errors_and_cli_exit_code(tmp_path, capsys):
    base, models = make_family(tmp_path, "bert")
    with pytest.raises(ValueError, match="unknown config key"):
        cfg = tmp_path / "c.yaml"
        cfg.write_text(f"base: {base}\nmodels: {{a: {models['a']}, b: {models['b']}}}\nmethd: ties\n")
        load_spec(str(cfg))
    with pytest.raises(ValueError, match="at least two"):
        load_spec(None, {"base": str(base), "models": {"a": str(models["a"])}})
    with pytest.raises(FileNotFoundError, match="checkpoint folder not found"):
        run(spec(base, {"a": models["a"], "b": tmp_path / "missing"}, tmp_path / "out"))
    with pytest.raises(ValueError, match="no parameter"):
        run(spec(base, models, tmp_path / "out", method="ties", params={"densty": 0.3}))
    with pytest.raises(ValueError, match=r"params.weight names unknown task\(s\) \['zz'\]"):
        run(spec(base, models, tmp_path / "out", params={"weight": {"zz": 2.0}}))
    with pytest.raises(ValueError, match="smallest reachable"):
        run(spec(base, models, tmp_path / "out", method="emr", size=1))
    code = main(["merge", "--base", str(base), "--model", f"a={models['a']}", "--model", f"b={models['b']}",
                 "--method", "nope", "--out", str(tmp_path / "out")])
    assert code == 2
    assert "unknown merge method 'nope'" in capsys.readouterr().err
    assert_nothing_written(tmp_path / "out")
