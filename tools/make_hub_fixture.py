#!/usr/bin/env python
"""Build a fake Hugging Face cache, in the hub's real layout, from local folders (the tests' tiny pipelines).

    python tools/make_hub_fixture.py CACHE_DIR      # ditfa-test/flux-tiny and ditfa-test/sd3-tiny, then
    HF_HUB_OFFLINE=1 HF_HUB_CACHE=CACHE_DIR ditfa generate ditfa-test/flux-tiny --prompt "a fox" --steps 2

Layout (as huggingface_hub writes it; nothing is downloaded):

    CACHE_DIR/models--ORG--NAME/blobs/<hash>                      file contents (sha256 for weights, git sha1 else)
    CACHE_DIR/models--ORG--NAME/snapshots/<commit>/<path>         relative symlinks to the blobs (or copies)
    CACHE_DIR/models--ORG--NAME/refs/<revision>                   the commit, one per revision

Tests call `make_hub_cache` at test time into a temporary folder; no copy of the weights is committed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY_REPOS = {"ditfa-test/flux-tiny": ROOT / "tests/fixtures/pipelines/flux_tiny",
              "ditfa-test/sd3-tiny": ROOT / "tests/fixtures/pipelines/sd3_tiny"}
NOT_IN_REPO = ("reference.npz",)  # the fixtures' test data, not part of a model repository


def _blob_name(path: Path) -> str:
    """The hub's blob names: the sha256 of an LFS file (weights), the git blob sha1 of a regular one."""
    data = path.read_bytes()
    if path.suffix in (".safetensors", ".model"):
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def make_hub_cache(cache: str | Path, repo_id: str, folder: str | Path, *, revisions: tuple[str, ...] = ("main",),
                   skip: tuple[str, ...] = (), symlinks: bool = True) -> Path:
    """Put `folder`'s files into `cache` as the snapshot of `repo_id` that `revisions` point at; returns the
    snapshot folder. `skip`: relative paths left out (a partial download). The commit is a hash of the contents."""
    cache, folder = Path(cache), Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in NOT_IN_REPO
                   and p.relative_to(folder).as_posix() not in skip)
    blobs = {p.relative_to(folder).as_posix(): _blob_name(p) for p in files}
    commit = hashlib.sha1("".join(f"{k}\0{v}\n" for k, v in sorted(blobs.items())).encode()).hexdigest()
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    for src in files:
        rel = src.relative_to(folder).as_posix()
        blob = repo / "blobs" / blobs[rel]
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            shutil.copyfile(src, blob)
        target = snapshot / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if symlinks:
            target.symlink_to(os.path.relpath(blob, target.parent))
        else:
            shutil.copyfile(src, target)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    for revision in revisions:
        ref = repo / "refs" / revision
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(commit)  # no newline, as the hub writes it
    return snapshot


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    for repo_id, folder in TINY_REPOS.items():
        print(f"{repo_id} -> {make_hub_cache(argv[0], repo_id, folder)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
