"""Hub ids resolved through the local Hugging Face cache only: tessera never downloads at run time."""
from __future__ import annotations

from pathlib import Path


def resolve_hub_id(repo_id: str) -> Path:
    """The local snapshot folder of a hub model, from the Hugging Face cache only."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"model {repo_id!r} is not in the local Hugging Face cache and tessera never downloads at run time. "
            f"Fetch it first, e.g. `hf download {repo_id}` (or `huggingface-cli download {repo_id}`), "
            "or pass a local folder") from None
