"""What a sound manifest is: bundle.schema.json (shipped with the package) and the rules a schema cannot state.

Every structural check lives here, so a consumer that reads a manifest `edgevlm.bundle.load` accepted may
index it without guarding each read.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path

from edgevlm.schema import first_error, json_path

SCHEMA_FILE = Path(__file__).with_name("bundle.schema.json")


@cache
def schema() -> dict:
    return json.loads(SCHEMA_FILE.read_text())


def is_relpath(value) -> bool:
    """Whether `value` is a path a manifest may name: relative, '/'-separated, no '.' or '..' parts."""
    return isinstance(value, str) and _relpath().search(value) is not None


@cache
def _relpath() -> re.Pattern:
    return re.compile(schema()["$defs"]["relpath"]["pattern"])


def problem(manifest) -> str | None:
    """The first way `manifest` is malformed, naming the field and what was expected
    (`models.extractor.kv.head_dim: expected an integer > 0, got 0`); None when it is sound."""
    found = first_error(manifest, schema())
    if found:
        return found
    for stage, role in manifest["stages"].items():
        if role not in manifest["models"]:
            return f"stages.{stage}: names the model {json.dumps(role)}, which the manifest's models do not have"
    return None


def named_paths(manifest: dict) -> Iterator[tuple[str, str, str]]:
    """(field, path, kind) for every bundle path a (sound) manifest's models name; kind is what
    edgevlm.bundle checks it as: "graph", "file" or "folder"."""
    for role, entry in manifest["models"].items():
        for name, graph in entry["graphs"].items():
            yield json_path(("models", role, "graphs", name, "file")), graph["file"], "graph"
        yield json_path(("models", role, "tokenizer")), entry["tokenizer"], "folder"
        for name, rel in entry.get("arrays", {}).items():
            yield json_path(("models", role, "arrays", name)), rel, "file"
