"""The bundle: a directory with manifest.json and the files it lists, each with its sha256.

    bundle/
      manifest.json
      extractor/  vision.onnx(.data) embed.onnx(.data) decoder.onnx(.data) image_newline.npy tokenizer files
      reasoner/   decoder.onnx(.data) tokenizer files

The manifest says, per model (role), its family, graphs (file, inputs, outputs, quantization), KV
layout, preprocessing parameters, tokenizer directory, generation defaults and source; the stages
map plan/extract/think to roles. `load` refuses any bundle whose format version, files or
checksums do not match, with one line saying which.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from edgevlm.errors import EdgeVLMError

FORMAT = "edgevlm-bundle"
FORMAT_VERSION = 2  # 2: fused decoders take their lengths from the position ids, not an attention_mask
MANIFEST = "manifest.json"


class BundleError(EdgeVLMError):
    """A bundle is missing, unreadable, of another format version, or altered."""


@dataclass
class Bundle:
    path: Path
    manifest: dict

    @property
    def models(self) -> dict[str, dict]:
        return self.manifest["models"]

    @property
    def stages(self) -> dict[str, str]:
        return self.manifest["stages"]

    def file(self, relpath: str) -> Path:
        return self.path / relpath


def sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def load(path: str | os.PathLike, *, verify: bool = True) -> Bundle:
    """Read and check a bundle: format, version, every listed file's presence, size and (verify) sha256."""
    root = Path(path)
    if not root.is_dir():
        raise BundleError(f"{root}: no such bundle directory")
    manifest_path = root / MANIFEST
    if not manifest_path.exists():
        raise BundleError(f"{root} is not an edgevlm bundle (no {MANIFEST}); make one with `edgevlm export`")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as e:
        raise BundleError(f"{manifest_path} is unreadable: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{manifest_path} is not an edgevlm bundle manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        from edgevlm import __version__

        raise BundleError(f"{root} has bundle format version {version}; edgevlm {__version__} reads version "
                          f"{FORMAT_VERSION}: re-export it with this edgevlm, or use the edgevlm that made it")
    for rel, meta in manifest.get("files", {}).items():
        f = root / rel
        if not f.is_file():
            raise BundleError(f"{root}: {rel} is missing; the bundle is incomplete, re-export it")
        if f.stat().st_size != meta["bytes"]:
            raise BundleError(f"{root}: {rel} has {f.stat().st_size} bytes, the manifest says {meta['bytes']}; "
                              "the bundle is damaged, re-export it")
        if verify and sha256(f) != meta["sha256"]:
            raise BundleError(f"{root}: {rel} does not match its sha256 in the manifest; the bundle is damaged "
                              "or was altered, re-export it")
    return Bundle(root, manifest)


def file_table(root: Path) -> dict[str, dict]:
    """sha256 and size of every file under root except the manifest, keyed by relative path."""
    table = {}
    for f in sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST):
        table[f.relative_to(root).as_posix()] = {"sha256": sha256(f), "bytes": f.stat().st_size}
    return table


def graph_bytes(path: str | Path) -> int:
    """A graph's size on disk, its external weights (`.data`) included."""
    return sum(os.path.getsize(p) for p in (path, f"{path}.data") if os.path.exists(p))


@contextmanager
def atomic_file(path: str | Path):
    """Yield a temporary path beside `path`; once written, it replaces `path` in one rename, so a reader
    never sees a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_directory(out: Path, *, overwrite: bool = False):
    """Yield a temporary directory beside `out`; on success it replaces `out` in one rename.

    An interrupted or failed write leaves only a hidden temp directory (removed here when possible),
    never a partial bundle at `out`. One left by a killed writer (its pid is in the name) is removed by
    the next write to the same `out`, once that process is gone: exports are gigabytes.
    """
    out = Path(out)
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise EdgeVLMError(f"{out} exists; choose another --out or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_stale(out: Path) -> None:
    """Delete `.NAME.partial-PID-*` / `.NAME.old-PID` siblings of `out` whose writer process no longer runs."""
    for path in out.parent.glob(f".{glob.escape(out.name)}.*"):
        m = re.fullmatch(rf"\.{re.escape(out.name)}\.(?:partial|old)-(\d+)(?:-.*)?", path.name)
        if m and path.is_dir() and not _alive(int(m.group(1))):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill there terminates: never probe, keep the directory
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's) or cannot tell: keep it
    return True


def write_manifest(root: Path, manifest: dict, progress: Callable[[str], None] | None = None) -> dict:
    """Add format fields and the file table, then write manifest.json (last: a bundle without one never loads)."""
    if progress:
        progress("hashing files")
    full = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest, "files": file_table(root)}
    (root / MANIFEST).write_text(json.dumps(full, indent=2) + "\n")
    return full
