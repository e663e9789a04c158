"""Loading manifest files: every problem reported with file, object, field and reason.

A file with any error contributes nothing, so a half-valid file never half-applies.
Files are hostile until read: their size, YAML nesting and alias expansion are
bounded before any object is built (an alias bomb of a few hundred bytes once
took 11 s and 615 MB, deep nesting a RecursionError), and no file, however
broken, raises out of here: it becomes a ManifestError.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from gristmill.spec.problems import SHOWN, clip
from gristmill.values import ValueProblem, check_json

API_VERSION = "gristmill.io/v1alpha1"
KINDS: dict[str, type[BaseModel]] = {}  # filled by spec/__init__.py

MAX_FILE_BYTES = 8 << 20  # a manifest file: a few Scripts of up to 1 MiB of code each
MAX_YAML_DEPTH = 100  # nesting of YAML collections (a Flow 16 steps deep needs about 70)
MAX_YAML_NODES = 100_000  # in one document, aliases expanded
MAX_YAML_TEXT = 16 << 20  # characters of scalars in one document, aliases expanded


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
    errors = exc.errors()
    for error in errors[:SHOWN]:
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
        found.append(ManifestError(source, clip(reason, 4000), kind, name, field_name or None))
    if len(errors) > SHOWN:
        found.append(ManifestError(source, f"and {len(errors) - SHOWN:,} more problems",
                                   kind, name))
    return found


class _TooBig(yaml.MarkedYAMLError):
    """A document past one of the limits: where (line, column, and the object and field
    when they were read by then) and which limit."""

    def __init__(self, problem: str, mark: yaml.Mark, kind: str | None, name: str | None,
                 field: str | None):
        super().__init__(None, None, problem, mark)
        self.kind, self.name, self.field = kind, name, field


def _scalar(node: yaml.Node | None, key: str) -> str | None:
    """The text of mapping `node`'s scalar under `key`, as far as it was composed."""
    if not isinstance(node, yaml.MappingNode):
        return None
    for item_key, value in node.value:
        if isinstance(item_key, yaml.ScalarNode) and item_key.value == key:
            return value.value[:80] if isinstance(value, yaml.ScalarNode) else None
    return None


def _field_of(path: list[Any]) -> str:
    parts = ""
    for part in path:
        if isinstance(part, int):
            parts += f"[{part}]"
        elif isinstance(part, yaml.ScalarNode):
            parts += f".{part.value[:40]}" if parts else part.value[:40]
    return parts if len(parts) <= 200 else f"{parts[:120]}...{parts[-60:]}"


class _BoundedComposer(yaml.composer.Composer):
    """PyYAML's composer, refusing documents nested past MAX_YAML_DEPTH, with more than
    MAX_YAML_NODES nodes (aliases expanded) or MAX_YAML_TEXT characters, or with an alias
    inside the node it names. It stops at the first node past a limit, so the parser never
    reads further: libyaml's time grows with tokens x nesting (100,000 nested [ took 23 s)."""

    def compose_document(self) -> yaml.Node:
        self._path: list[Any] = []  # key node or index of each node being composed
        self._root: yaml.Node | None = None
        self._composed = 0
        self._expanded: dict[int, tuple[int, int]] = {}  # id(node) -> (nodes, characters)
        return super().compose_document()

    def _refuse(self, problem: str, mark: yaml.Mark) -> _TooBig:
        metadata = None
        if isinstance(self._root, yaml.MappingNode):
            metadata = next((v for k, v in self._root.value
                             if isinstance(k, yaml.ScalarNode) and k.value == "metadata"), None)
        return _TooBig(problem, mark, _scalar(self._root, "kind"), _scalar(metadata, "name"),
                       _field_of(self._path) or None)

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            target = self.anchors.get(event.anchor)
            if target is not None and id(target) not in self._expanded:
                raise self._refuse(f"the alias *{event.anchor} refers to a node that contains "
                                   f"it; YAML cycles are not manifests", event.start_mark)
            return super().compose_node(parent, index)
        self._composed += 1
        if self._composed > MAX_YAML_NODES:
            raise self._refuse(f"has more than {MAX_YAML_NODES:,} YAML nodes: split it",
                               event.start_mark)
        self._path.append(index)
        if len(self._path) > MAX_YAML_DEPTH:
            raise self._refuse(f"YAML nested more than {MAX_YAML_DEPTH} levels deep: "
                               f"flatten it", event.start_mark)
        node = super().compose_node(parent, index)
        self._path.pop()
        if isinstance(node, yaml.ScalarNode):
            size = (1, len(node.value))
        else:
            children = (node.value if isinstance(node, yaml.SequenceNode)
                        else [part for pair in node.value for part in pair])
            sizes = [self._expanded[id(child)] for child in children]
            size = (1 + sum(n for n, _ in sizes), sum(c for _, c in sizes))
        if size[0] > MAX_YAML_NODES or size[1] > MAX_YAML_TEXT:
            raise self._refuse(f"expands to more than {MAX_YAML_NODES:,} nodes or "
                               f"{MAX_YAML_TEXT >> 20} MiB of text (an alias counts each time "
                               f"it is used)", event.start_mark)
        self._expanded[id(node)] = size
        return node

    def compose_mapping_node(self, anchor: str | None) -> yaml.MappingNode:
        """PyYAML's, remembering the document's root mapping while it is composed, to name
        the object (kind, metadata.name) in an error about its inside."""
        start = self.get_event()
        tag = start.tag
        if tag is None or tag == "!":
            tag = self.resolve(yaml.MappingNode, None, start.implicit)
        node = yaml.MappingNode(tag, [], start.start_mark, None, flow_style=start.flow_style)
        if self._root is None:
            self._root = node
        if anchor is not None:
            self.anchors[anchor] = node
        while not self.check_event(yaml.MappingEndEvent):
            item_key = self.compose_node(node, None)
            item_value = self.compose_node(node, item_key)
            node.value.append((item_key, item_value))
        node.end_mark = self.get_event().end_mark
        return node


if getattr(yaml, "__with_libyaml__", False):
    # libyaml's parser (60x faster) feeding the bounded composer written in Python.
    class _Loader(_BoundedComposer, yaml.cyaml.CParser, yaml.constructor.SafeConstructor,
                  yaml.resolver.Resolver):
        def __init__(self, stream: str):
            yaml.cyaml.CParser.__init__(self, stream)
            _BoundedComposer.__init__(self)
            yaml.constructor.SafeConstructor.__init__(self)
            yaml.resolver.Resolver.__init__(self)
else:
    class _Loader(_BoundedComposer, yaml.SafeLoader):  # type: ignore[no-redef]
        pass


def _documents(text: str, source: str) -> tuple[list[Any], list[ManifestError]]:
    """The documents of a file; a List's items each count as one."""
    loader = _Loader(text)
    docs = []
    try:
        while loader.check_data():
            doc = loader.get_data()
            if isinstance(doc, dict) and doc.get("kind") == "List" and isinstance(
                    doc.get("items"), list):
                docs.extend(doc["items"])
            elif doc is not None:
                docs.append(doc)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        if isinstance(exc, _TooBig):
            return [], [ManifestError(source, f"{problem}{where}", exc.kind, exc.name,
                                      exc.field, document=len(docs))]
        return [], [ManifestError(source, f"invalid YAML{where}: {clip(problem, 300)}")]
    finally:
        loader.dispose()
    return docs, []


def _validate(doc: Any, source: str, index: int) -> tuple[BaseModel | None, list[ManifestError]]:
    if not isinstance(doc, dict):
        return None, [ManifestError(source, "a manifest must be a mapping with apiVersion, "
                                            "kind, metadata and spec", document=index)]
    kind = doc.get("kind")
    name = doc["metadata"].get("name") if isinstance(doc.get("metadata"), dict) else None
    name = clip(name, 80) if isinstance(name, str) else None
    if kind == "Secret" and doc.get("apiVersion") == "v1":
        # Beside the Scripts that read them: `gristmill dev` hands them to its workers
        # (jobsecrets/from_files.py); nothing stores them.
        return None, []
    if not isinstance(kind, str) or kind not in KINDS:
        return None, [ManifestError(source, f"unknown kind {clip(repr(kind), 80)}; Gristmill reads "
                                            f"{', '.join(sorted(KINDS))}", document=index,
                                    name=name)]
    if doc.get("apiVersion") != API_VERSION:
        return None, [ManifestError(source, f"apiVersion {clip(repr(doc.get('apiVersion')), 80)} is not "
                                            f"supported; use {API_VERSION}", kind, name,
                                    "apiVersion")]
    model = KINDS[kind]
    try:
        check_json(doc, "")  # what PostgreSQL's jsonb cannot store: NUL, NaN, depth
    except ValueProblem as exc:
        return None, [ManifestError(source, exc.reason, kind, name,
                                    exc.where.lstrip(".") or None)]
    try:
        return model.model_validate(doc), []
    except ValidationError as exc:
        return None, pydantic_errors(exc, model, source, kind, name)
    except (RecursionError, MemoryError):
        return None, [ManifestError(source, "too deeply nested or too large to check: "
                                            "simplify it", kind, name, "spec")]
    except Exception as exc:  # a bug of ours must not hide the file's other problems
        return None, [ManifestError(source, f"could not be checked ({type(exc).__name__}: "
                                            f"{clip(str(exc))}); please report this",
                                    kind, name)]


def load_manifest_text(text: str, source: str = "<stdin>") -> LoadResult:
    result = LoadResult()
    if len(text) > MAX_FILE_BYTES:
        result.errors = [ManifestError(source, f"is {len(text):,} characters long; a manifest "
                                               f"file may have {MAX_FILE_BYTES >> 20} MiB: "
                                               f"split it")]
        return result
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


def _read_manifest(file: Path) -> str:
    if not file.is_file():  # a FIFO or a device would block or never end
        raise ManifestError(str(file), "is not a regular file")
    try:
        with file.open("rb") as stream:
            data = stream.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ManifestError(str(file), f"cannot read it: {exc.strerror or exc}") from None
    if len(data) > MAX_FILE_BYTES:
        raise ManifestError(str(file), f"is larger than {MAX_FILE_BYTES >> 20} MiB: split it")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError(str(file), f"is not UTF-8 text (byte {exc.start})") from None


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
        try:
            files = _manifest_files(root)
        except OSError as exc:  # a symlink loop, a directory we may not read
            result.errors.append(ManifestError(str(root), f"cannot list it: {exc}"))
            continue
        for file in files:
            try:
                text = _read_manifest(file)
            except ManifestError as exc:
                result.errors.append(exc)
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
