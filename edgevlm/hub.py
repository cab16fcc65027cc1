"""Finding a model: a local path, or a hub id resolved through the local HF cache (downloading only when
the hub is reachable and allowed), and where edgevlm keeps what it derives from them. Converting what
transformers cannot read as is (LLaVA-NeXT checkpoints, GGUF files, LoRA adapters) is the export side's
job: edgevlm.export.checkpoints.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from pathlib import Path

from edgevlm.errors import ModelError, first_line

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What a model directory needs; never pickles, GGUF or ONNX folders.
_ALLOW = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"]
OFFLINE_HINT = (
    "offline options: local model directories (--extractor DIR --reasoner DIR; `edgevlm make-tiny` builds "
    "test models), or download once with HF_HUB_OFFLINE unset"
)


def cache_dir() -> Path:
    """Where edgevlm keeps what it derives from downloads (converted checkpoints)."""
    base = os.environ.get("EDGEVLM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "edgevlm"
    )
    return Path(base)


def source_key(*paths: str | os.PathLike) -> str:
    """A short digest naming the present version of the files at `paths` (of a directory: the files in it),
    the key of what edgevlm derives from them (converted checkpoints, imported GGUF files, merged adapters).

    It digests each file's name, size, mtime_ns, ctime_ns and inode, not its bytes: sha256 runs at 1.6 GB/s
    on this project's machine before any disk read, seconds on every run for a 1-8 GB checkpoint, while
    any write to a file moves its mtime and its ctime (the kernel's, which cp -p, rsync -t or tar, setting
    mtime back, cannot), and a file replaced by another has another inode. So a checkpoint retrained in
    place gets a fresh conversion; the price is that a touch, chmod or copy of a source converts it again.
    """
    digest = hashlib.sha256()
    for path in map(Path, paths):
        files = sorted(p for p in path.iterdir() if not p.name.startswith(".")) if path.is_dir() else [path]
        for f in files:
            try:
                st = f.stat()
            except OSError:  # a dangling link: nothing to convert
                continue
            if stat.S_ISREG(st.st_mode):
                digest.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0{st.st_ino}\n".encode())
        digest.update(b"\1")
    return digest.hexdigest()[:16]


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def find(model: str) -> Path:
    """The local path of `model`: a directory or file as given, or a hub id's snapshot from the local HF cache
    (downloaded when the hub is reachable and allowed); else a one-line ModelError. Nothing is converted here:
    GGUF files, LoRA adapters and LLaVA-NeXT checkpoints become transformers checkpoints on the export side
    (edgevlm.export.checkpoints)."""
    path = Path(model).expanduser()
    if path.exists():
        return path
    if not _HUB_ID.match(model):
        raise ModelError(f"{model}: no such model directory, and not a hub id (owner/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(model, allow_patterns=_ALLOW, local_files_only=_offline()))
    except RepositoryNotFoundError:
        raise ModelError(f"{model} is not on the hub (or is private); check the id") from None
    except LocalEntryNotFoundError:
        why = "the hub is offline (HF_HUB_OFFLINE=1)" if _offline() else "the hub cannot be reached"
        raise ModelError(f"{model} is not in the local cache and {why}; {OFFLINE_HINT}") from None
    except (HfHubHTTPError, OSError) as e:
        first = first_line(e)
        raise ModelError(f"cannot download {model}: {first}; {OFFLINE_HINT}") from None
