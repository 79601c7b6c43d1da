"""A Hugging Face hub cache built by hand, as ``snapshot_download`` lays it out, for offline tests.

``$HF_HOME/hub/models--ORG--NAME/snapshots/<sha>/`` holds the files and ``refs/<branch>`` the sha.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path


def fake_sha(label: str) -> str:
    return hashlib.sha1(label.encode()).hexdigest()  # 40 hex digits, like a commit id


def add_to_hub_cache(hf_home: Path, repo_id: str, checkpoint: Path, revision: str = "main") -> str:
    """Copies ``checkpoint``'s files into the cache as ``repo_id`` at branch ``revision``; returns the sha."""
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    sha = fake_sha(f"{repo_id}@{revision}")
    snapshot = repo / "snapshots" / sha
    snapshot.mkdir(parents=True, exist_ok=True)
    for path in checkpoint.iterdir():
        if path.is_file():
            shutil.copy2(path, snapshot / path.name)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(sha)
    return sha
