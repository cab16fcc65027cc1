"""A validator for the part of JSON Schema (draft 2020-12) that edgevlm's shipped schemas use.

    problem = first_error(manifest, schema)   # "models.extractor.kv.head_dim: expected an integer > 0, got 0"

The runtime stays free of the `jsonschema` package and its compiled dependencies; tests/test_bundle.py
checks that both agree on the bundle schema. A keyword outside the subset raises SchemaError rather than
being skipped, so a schema cannot outgrow this validator unnoticed. Two deliberate differences from
`jsonschema`: an "integer" is an int, never 1.0 (the runtime uses these as shapes), and a NaN fails every
numeric bound.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache

KEYWORDS = frozenset({"type", "enum", "const", "properties", "required", "additionalProperties", "propertyNames",
                      "items", "minItems", "maxItems", "minimum", "maximum", "exclusiveMinimum", "minLength",
                      "pattern", "$ref", "allOf", "if", "then"})
ANNOTATIONS = frozenset({"$schema", "$id", "$defs", "$comment", "title", "description", "examples", "default"})
_TYPES = {"object": "an object", "array": "an array", "string": "a string", "integer": "an integer",
          "number": "a number", "boolean": "true or false", "null": "null"}
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

Path = tuple[str | int, ...]


class SchemaError(Exception):
    """The schema itself uses something this validator does not implement (a bug in edgevlm, not in the input)."""


def first_error(instance, schema: dict | bool) -> str | None:
    """The first way `instance` breaks `schema`, as `json.path: expected ..., got ...`; None if it conforms."""
    found = find(instance, schema)
    return None if found is None else f"{json_path(found[0])}: {found[1]}"


def find(instance, schema: dict | bool) -> tuple[Path, str] | None:
    """(where, what) of the first way `instance` breaks `schema`: the path of the failing value (of the missing
    or unknown key, for those), and what was expected; None if it conforms."""
    return _Validator(schema).check(instance, schema, ())


def json_path(path: Path) -> str:
    """('models', 'extractor', 'kv') -> models.extractor.kv; odd keys quoted (files["a/b.onnx"]), items [i]."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _NAME.fullmatch(part):
            out += f".{part}" if out else part
        else:
            out += f"[{json.dumps(part[:80])}]"
    return out or "(the document)"


def show(value) -> str:
    """A value for a one-line message: short, escaped, never multi-line."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return f"an array of {len(value)}"
    if isinstance(value, str):
        return json.dumps(value if len(value) <= 60 else value[:60] + "...")
    text = json.dumps(value) if isinstance(value, bool) or value is None else repr(value)
    return text if len(text) <= 40 else text[:40] + "..."


def _is(value, kind: str) -> bool:
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, {"object": dict, "array": list, "string": str, "boolean": bool,
                              "null": type(None)}[kind])


def _equal(a, b) -> bool:
    """JSON equality: true is not 1, 1 is 1.0."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return a == b and (type(a) is type(b) or _is(a, "number") and _is(b, "number"))


@lru_cache(maxsize=64)
def _compiled(pattern: str) -> re.Pattern:
    return re.compile(pattern)


class _Validator:
    def __init__(self, root: dict | bool):
        self.root = root

    def resolve(self, ref: str) -> dict | bool:
        if not ref.startswith("#/"):
            raise SchemaError(f"only local $ref are supported, not {ref!r}")
        node = self.root
        for part in ref[2:].split("/"):
            node = node[part.replace("~1", "/").replace("~0", "~")]
        return node

    def check(self, x, s: dict | bool, path: Path) -> tuple[Path, str] | None:
        """(where, what) of the first problem, or None."""
        if s is True:
            return None
        if s is False:
            return path, "not allowed here"
        unknown = s.keys() - KEYWORDS - ANNOTATIONS
        if unknown:
            raise SchemaError(f"the schema uses {', '.join(sorted(unknown))}, which edgevlm.schema does not implement")
        if "$ref" in s and (found := self.check(x, self.resolve(s["$ref"]), path)):
            return found
        if "type" in s:
            kinds = [s["type"]] if isinstance(s["type"], str) else s["type"]
            if not any(_is(x, k) for k in kinds):
                return path, f"expected {' or '.join(_TYPES[k] for k in kinds)}, got {show(x)}"
        if "const" in s and not _equal(x, s["const"]):
            return path, f"expected {show(s['const'])}, got {show(x)}"
        if "enum" in s and not any(_equal(x, e) for e in s["enum"]):
            return path, f"expected one of {', '.join(show(e) for e in s['enum'])}, got {show(x)}"
        if _is(x, "number"):
            found = self.bounds(x, s)
            if found:
                return path, found
        if isinstance(x, str):
            if len(x) < s.get("minLength", 0):
                return path, f"expected at least {s['minLength']} characters, got {show(x)}"
            if "pattern" in s and not _compiled(s["pattern"]).search(x):
                return path, f"expected {s.get('description') or 'a string matching ' + s['pattern']}, got {show(x)}"
        if isinstance(x, list) and (found := self.array(x, s, path)):
            return found
        if isinstance(x, dict) and (found := self.object(x, s, path)):
            return found
        for sub in s.get("allOf", ()):
            if found := self.check(x, sub, path):
                return found
        if "if" in s and self.check(x, s["if"], path) is None and "then" in s:
            return self.check(x, s["then"], path)
        return None

    @staticmethod
    def bounds(x, s: dict) -> str | None:
        # `not (x >= m)` rather than `x < m`: a NaN fails every bound.
        kind = "an integer" if s.get("type") == "integer" else "a number"
        if "minimum" in s and not x >= s["minimum"]:
            return f"expected {kind} >= {s['minimum']}, got {show(x)}"
        if "exclusiveMinimum" in s and not x > s["exclusiveMinimum"]:
            return f"expected {kind} > {s['exclusiveMinimum']}, got {show(x)}"
        if "maximum" in s and not x <= s["maximum"]:
            return f"expected {kind} <= {s['maximum']}, got {show(x)}"
        return None

    def array(self, x: list, s: dict, path: Path) -> tuple[Path, str] | None:
        if len(x) < s.get("minItems", 0):
            return path, f"expected at least {s['minItems']} items, got {len(x)}"
        if "maxItems" in s and len(x) > s["maxItems"]:
            return path, f"expected at most {s['maxItems']} items, got {len(x)}"
        if "items" in s:
            for i, item in enumerate(x):
                if found := self.check(item, s["items"], (*path, i)):
                    return found
        return None

    def object(self, x: dict, s: dict, path: Path) -> tuple[Path, str] | None:
        for key in s.get("required", ()):
            if key not in x:
                return (*path, key), "required, but missing"
        properties = s.get("properties", {})
        for key, value in x.items():
            if "propertyNames" in s and (found := self.check(key, s["propertyNames"], (*path, key))):
                return found
            if key in properties:
                found = self.check(value, properties[key], (*path, key))
            elif s.get("additionalProperties") is False:
                known = ", ".join(sorted(properties))
                found = (*path, key), f"unknown field (expected {'one of: ' + known if known else 'none'})"
            else:
                found = self.check(value, s.get("additionalProperties", True), (*path, key))
            if found:
                return found
        return None
