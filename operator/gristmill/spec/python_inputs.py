"""The JSON Schema of a Python Script's input, read from `main`'s signature.

Only `ast` is used: user code is never imported or run to learn its inputs.
Parsing costs about 400 bytes of memory per byte of code (1 MiB of code took
0.4-0.5 GB and 1.5-3 s here), so large code is parsed by this file run as a
child process (`python -I -S python_inputs.py MEMORY_BYTES`, code on stdin),
under an address-space limit: a huge Script costs a child, not the operator.
"""

from __future__ import annotations

import ast
import json
import resource
import sys
from typing import Any

_SIMPLE = {"str": "string", "int": "integer", "float": "number", "bool": "boolean",
           "list": "array", "dict": "object", "List": "array", "Dict": "object",
           "tuple": "array", "Tuple": "array", "None": "null"}


def find_main(tree: ast.Module) -> ast.FunctionDef | ast.AsyncFunctionDef | None:
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == "main":
            return node
    return None


def _name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):  # typing.List, t.Optional
        return node.attr
    if isinstance(node, ast.Constant) and node.value is None:
        return "None"
    return None


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    if not schema:
        return schema
    if "type" in schema and isinstance(schema["type"], str):
        return {**schema, "type": [schema["type"], "null"]}
    return {"anyOf": [schema, {"type": "null"}]}


def annotation_schema(node: ast.expr | None) -> dict[str, Any]:
    """JSON Schema of a type annotation; {} (anything) when it cannot be told."""
    if node is None:
        return {}
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        try:  # a string annotation: "list[int]"
            return annotation_schema(ast.parse(node.value, mode="eval").body)
        except SyntaxError:
            return {}
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):  # X | None
        left, right = annotation_schema(node.left), annotation_schema(node.right)
        if right == {"type": "null"}:
            return _nullable(left)
        if left == {"type": "null"}:
            return _nullable(right)
        return {"anyOf": [left, right]} if left and right else {}
    if isinstance(node, ast.Subscript):
        outer = _name(node.value)
        inner = node.slice
        args = list(inner.elts) if isinstance(inner, ast.Tuple) else [inner]
        if outer == "Optional":
            return _nullable(annotation_schema(args[0]))
        if outer == "Union":
            schemas = [annotation_schema(a) for a in args]
            if {"type": "null"} in schemas:
                rest = [s for s in schemas if s != {"type": "null"}]
                return _nullable(rest[0] if len(rest) == 1 else {"anyOf": rest})
            return {"anyOf": schemas}
        if outer == "Literal":
            values = [a.value for a in args if isinstance(a, ast.Constant)]
            return {"enum": values}
        if outer in ("list", "List", "Sequence", "set", "Set", "tuple", "Tuple"):
            items = annotation_schema(args[0]) if args else {}
            return {"type": "array", **({"items": items} if items else {})}
        if outer in ("dict", "Dict", "Mapping"):
            values = annotation_schema(args[1]) if len(args) == 2 else {}
            return {"type": "object", **({"additionalProperties": values} if values else {})}
        return {}
    name = _name(node)
    return {"type": _SIMPLE[name]} if name in _SIMPLE else {}


def _default(node: ast.expr) -> tuple[bool, Any]:
    try:
        return True, ast.literal_eval(node)
    except ValueError:
        return False, None


def infer_input_schema(code: str) -> dict[str, Any]:
    """Draft 2020-12 schema of `main`'s parameters (code must parse and define main)."""
    main = find_main(ast.parse(code))
    if main is None:
        raise ValueError("no function main(...) in the code")
    return _schema_of(main)


def _schema_of(main: ast.FunctionDef | ast.AsyncFunctionDef) -> dict[str, Any]:
    args = main.args
    positional = args.posonlyargs + args.args
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    params = list(zip(positional, defaults, strict=True))
    params += list(zip(args.kwonlyargs, args.kw_defaults, strict=True))
    properties: dict[str, Any] = {}
    required = []
    for arg, default in params:
        schema = annotation_schema(arg.annotation)
        if default is None:
            required.append(arg.arg)
        else:
            known, value = _default(default)
            if known:
                schema = {**schema, "default": value}
        properties[arg.arg] = schema
    result: dict[str, Any] = {"type": "object", "properties": properties,
                              "additionalProperties": args.kwarg is not None}
    if required:
        result["required"] = required
    docstring = ast.get_docstring(main)
    if docstring:
        result["description"] = docstring.strip().splitlines()[0]
    return result


def check_code(code: str) -> dict[str, Any]:
    """The input schema of Python code that parses and defines main; ValueError (with what
    to fix) otherwise."""
    try:
        tree = ast.parse(code)
    except SyntaxError as exc:
        raise ValueError(f"Python syntax error at line {exc.lineno}: {exc.msg}") from None
    except (RecursionError, MemoryError):
        raise ValueError("the code nests too deeply to parse: flatten it") from None
    except ValueError as exc:  # NUL characters
        raise ValueError(f"cannot be parsed as Python: {exc}") from None
    main = find_main(tree)
    if main is None:
        raise ValueError("define a function main(...) whose parameters are the Script's "
                         "inputs")
    try:
        return _schema_of(main)
    except RecursionError:  # an annotation nested hundreds deep
        raise ValueError("main's annotations nest too deeply to read: simplify them") from None


if __name__ == "__main__":
    limit = int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        answer: dict[str, Any] = {"schema": check_code(sys.stdin.read())}
    except ValueError as exc:
        answer = {"error": str(exc)}
    except MemoryError:
        answer = {"error": "memory"}
    print(json.dumps(answer))
