"""Hostile and broken manifest files: each is one error with file, object and field.

No file makes `load_manifests`, `gristmill apply` or the `gristmill dev`
reloader raise: not alias bombs, deep nesting, huge code, Flows nested 100
deep, values jsonb cannot hold, nor a few hundred randomly mutated examples.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_cli import free_port, gristmill, wait_healthy

from gristmill.spec import load_manifest_text, load_manifests

EXAMPLES = Path(__file__).parent.parent / "examples"
HEAD = "apiVersion: gristmill.io/v1alpha1\nkind: {kind}\nmetadata: {{name: {name}}}\nspec:\n"


def script_doc(name: str, code: str, language: str = "python", extra: str = "") -> str:
    body = "".join(f"    {line}\n" for line in code.splitlines())
    return (HEAD.format(kind="Script", name=name)
            + f"  language: {language}\n{extra}  code: |\n{body}")


def block_nested_flow(depth: int) -> str:
    lines = [HEAD.format(kind="Flow", name="deep").rstrip("\n"), "  steps:"]
    indent = "  "
    for i in range(depth):
        lines += [f"{indent}- id: b{i}", f"{indent}  branchOne:", f"{indent}    branches:",
                  f"{indent}    - when: 'true'", f"{indent}      steps:"]
        indent += "      "
    lines.append(f"{indent}- {{id: leaf, script: s}}")
    return "\n".join(lines) + "\n"


def flow_style_nested_flow(depth: int) -> str:
    inner = "{id: leaf, script: s}"
    for i in range(depth):
        inner = f"{{id: b{i}, branchOne: {{branches: [{{when: 'true', steps: [{inner}]}}]}}}}"
    return HEAD.format(kind="Flow", name="deep") + f"  steps: [{inner}]\n"


def bad_references(count: int) -> str:
    steps = "".join(f"\n    - {{id: s{i}, script: s, input: {{"
                    + ", ".join(f"x{j}: 'results.nope{i}_{j}'" for j in range(4)) + "}}"
                    for i in range(count // 4))
    return HEAD.format(kind="Flow", name="refs") + "  steps:" + steps + "\n"


ALIAS_BOMB = "".join(
    f"{name}: &{name} [{', '.join(['*' + prev] * 9 if prev else ['lol'] * 9)}]\n"
    for prev, name in zip([None, *"abcdefgh"], "abcdefghi", strict=True))

HOSTILE: dict[str, tuple[str, str]] = {  # file name -> (text, a piece of the expected error)
    "alias-bomb.yaml": (ALIAS_BOMB, "expands to more"),
    "alias-cycle.yaml": ("a: &a [1, *a]\n", "refers to a node that contains it"),
    "deep-list.yaml": ("[" * 100_000 + "]" * 100_000, "nested more than 100 levels"),
    "deep-map.yaml": ("a: " + "{a: " * 5000 + "1" + "}" * 5000 + "\n",
                      "nested more than 100 levels"),
    "flow-100-deep.yaml": (block_nested_flow(100), "Flow 'deep': spec.steps[0].branchOne"),
    "flow-100-deep-flow-style.yaml": (flow_style_nested_flow(100), "Flow 'deep'"),
    "flow-17-deep.yaml": (block_nested_flow(17), "is nested 17 steps deep; the limit is 16"),
    "flow-1001-steps.yaml": (HEAD.format(kind="Flow", name="long") + "  steps:" + "".join(
        f"\n    - {{id: s{i}, script: s}}" for i in range(1001)) + "\n",
        "more than 1000 steps"),
    "flow-2000-bad-refs.yaml": (bad_references(2000), "and 1,990 more"),
    "flow-long-expression.yaml": (HEAD.format(kind="Flow", name="expr")
                                  + "  steps: [{id: a, script: s, input: {x: '"
                                  + "1+" * 3000 + "1'}}]\n",
                                  "spec.steps[0].input.x: String should have at most 4096"),
    "flow-loop-variable-typo.yaml": (HEAD.format(kind="Flow", name="typo")
                                     + "  steps: [{id: a, script: s, input: "
                                       "{x: 'flow_input.xs.map(x, y * 2)'}}]\n",
                                     "unknown variable(s) y"),
    "code-over-1mib.yaml": (script_doc("big", "def main():\n    pass\n" + "x = 1\n" * 180_000),
                            "spec.code: String should have at most 1048576 characters"),
    "code-3.5mb.yaml": (script_doc("bigger", "x = 1\n" * 600_000),
                        "spec.code: String should have at most"),
    "code-python-syntax.yaml": (script_doc("syn", "def main(:\n    pass\n"),
                                "spec.code: Python syntax error at line 1"),
    "code-bash-deep.yaml": (script_doc("sub", "echo " + "$(" * 3000 + "x" + ")" * 3000,
                                       language="bash"), "spec.code: bash"),
    "nul-in-description.yaml": (HEAD.format(kind="Script", name="nul")
                                + '  language: python\n  description: "a\\0b"\n'
                                  "  code: 'def main(): pass'\n",
                                "spec.description: contains a NUL character"),
    "nan-in-input.yaml": (HEAD.format(kind="Flow", name="nan")
                          + "  input: {type: object, default: .nan}\n"
                            "  steps: [{id: a, script: s}]\n", "spec.input.default: is NaN"),
    "deep-input-schema.yaml": (HEAD.format(kind="Script", name="schema")
                               + "  language: bash\n  code: echo\n  input: "
                               + "{items: " * 60 + "{}" + "}" * 60 + "\n",
                               "nested more than 32 levels deep"),
    "unknown-fields.yaml": (HEAD.format(kind="Script", name="fields")
                            + "  language: python\n  code: 'def main(): pass'\n"
                            + "".join(f"  f{i}: 1\n" for i in range(5000)),
                            "and 4,990 more problems"),
    "kind-is-a-list.yaml": ("apiVersion: gristmill.io/v1alpha1\nkind: [1, 2]\n", "unknown kind"),
    "not-utf8.yaml": ("\udcff", "not UTF-8"),
    "binary.yaml": ("\x00\x01\x02 garbage: [", "invalid YAML"),
    "tabs.yaml": ("a:\n\t- b\n", "invalid YAML"),
}


@pytest.fixture(scope="module")
def hostile_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hostile")
    for name, (text, _) in HOSTILE.items():
        data = text.encode("utf-8", "surrogateescape")
        (root / name).write_bytes(data)
    return root


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_each_hostile_file_is_a_clear_error(hostile_dir, name):
    loaded = load_manifests([hostile_dir / name])
    messages = [str(error) for error in loaded.errors]
    assert loaded.resources == [] and messages
    assert all(m.startswith(str(hostile_dir / name) + ": ") for m in messages), messages
    assert sum(map(len, messages)) < 5000, messages  # a summary, not megabytes
    expected = HOSTILE[name][1]
    assert any(expected in m for m in messages), messages


def _mutations(text: str, rng: random.Random) -> str:
    pieces = ["[", "]", "{", "}", ": ", "- ", "&a ", "*a", "\n  ", "'", '"', "!!str ", "<<: ",
              "\t", "---\n", "%YAML", "results.", "map(x, ", ".nan", "\\0", "~", "\x00", "🙂"]
    chars = list(text)
    for _ in range(rng.randint(1, 8)):
        position = rng.randrange(len(chars) + 1)
        move = rng.random()
        if move < 0.4:
            chars.insert(position, rng.choice(pieces))
        elif move < 0.7 and chars:
            del chars[position:position + rng.randint(1, 20)]
        else:
            start = rng.randrange(len(chars) or 1)
            chars[position:position] = chars[start:start + rng.randint(1, 200)]
    return "".join(chars)


def test_mutated_examples_never_raise():
    rng = random.Random(9)
    originals = [p.read_text() for p in sorted(EXAMPLES.glob("*.yaml"))]
    outcomes = {"loaded": 0, "refused": 0}
    for i in range(400):
        text = _mutations(rng.choice(originals), rng)
        loaded = load_manifest_text(text, f"fuzz-{i}.yaml")  # must not raise
        for error in loaded.errors:
            assert str(error).startswith(f"fuzz-{i}.yaml: "), str(error)
            assert len(str(error)) < 5000
        outcomes["refused" if loaded.errors else "loaded"] += 1
    assert outcomes["refused"] > 100 and outcomes["loaded"] > 10, outcomes


def test_gristmill_apply_prints_no_traceback(hostile_dir, database_url):
    done = gristmill("apply", str(hostile_dir), env={"GRISTMILL_DATABASE_URL": database_url},
                     timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 1
    assert "Traceback" not in output, output[-3000:]
    for name in HOSTILE:
        assert f"{hostile_dir / name}: " in output, name
    unreachable = gristmill("apply", str(EXAMPLES),
                            env={"GRISTMILL_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/x"})
    assert unreachable.returncode == 1 and "Traceback" not in unreachable.stderr
    assert "cannot apply to the database" in unreachable.stderr


class _Lines:
    """The output of a process, read by a thread, for waiting on a line."""

    def __init__(self, process: subprocess.Popen):
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(process,), daemon=True)
        self._thread.start()

    def _read(self, process: subprocess.Popen) -> None:
        for line in process.stdout:
            self.lines.append(line)

    def wait_for(self, piece: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines:
                if piece in line:
                    return line
            time.sleep(0.1)
        raise AssertionError(f"no line with {piece!r} in:\n{''.join(self.lines)[-3000:]}")


def test_dev_reloader_survives_bad_files_and_applies_the_fix(tmp_path):
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    (manifests / "hello.yaml").write_text((EXAMPLES / "hello.yaml").read_text())
    port = free_port()
    server = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [sys.executable, "-m", "gristmill.cli", "dev", str(manifests), "--port", str(port),
         "--workers", "1", "--data-dir", str(tmp_path / "data")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    output = _Lines(process)
    try:
        wait_healthy(server, process)
        # A Flow nested 100 deep (a RecursionError that silently killed the reloader), then
        # every other hostile file, one edit after another.
        for name in ("flow-100-deep.yaml", "alias-bomb.yaml", "deep-list.yaml",
                     "code-over-1mib.yaml"):
            (manifests / "bad.yaml").write_text(HOSTILE[name][0])
            output.wait_for(f"[reload] error: {manifests / 'bad.yaml'}: ")
            output.lines.clear()
        (manifests / "bad.yaml").write_text(script_doc("fixed", "def main():\n    return 7\n"))
        output.wait_for("[reload] applied Script default/fixed")
        done = gristmill("run", "script", "fixed", "--wait", server=server)
        assert done.returncode == 0 and done.stdout.strip() == "7", done.stderr
        assert process.poll() is None
        assert "Traceback" not in "".join(output.lines)
    finally:
        process.terminate()
        process.wait(timeout=60)
