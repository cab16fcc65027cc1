"""The bundle: a directory with manifest.json and the files it lists, each with its sha256.

    bundle/
      manifest.json
      extractor/  vision.onnx(.data) embed.onnx(.data) decoder.onnx(.data) image_newline.npy tokenizer files
      reasoner/   decoder.onnx(.data) tokenizer files

The manifest says, per model (role), its family, graphs (file, inputs, outputs, quantization), KV
layout, preprocessing parameters, tokenizer directory, generation defaults and source; the stages
map plan/extract/think to roles. `load` refuses, with one line naming the field or file, a manifest that
breaks bundle.schema.json (edgevlm.manifest), and any bundle whose format version, files or checksums do not
match, that names a path leaving the bundle, or whose folders hold a file its table does not list.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import stat
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from edgevlm.calibration.metrics import report_table
from edgevlm.errors import EdgeVLMError, UsageError, first_line
from edgevlm.manifest import FORMAT, FORMAT_VERSION, Manifest, ModelSpec, is_relpath, named_paths, problem

MANIFEST = "manifest.json"


def _int8_compute_line(check: Mapping) -> str:
    """How an int8 graph computes, from its export check (quantization.int8_compute_checks)."""
    score = ", ".join(f"{k} {v}" for k, v in check.items() if k in ("mean_kl", "top1_agreement", "cosine"))
    if not check.get("compute"):
        return f"int8 weight-only (int8 compute missed the export check: {score})"
    if _full_range(check):
        return ("int8 compute on full-range int8 weights, which CPUs without VNNI (AVX2) compute inexactly: "
                "re-export this bundle to run it there")
    return f"int8 compute, {check['weights']} weights, weight-only: {check.get('weight_only', 'none')} ({score})"


def _full_range(check: Mapping) -> bool:
    """An int8-compute graph exported before the weight formats (2026-12-04): full-range int8 weights."""
    return bool(check.get("compute")) and "weights" not in check


def full_range_int8(quantization: Mapping | None) -> list[str]:
    """The graphs ("extractor vision", ...) that compute int8 on full-range int8 weights, which ONNX Runtime's
    kernel on CPUs without VNNI sums inexactly (export/int8_compute.py): a bundle to re-export for them."""
    checks = (quantization or {}).get("int8_compute_checks") or {}  # its shape checked at load (bundle.schema.json)
    return [f"{role} {graph}" for role, graphs in checks.items() for graph, check in graphs.items()
            if _full_range(check)]


class BundleError(EdgeVLMError):
    """A bundle is missing, unreadable, of another format version, or altered."""


@dataclass
class Bundle:
    """A bundle's folder and manifest. Open its files through `file` and `dir` only: they refuse any path
    that leaves the bundle or that the manifest's file table does not list. A Bundle made in code without
    a table (an export in progress) has its paths confined, not listed."""

    path: Path
    manifest: Manifest

    @property
    def models(self) -> Mapping[str, ModelSpec]:
        return self.manifest.models

    @property
    def stages(self) -> Mapping[str, str]:
        return self.manifest.stages

    @classmethod
    def in_progress(cls, root: str | os.PathLike, models: Mapping[str, ModelSpec],
                    flavour: str = "onnxruntime") -> Bundle:
        """A bundle being written, before its manifest exists: its models' paths are confined, not listed."""
        return cls(Path(root), Manifest(stages={}, models=dict(models), flavour=flavour))

    @property
    def target(self) -> str | None:
        """The device it was built for (edgevlm.targets), whose memory budget it plans against by default."""
        return self.manifest.target

    @property
    def label(self) -> str:
        """Its name in tables and plots: its folder, and its decoders' precision where the name lacks it."""
        name = os.path.basename(os.path.abspath(self.path))
        quant = self.manifest.quantization or {}
        precisions = "/".join(sorted({quant[k] for k in ("extractor", "reasoner") if quant.get(k)}))
        return f"{name} ({precisions})" if precisions and precisions not in name else name

    def describe(self) -> str:
        """What `edgevlm info` prints: provenance, stages, each model with its graphs' sizes and precision, and
        the fidelity report."""
        m = self.manifest
        sizes = {rel: meta["bytes"] for rel, meta in (m.files or {}).items()}
        total = sum(sizes.values()) / 1e6
        lines = [f"bundle {self.path}  (format {FORMAT_VERSION}, {m.flavour} graphs, {total:.1f} MB, target "
                 f"{m.target}, created {m.created})"]
        versions = (m.provenance or {}).get("versions", {})
        if versions:
            lines.append("made with " + ", ".join(f"{k} {v}" for k, v in versions.items()))
        lines.append("stages: " + ", ".join(f"{stage} -> {role}" for stage, role in m.stages.items()))
        for role, spec in m.models.items():
            source, kv = spec.source or {}, spec.kv
            rev = f"@{source['revision'][:12]}" if source.get("revision") else ""
            lines.append(f"{role}: {source.get('model', '?')}{rev}  family {spec.family}, context "
                         f"{spec.max_context}, KV {kv.layers} layers x {kv.kv_heads} heads x {kv.head_dim}")
            for name, g in spec.graphs.items():
                size = sizes.get(g.file, 0) + sizes.get(g.file + ".data", 0)
                lines.append(f"  {name:<8} {g.file:<28} {size / 1e6:>9.1f} MB  {g.quant}")
            for name, check in (((m.quantization or {}).get("int8_compute_checks") or {}).get(role) or {}).items():
                lines.append(f"  {name:<8} {_int8_compute_line(check)}")
            kept = ((m.quantization or {}).get("kept_int8") or {}).get(role)
            if kept:
                q = m.quantization
                wanted = " and ".join([*([f"top-1 {q['fidelity_target']}"] if q.get("fidelity_target") else []),
                                       *([f"KL {q['fidelity_kl']}"] if q.get("fidelity_kl") else [])])
                names = ", ".join(kept) if len(kept) <= 8 else f"{len(kept)} MatMuls ({', '.join(kept[:3])}, ...)"
                lines.append(f"  kept in 8 bits for the fidelity target ({wanted}): {names}")
            offsets = ((m.quantization or {}).get("offsets") or {}).get(role)
            if offsets:
                lines.append(f"  int4 on the weights' own grid (float zero points, block sums): {len(offsets)} MatMuls")
        lines.append(report_table(m.fidelity))
        return "\n".join(lines)

    def file(self, relpath: str, field: str | None = None) -> Path:
        """The regular file at `relpath`, once it stays inside the bundle (symlinks resolved) and is listed;
        else a one-line BundleError naming the path (and `field`, the manifest field that named it)."""
        return _checked(self.path, relpath, self.manifest.files, "file", field)

    def graph(self, relpath: str, field: str | None = None) -> Path:
        """An ONNX graph, as `file`, whose folder holds only listed files: ONNX Runtime opens external data
        anywhere under the graph's folder (and refuses it outside, since 1.17), never elsewhere."""
        return _checked(self.path, relpath, self.manifest.files, "graph", field)

    def dir(self, relpath: str, field: str | None = None) -> Path:
        """The folder at `relpath`, once it stays inside the bundle and everything under it is listed: a reader
        of the folder (the tokenizer) then opens only listed files."""
        return _checked(self.path, relpath, self.manifest.files, "folder", field)


_KINDS = ((stat.S_ISREG, "a file"), (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"))


def _shown(rel) -> str:
    """A path for a one-line message: as is when printable, else JSON-quoted."""
    if isinstance(rel, str):
        return rel if rel.isprintable() else json.dumps(rel)
    return repr(rel)[:80]


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "a special file")


def _checked(root: Path, rel: str, table: dict | None, kind: str, field: str | None) -> Path:
    """root/rel after the checks of Bundle.file, .graph or .dir (`kind`: file, graph, folder)."""
    where = f"{root}: {_shown(rel)}" + (f" ({field})" if field else "")
    folder = kind == "folder"
    if not is_relpath(rel):
        raise BundleError(f"{where} is not a relative path inside the bundle ('/'-separated, no '.' or '..' "
                          "parts); the manifest was altered, re-export the bundle")
    if table is not None and not folder and rel not in table:
        raise BundleError(f"{where} is not in the manifest's file table, so it cannot be trusted; re-export the bundle")
    base = root.resolve()
    try:
        target = (base / rel).resolve()
        inside = target.is_relative_to(base)
        mode = os.stat(target).st_mode if inside else 0
    except FileNotFoundError:
        raise BundleError(f"{where} is missing; the bundle is incomplete, re-export it") from None
    except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop
        raise BundleError(f"{where} cannot be read ({first_line(e)}); re-export the bundle") from None
    if not inside:
        raise BundleError(f"{where} leads outside the bundle (to {target}); a bundle's files are its own, "
                          "re-export it")
    if not (stat.S_ISDIR(mode) if folder else stat.S_ISREG(mode)):
        raise BundleError(f"{where} is {_kind(mode)}, where a {'folder' if folder else 'regular file'} is expected; "
                          "re-export the bundle")
    if kind != "file" and table is not None:
        # The folder as named and, through a symlink, as stored: a reader may open any file under either.
        named, stored = (rel, target) if folder else (rel.rpartition("/")[0], target.parent)
        for sub in dict.fromkeys((named, "" if stored == base else stored.relative_to(base).as_posix())):
            if (extra := _unlisted(root, sub, table)) is not None:
                raise BundleError(f"{root}: {_shown(extra)} is in {sub or '.'}/, which the runtime reads, but not "
                                  "in the manifest's file table; remove it or re-export the bundle")
    return root / rel


def _unlisted(root: Path, folder: str, table: dict) -> str | None:
    """The first entry under `folder` (relative to root; "" for the bundle itself) that the table does not
    list; folders are entered, symlinks never followed, the manifest itself is exempt."""
    stack = [folder]
    while stack:
        current = stack.pop()
        try:
            with os.scandir(root / current) as scan:
                entries = sorted(scan, key=lambda e: e.name)
        except OSError as e:
            raise BundleError(f"{root}: cannot list {current or '.'}/ ({first_line(e)})") from None
        for entry in entries:
            rel = f"{current}/{entry.name}" if current else entry.name
            if rel in table or rel == MANIFEST:
                continue
            if entry.is_dir(follow_symlinks=False):
                stack.append(rel)
            else:
                return rel
    return None


def sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def load(path: str | os.PathLike, *, verify: bool = True) -> Bundle:
    """Read and check a bundle: format, version, the manifest against bundle.schema.json, every listed file's
    confinement, kind, size and (verify) sha256, and every path the models name: listed, and in folders
    that hold only listed files. Any failure is a one-line BundleError naming the field or file."""
    root = Path(path)
    if not root.is_dir():
        raise BundleError(f"{root}: no such bundle directory")
    manifest_path = root / MANIFEST
    if not manifest_path.exists():
        raise BundleError(f"{root} is not an edgevlm bundle (no {MANIFEST}); make one with `edgevlm export`")
    _checked(root, MANIFEST, None, "file", None)  # not a FIFO (reading one would hang), not a link out
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: absurdly nested JSON
        raise BundleError(f"{manifest_path} is unreadable: {first_line(e)[:200]}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{manifest_path} is not an edgevlm bundle manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        from edgevlm import __version__

        raise BundleError(f"{root} has bundle format version {version}; edgevlm {__version__} reads version "
                          f"{FORMAT_VERSION}: re-export it with this edgevlm, or use the edgevlm that made it")
    found = problem(manifest)
    if found:
        raise BundleError(f"{manifest_path}: {found}; the manifest is malformed, re-export the bundle")
    b = Bundle(root, Manifest.from_dict(manifest))
    for rel, meta in manifest["files"].items():
        f = b.file(rel)
        size = f.stat().st_size
        if size != meta["bytes"]:
            raise BundleError(f"{root}: {rel} has {size} bytes, the manifest says {meta['bytes']}; "
                              "the bundle is damaged, re-export it")
        if verify and sha256(f) != meta["sha256"]:
            raise BundleError(f"{root}: {rel} does not match its sha256 in the manifest; the bundle is damaged "
                              "or was altered, re-export it")
    for field, rel, kind in named_paths(manifest):
        _checked(root, rel, manifest["files"], kind, field)
    return b


def file_table(root: Path) -> dict[str, dict]:
    """sha256 and size of every file under root except the manifest, keyed by relative path. What `load`
    would refuse (a symlink out of root, a FIFO, a name it cannot list) is refused here, before it is written."""
    table = {}
    stack = [""]
    while stack:
        folder = stack.pop()
        with os.scandir(root / folder) as scan:
            entries = list(scan)
        for entry in entries:
            rel = f"{folder}/{entry.name}" if folder else entry.name
            if entry.is_dir(follow_symlinks=False):
                stack.append(rel)
            elif rel != MANIFEST:
                f = _checked(root, rel, None, "file", None)
                table[rel] = {"sha256": sha256(f), "bytes": f.stat().st_size}
    return dict(sorted(table.items()))


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


# Every directory edgevlm writes (models, caches, demo outputs) except a bundle, whose manifest lists its files,
# gets a marker listing the files it wrote there: edgevlm replaces a directory only when a record it wrote
# (the marker, or the manifest) lists everything in it, so a file someone put beside them is never deleted.
MARKER = ".edgevlm"
MARKER_TEXT = ("edgevlm wrote this directory and the files listed here; it may replace them (--overwrite, "
               "tune --out), and refuses to while anything else is in it.")


def write_marker(folder: str | Path) -> None:
    """Record in `folder`'s marker every file now under it (relative paths; folders entered, symlinks listed,
    never followed): what edgevlm wrote there, and so may replace."""
    folder = Path(folder)
    files, stack = [], [""]
    while stack:
        current = stack.pop()
        with os.scandir(folder / current) as scan:
            for entry in scan:
                rel = f"{current}/{entry.name}" if current else entry.name
                if entry.is_dir(follow_symlinks=False):
                    stack.append(rel)
                elif rel != MARKER:
                    files.append(rel)
    (folder / MARKER).write_text(json.dumps({"note": MARKER_TEXT, "files": sorted(files)}, indent=1) + "\n")


def written_by_edgevlm(path: str | Path) -> bool:
    """Whether edgevlm wrote everything in directory `path`, so that it may replace it: a bundle whose manifest
    lists every file in it, or a directory whose marker does (see `_foreign`)."""
    try:
        return _foreign(Path(path)) is None
    except (OSError, BundleError):
        return False


def _foreign(root: Path) -> str | None:
    """The first entry under directory `root` that no record of edgevlm's lists; None when all are listed.

    In a bundle (an edgevlm manifest) its file table lists them, and a malformed table lists nothing; elsewhere
    the marker does. A marker of the old plain-text form, or one that is not a listing, lists nothing but
    itself. Without either, nothing is edgevlm's. Folders are entered, symlinks never followed."""
    manifest = _bundle_manifest(root)
    if manifest is not None:
        table = manifest.get("files")
        return _unlisted(root, "", _files_named(root, table)) if isinstance(table, dict) else MANIFEST
    if not _is_regular(root / MARKER):
        return min(os.listdir(root), default=None)
    record = _json_file(root / MARKER)
    names = record.get("files") if isinstance(record, dict) else None
    listed = _files_named(root, names if isinstance(names, list) else []) | {MARKER}
    if MANIFEST not in listed and os.path.lexists(root / MANIFEST):  # _unlisted passes it: this is no bundle
        inside = _unlisted(root, MANIFEST, listed) if stat.S_ISDIR(_mode(root / MANIFEST)) else MANIFEST
        if inside is not None:
            return inside
    return _unlisted(root, "", listed)


def _bundle_manifest(root: Path) -> dict | None:
    """`root`'s manifest when it is an edgevlm bundle's (a regular file, its format ours); else None."""
    manifest = _json_file(root / MANIFEST)
    return manifest if isinstance(manifest, dict) and manifest.get("format") == FORMAT else None


def _files_named(root: Path, names) -> set[str]:
    """The strings in `names` that are not folders under `root`: a listed folder would pass all it holds."""
    return {name for name in names if isinstance(name, str) and not stat.S_ISDIR(_mode(root / name))}


def _mode(path: Path) -> int:
    """`path`'s mode, its symlinks not followed; 0 when there is nothing there."""
    try:
        return os.lstat(path).st_mode
    except (OSError, ValueError):  # ValueError: a NUL in the name
        return 0


def _is_regular(path: Path) -> bool:
    return stat.S_ISREG(_mode(path))


def _json_file(path: Path):
    """The JSON in `path` if it is a regular file (a FIFO would hang the read, a link may lead anywhere) of at
    most 16 MiB; else None."""
    try:
        if not _is_regular(path) or os.lstat(path).st_size > 1 << 24:
            return None
        return json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):  # RecursionError: absurdly nested JSON
        return None


def check_output(out: str | Path, *, overwrite: bool) -> None:
    """Refuse, in one line, an output directory a write must not replace: `out` may be absent or empty, or
    (with `overwrite`) a directory edgevlm wrote all of (written_by_edgevlm); else the line names the first
    entry no record of edgevlm's lists. Nothing edgevlm did not write is ever deleted."""
    out = Path(out)
    if out.is_symlink():
        raise UsageError(f"{out} is a symbolic link; give the directory itself, or another output directory")
    if not out.exists():
        return
    if not out.is_dir():
        raise UsageError(f"{out} exists and is not a directory; choose another output directory")
    try:
        empty = not any(out.iterdir())
    except OSError as e:
        raise UsageError(f"{out} cannot be read ({e.strerror}); choose another output directory") from None
    if empty:
        return
    if not overwrite:
        raise UsageError(f"{out} exists and is not empty; choose another output directory or pass --overwrite")
    try:
        foreign = _foreign(out)
    except BundleError as e:  # a folder in it cannot be listed, so what it holds cannot be known
        raise UsageError(f"{e}; choose another output directory") from None
    except OSError as e:
        raise UsageError(f"{out} cannot be read ({e.strerror}); choose another output directory") from None
    if foreign is not None:
        raise UsageError(f"{out} holds {_shown(foreign)}, which edgevlm did not write; remove it, or choose another "
                         "output directory")


def check_output_file(path: str | os.PathLike | None, option: str) -> None:
    """Refuse, in one line naming `option`, an output file that could not be written (a directory, a missing or
    read-only folder, a read-only file): checked before the work starts, not after minutes of it."""
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UsageError(f"{option} {path} is a directory; give a file name")
    if not os.path.isdir(folder):
        raise UsageError(f"{option} {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise UsageError(f"{option} {path} cannot be written (permission denied)")


@contextmanager
def atomic_directory(out: str | Path, *, overwrite: bool = False):
    """Yield a temporary directory beside `out`; on success it takes `out`'s place in one step.

    `out` may be absent or empty; one with files in it is replaced only with `overwrite`, and only if edgevlm
    wrote all of it (check_output). What is written gets a marker listing its files (unless it is a bundle,
    whose manifest lists them) and the modes a plain mkdir and open would give under the umask. On Linux the
    new directory and the old `out` swap in one call, so a reader finds one or the other, never neither;
    elsewhere the old one is renamed aside first and put back if the second rename fails or is interrupted.

    An interrupted or failed write leaves only a hidden temp directory (removed here when possible),
    never a partial bundle at `out`. One left by a killed writer (its pid is in the name) is removed by
    the next write to the same `out`, once that process is gone: exports are gigabytes.
    """
    out = Path(out)
    _remove_stale(out)
    check_output(out, overwrite=overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Named before it exists and made inside `try`: an interrupt (Ctrl-C, SIGTERM) landing right after the
    # mkdir, which tempfile.mkdtemp would not have returned yet, still finds it in `finally`.
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}-{os.urandom(6).hex()}"
    try:
        tmp.mkdir(mode=0o700)
        yield tmp
        if _bundle_manifest(tmp) is None:  # a bundle's manifest lists its files already
            write_marker(tmp)  # now, after every file exists: it lists them all
        _honour_umask(tmp)
        check_output(out, overwrite=overwrite)  # again: an export takes minutes, and `out` may have appeared
        _swap_in(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # after a swap, the old `out`


def _swap_in(new: Path, out: Path) -> None:
    """Put directory `new` at `out`. An old `out` ends up at `new`'s path, for the caller to remove."""
    if not out.exists():
        os.replace(new, out)
        return
    if _exchange(new, out):
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}-{os.urandom(4).hex()}")
    try:
        os.replace(out, old)
        os.replace(new, out)
    except BaseException:
        if old.exists() and not out.exists():
            os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap paths `a` and `b` in one call (Linux renameat2 with RENAME_EXCHANGE). False where the OS, its C
    library or the file system has no such call: the caller then renames twice."""
    import sys

    if not sys.platform.startswith("linux"):
        return False
    import ctypes
    import errno

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2  # glibc 2.28+
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):  # an old kernel; NFS, some FUSE
        return False
    raise OSError(err, os.strerror(err), str(b))


def _honour_umask(root: Path) -> None:
    """Give what was written under `root` the modes a plain mkdir and open would: mkdtemp makes 0700
    directories (and mkstemp 0600 files), which would hide a bundle from users the umask lets read it."""
    mask = _umask()
    for folder, _, files in os.walk(root):
        os.chmod(folder, 0o777 & ~mask)
        for name in files:
            path = os.path.join(folder, name)
            st = os.lstat(path)
            # a hard link shares its mode with a file outside `root`, which is not edgevlm's to change
            if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
                os.chmod(path, (0o777 if st.st_mode & 0o111 else 0o666) & ~mask)


def _umask() -> int:
    try:  # Linux 4.7+ shows it; os.umask can only read it by setting it, for every thread at once
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)  # the strictest for the moment it is set
    os.umask(mask)
    return mask


def _remove_stale(out: Path) -> None:
    """Delete `.NAME.partial-PID-*` / `.NAME.old-PID-*` siblings of `out` whose writer process no longer runs.
    An old `out` whose writer died between its two renames (no swap call) goes back in its place instead."""
    for path in sorted(out.parent.glob(f".{glob.escape(out.name)}.*")):
        m = re.fullmatch(rf"\.{re.escape(out.name)}\.(partial|old)-(\d+)(?:-.*)?", path.name)
        if not m or not path.is_dir() or _alive(int(m.group(2))):
            continue
        if m.group(1) == "old" and not out.exists() and not out.is_symlink():
            os.replace(path, out)
        else:
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


def write_manifest(root: Path, manifest: Manifest, progress: Callable[[str], None] | None = None) -> Manifest:
    """Add the file table, check the whole manifest as `load` will, then write manifest.json (last: a bundle
    without one never loads)."""
    if progress:
        progress("hashing files")
    full = replace(manifest, files=file_table(root)).to_dict()
    found = problem(full)
    if found:
        raise BundleError(f"the manifest being written is malformed: {found}")
    (root / MANIFEST).write_text(json.dumps(full, indent=2) + "\n")
    return Manifest.from_dict(full)
