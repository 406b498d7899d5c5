"""tessera's top-level import names belong to tessera alone: another installed distribution with the same name
would hide ours or be hidden by it (transformers 5.25 began to require Hugging Face's `kernels`, which is why
the Triton kernels are `tessera_kernels`)."""
import importlib.metadata
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_no_other_installed_distribution_has_our_top_level_names():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    ours = [pattern.rstrip("*") for pattern in project["tool"]["setuptools"]["packages"]["find"]["include"]]
    providers = importlib.metadata.packages_distributions()
    clashes = {name: sorted(set(providers[name]) - {project["project"]["name"]})
               for name in ours if set(providers.get(name, ())) - {project["project"]["name"]}}
    assert ours and not clashes, f"installed distributions that also provide these import names: {clashes}"
