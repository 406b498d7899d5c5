"""Fixtures shared by the merge tests; the checkpoints they write come from merge_helpers."""
import pytest

from merge_helpers import make_family


@pytest.fixture
def family(tmp_path):
    return make_family(tmp_path)
