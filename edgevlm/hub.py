"""Finding a model: a local directory, or a hub id resolved through the local HF cache (downloading
only when the hub is reachable and allowed). Checkpoints in the original LLaVA-NeXT format (the
paper's released extractors) are converted to transformers format on first use and cached; so are GGUF
files (dequantized) and LoRA adapters (merged into their base).
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


def resolve(model: str, gguf_file: str | None = None) -> Path:
    """A local directory for `model` (a directory, a hub id, or a .gguf file), or a one-line ModelError.

    A GGUF file (`model` ending in .gguf, or `gguf_file` inside the directory `model`) is imported into
    a transformers checkpoint on first use and cached; a LoRA adapter directory (adapter_config.json) is
    merged into the base model it names, likewise.
    """
    path = Path(model).expanduser()
    if gguf_file:
        path = (resolve(model) if not path.is_dir() else path) / gguf_file
        if not path.is_file():
            raise ModelError(f"{path}: no such GGUF file")
    if path.is_file() and path.suffix.lower() == ".gguf":
        from edgevlm.export import gguf

        return gguf.converted(path, cache_dir() / "gguf")
    if path.is_dir():
        from edgevlm.export import adapter

        return adapter.merged(path, cache_dir() / "merged") if adapter.is_adapter(path) else path
    if path.exists():
        raise ModelError(f"{model} is a file; a model is a directory (config.json, weights, tokenizer) "
                         "or a .gguf file")
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


def resolve_extractor(model: str) -> Path:
    """Like `resolve`, converting an original LLaVA-NeXT checkpoint (the paper's) on first use."""
    from edgevlm.families import read_config

    path = resolve(model)
    if read_config(path).get("model_type") != "llava_qwen3":
        return path
    from edgevlm.export import llava_next

    return llava_next.converted(path, model, cache_dir() / "converted")
