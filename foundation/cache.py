"""tessera's cache folder (tiny models, upcycled models, embeddings), set by `TESSERA_CACHE`."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from foundation.atomic import atomic_folder


def cache_dir(*parts: str) -> Path:
    """`$TESSERA_CACHE/parts...`, by default under `~/.cache/tessera`."""
    root = os.environ.get("TESSERA_CACHE") or Path.home() / ".cache" / "tessera"
    return Path(root).joinpath(*parts)


def build_once(folder: Path, write: Callable[[Path], None]) -> Path:
    """`folder`, written by `write(tmp)` the first time. Folders appear only by rename, so one that exists is
    complete; when two processes race, the first rename wins and the other's copy is dropped."""
    if not folder.is_dir():
        with atomic_folder(folder, exist_ok=True) as tmp:
            write(tmp)
    return folder


def save_model(model, folder: Path) -> None:
    """`model.save_pretrained(folder)` on every process: under a process group transformers writes only on rank
    0, which would leave the other ranks' cache folders without weights (each rank builds its own copy)."""
    model.should_save_on_this_rank = lambda is_main_process: True
    try:
        model.save_pretrained(folder)
    finally:
        del model.should_save_on_this_rank
