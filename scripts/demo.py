"""The Quickstart's main job: a MoE model from the registry on tessera's kernels, parity and speed vs HF."""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.demo import _main, add_arguments  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    sys.exit(_main(parser.parse_args()))
