"""Loading manifest files: every problem reported with file, object, field and reason.

A file with any error contributes nothing, so a half-valid file never half-applies.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

API_VERSION = "gristmill.io/v1alpha1"
KINDS: dict[str, type[BaseModel]] = {}  # filled by spec/__init__.py


@dataclass
class ManifestError(Exception):
    path: str
    reason: str
    kind: str | None = None
    name: str | None = None
    field: str | None = None
    document: int | None = None

    def __str__(self) -> str:
        where = self.path
        if self.kind:
            where += f": {self.kind} {self.name!r}" if self.name else f": {self.kind}"
        elif self.document is not None:
            where += f": document {self.document + 1}"
        return f"{where}: {self.field + ': ' if self.field else ''}{self.reason}"


@dataclass
class LoadResult:
    resources: list[BaseModel] = field(default_factory=list)
    errors: list[ManifestError] = field(default_factory=list)
    sources: dict[int, str] = field(default_factory=dict)  # id(resource) -> file

    def source_of(self, resource: BaseModel) -> str:
        return self.sources.get(id(resource), "?")


def _field_path(loc: tuple) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif str(part).startswith("function-") or part in ("str", "int", "dict", "list"):
            continue  # pydantic's validator-kind entries, not fields
        else:
            path += f".{part}" if path else str(part)
    return path


def _known_fields(model: type[BaseModel], loc: tuple) -> list[str]:
    """The fields of the model at `loc`, to suggest in place of an unknown one."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int) or not (isinstance(current, type)
                                         and issubclass(current, BaseModel)):
            continue
        info = current.model_fields.get(str(part))
        if info is None:
            return []
        annotation = info.annotation
        for arg in getattr(annotation, "__args__", ()) or (annotation,):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                current = arg
                break
            for inner in getattr(arg, "__args__", ()):
                if isinstance(inner, type) and issubclass(inner, BaseModel):
                    current = inner
                    break
        else:
            current = annotation
    if isinstance(current, type) and issubclass(current, BaseModel):
        return sorted(current.model_fields)
    return []


def pydantic_errors(exc: ValidationError, model: type[BaseModel], source: str, kind: str,
                     name: str | None) -> list[ManifestError]:
    found = []
    for error in exc.errors():
        loc = tuple(error["loc"])
        field_name = _field_path(loc)
        if error["type"] == "extra_forbidden":
            known = _known_fields(model, loc)
            reason = "unknown field" + (f" (known fields: {', '.join(known)})" if known else "")
        elif error["type"] == "missing":
            reason = "required field is missing"
        else:
            reason = error["msg"].removeprefix("Value error, ")
            # A model-level check names its field first ("code: ..."): fold it into the path.
            head, _, rest = reason.partition(": ")
            if rest and head in _known_fields(model, (*loc, head)):
                field_name, reason = f"{field_name}.{head}" if field_name else head, rest
        found.append(ManifestError(source, reason, kind, name, field_name or None))
    return found


def _documents(text: str, source: str) -> tuple[list[Any], list[ManifestError]]:
    try:
        docs = [doc for doc in yaml.safe_load_all(text) if doc is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        return [], [ManifestError(source, f"invalid YAML{where}: {problem}")]
    expanded = []
    for doc in docs:
        if isinstance(doc, dict) and doc.get("kind") == "List" and isinstance(doc.get("items"), list):
            expanded.extend(doc["items"])
        else:
            expanded.append(doc)
    return expanded, []


def _validate(doc: Any, source: str, index: int) -> tuple[BaseModel | None, list[ManifestError]]:
    if not isinstance(doc, dict):
        return None, [ManifestError(source, "a manifest must be a mapping with apiVersion, "
                                            "kind, metadata and spec", document=index)]
    kind = doc.get("kind")
    name = (doc.get("metadata") or {}).get("name") if isinstance(doc.get("metadata"), dict) else None
    if kind not in KINDS:
        return None, [ManifestError(source, f"unknown kind {kind!r}; Gristmill reads "
                                            f"{', '.join(sorted(KINDS))}", document=index,
                                    name=name)]
    if doc.get("apiVersion") != API_VERSION:
        return None, [ManifestError(source, f"apiVersion {doc.get('apiVersion')!r} is not "
                                            f"supported; use {API_VERSION}", kind, name,
                                    "apiVersion")]
    model = KINDS[kind]
    try:
        return model.model_validate(doc), []
    except ValidationError as exc:
        return None, pydantic_errors(exc, model, source, kind, name)


def load_manifest_text(text: str, source: str = "<stdin>") -> LoadResult:
    result = LoadResult()
    docs, result.errors = _documents(text, source)
    for index, doc in enumerate(docs):
        resource, errors = _validate(doc, source, index)
        result.errors += errors
        if resource is not None:
            result.resources.append(resource)
            result.sources[id(resource)] = source
    if result.errors:
        result.resources.clear()  # all or nothing, per file
        result.sources.clear()
    return result


def _manifest_files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())
    return [path]


def load_manifests(paths: Iterable[str | Path]) -> LoadResult:
    """Load every manifest under `paths` (files, or directories walked for *.yaml/*.yml)."""
    result = LoadResult()
    seen: dict[tuple[str, str, str], str] = {}
    for root in map(Path, paths):
        if not root.exists():
            result.errors.append(ManifestError(str(root), "no such file or directory"))
            continue
        for file in _manifest_files(root):
            try:
                text = file.read_text()
            except (OSError, UnicodeDecodeError) as exc:
                result.errors.append(ManifestError(str(file), f"cannot read it: {exc}"))
                continue
            loaded = load_manifest_text(text, str(file))
            result.errors += loaded.errors
            duplicates = []
            for resource in loaded.resources:
                key = (resource.kind, resource.metadata.namespace, resource.metadata.name)
                if key in seen:
                    duplicates.append(ManifestError(
                        str(file), f"also defined in {seen[key]}; names are unique per kind "
                                   f"and namespace", resource.kind, resource.metadata.name))
            if duplicates:
                result.errors += duplicates
                continue
            for resource in loaded.resources:
                key = (resource.kind, resource.metadata.namespace, resource.metadata.name)
                seen[key] = str(file)
                result.resources.append(resource)
                result.sources[id(resource)] = str(file)
    return result
