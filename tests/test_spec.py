"""Manifests, quantities, input schemas and flow graphs: the errors a person sees."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from gristmill.spec import (
    InputError,
    apply_defaults,
    check_input,
    infer_input_schema,
    load_manifest_text,
    load_manifests,
    parse_cpu,
    parse_duration,
    parse_memory,
)

EXAMPLES = Path(__file__).parent.parent / "examples"


def errors_of(text: str) -> list[str]:
    return [str(e) for e in load_manifest_text(textwrap.dedent(text), "m.yaml").errors]


def script_yaml(spec: str, name: str = "s") -> str:
    return (f"apiVersion: gristmill.io/v1alpha1\nkind: Script\nmetadata: {{name: {name}}}\n"
            f"spec:\n{textwrap.indent(textwrap.dedent(spec).strip(), '  ')}\n")


@pytest.mark.parametrize("text, seconds", [
    ("250ms", 0.25), ("90s", 90), ("5m", 300), ("1h30m", 5400), ("1.5s", 1.5), ("30", 30), (12, 12)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["5 minutes", "-1s", "", "1x", "s"])
def test_bad_durations_say_how_to_write_one(text):
    with pytest.raises(ValueError, match="like 90s, 5m or 1h30m"):
        parse_duration(text)


def test_quantities():
    assert parse_memory("512Mi") == 512 * 2**20
    assert parse_memory("1Gi") == 2**30
    assert parse_memory("100M") == 10**8
    assert parse_memory("1e3") == 1000
    assert parse_cpu("500m") == 0.5 and parse_cpu("2") == 2.0
    with pytest.raises(ValueError, match="512Mi"):
        parse_memory("lots")
    with pytest.raises(ValueError, match="500m"):
        parse_cpu("fast")


def test_quantities_round_up_as_kubernetes_does_and_stop_at_what_no_machine_has():
    from gristmill.spec.quantities import MAX_BYTES, MAX_CORES, MAX_DURATION_S
    assert parse_memory("1.5") == 2 and parse_memory("0.5Ki") == 512
    assert parse_memory(".5Gi") == 2**29 and parse_memory("1E") == 10**18
    assert parse_cpu("0.0001") == 0.001 and parse_cpu("0.5m") == 0.001
    assert parse_memory("1e99999999") == MAX_BYTES  # computed without 10^99999999
    assert parse_memory("9" * 32) == MAX_BYTES and parse_cpu("9" * 32) == MAX_CORES
    assert parse_duration("99999999d") == MAX_DURATION_S == parse_duration(2**63 - 1)


def test_whole_numbers_in_yaml_are_kept_as_text_and_fractions_refused():
    loaded = load_manifest_text(script_yaml(
        "language: bash\ncode: echo\ntimeout: 90\nresources: {cpu: 2, memory: 536870912}\n"
        "retryBackoff: {initialDelay: 1.0, maxDelay: null}"), "m.yaml")
    assert not loaded.errors, loaded.errors
    spec = loaded.resources[0].spec
    assert (spec.timeout, spec.resources.cpu, spec.resources.memory) == ("90", "2", "536870912")
    assert spec.retryBackoff.initialDelay == "1" and spec.retryBackoff.maxDelay == "5m"
    (error,) = errors_of(script_yaml("language: bash\ncode: echo\nresources: {cpu: 0.5}"))
    assert error == ("m.yaml: Script 's': spec.resources.cpu: invalid CPU quantity 0.5: the "
                     "Kubernetes API server takes only whole numbers or strings here: write "
                     "'0.5' (quoted) or 500m")


def test_examples_load():
    loaded = load_manifests([EXAMPLES])
    assert not loaded.errors
    assert {(r.kind, r.metadata.name) for r in loaded.resources} >= {
        ("Script", "hello"), ("Script", "word-count"), ("Flow", "process-orders")}


def test_input_schema_from_main():
    schema = infer_input_schema(textwrap.dedent('''
        from typing import Literal, Optional

        def main(name: str, count: int = 3, ratio: float = 0.5, on: bool = False,
                 tags: list[str] = [], meta: dict = {}, note: Optional[str] = None,
                 mode: Literal["fast", "slow"] = "fast", anything=None, *, key: str | None):
            """Do the thing.

            More text.
            """
    '''))
    props = schema["properties"]
    assert schema["required"] == ["name", "key"]
    assert schema["additionalProperties"] is False
    assert schema["description"] == "Do the thing."
    assert props["name"] == {"type": "string"}
    assert props["count"] == {"type": "integer", "default": 3}
    assert props["ratio"]["type"] == "number" and props["on"]["type"] == "boolean"
    assert props["tags"] == {"type": "array", "items": {"type": "string"}, "default": []}
    assert props["meta"]["type"] == "object"
    assert props["note"]["type"] == ["string", "null"]
    assert props["mode"] == {"enum": ["fast", "slow"], "default": "fast"}
    assert props["anything"] == {"default": None}
    assert props["key"]["type"] == ["string", "null"]
    kwargs = infer_input_schema("def main(a, **rest):\n    pass\n")
    assert kwargs["additionalProperties"] is True


def test_input_checks_name_every_problem():
    schema = infer_input_schema("def main(name: str, count: int = 1):\n    pass\n")
    with pytest.raises(InputError) as caught:
        check_input(schema, {"count": "three", "nmae": "x"})
    message = str(caught.value)
    assert "input: 'name' is a required property" in message
    assert "input.count: 'three' is not of type 'integer'" in message
    assert "unknown field 'nmae' (expected one of: count, name)" in message
    assert apply_defaults(schema, {"name": "x"}) == {"name": "x", "count": 1}


@pytest.mark.parametrize("spec, expected", [
    ("language: python\ntimeout: 5 minutes\ncode: 'def main(): pass'",
     "spec.timeout: invalid duration '5 minutes': write a duration like 90s, 5m or 1h30m"),
    ("language: python\ntmeout: 5s\ncode: 'def main(): pass'",
     "spec.tmeout: unknown field (known fields: code, concurrencyLimit"),
    ("language: python\ncode: |\n  def main(:\n    pass\n",
     "spec.code: Python syntax error at line 1"),
    ("language: python\ncode: 'def run(): pass'",
     "spec.code: define a function main(...) whose parameters are the Script's inputs"),
    ("language: bash\ncode: 'if then fi'", "spec.code: bash syntax error"),
    ("language: ruby\ncode: 'puts 1'", "spec.language: Input should be 'python' or 'bash'"),
    ("language: python\nretries: -1\ncode: 'def main(): pass'", "spec.retries"),
    ("language: python\nresources: {memory: lots}\ncode: 'def main(): pass'",
     "spec.resources.memory: invalid quantity 'lots'"),
    ("language: bash\nrequirements: [requests]\ncode: 'echo'",
     "requirements are for Python Scripts"),
    ("language: python\nenv: [{name: A, value: '1'}, {name: A, value: '2'}]\n"
     "code: 'def main(): pass'", "env: A given more than once"),
    ("language: python\ninput: {type: string}\ncode: 'def main(): pass'",
     "spec.input: Value error, the input schema must have type: object"),
    ("language: python", "spec.code: required field is missing"),
])
def test_bad_scripts_say_where_and_why(spec, expected):
    (error,) = errors_of(script_yaml(spec))
    assert error.startswith("m.yaml: Script 's': ")
    assert expected.replace("Value error, ", "") in error


def test_one_bad_document_keeps_the_whole_file_out():
    text = script_yaml("language: python\ncode: 'def main(): pass'", "good") + "---\n" + \
        script_yaml("language: python\ncode: 'oops('", "bad")
    loaded = load_manifest_text(text, "m.yaml")
    assert loaded.resources == [] and len(loaded.errors) == 1


def test_yaml_errors_unknown_kinds_and_duplicates(tmp_path):
    assert "invalid YAML at line 2" in errors_of("a: [1\nb: 2\n")[0]
    assert "unknown kind 'Job'" in errors_of("apiVersion: v1\nkind: Job\nmetadata: {name: x}\n")[0]
    assert "use gristmill.io/v1alpha1" in errors_of(
        "apiVersion: gristmill.io/v2\nkind: Script\nmetadata: {name: x}\nspec: {}\n")[0]
    good = script_yaml("language: python\ncode: 'def main(): pass'", "same")
    (tmp_path / "a.yaml").write_text(good)
    (tmp_path / "b.yaml").write_text(good)
    loaded = load_manifests([tmp_path])
    assert len(loaded.resources) == 1
    assert "also defined in" in str(loaded.errors[0])


def flow_yaml(spec: str) -> str:
    return ("apiVersion: gristmill.io/v1alpha1\nkind: Flow\nmetadata: {name: f}\n"
            f"spec:\n{textwrap.indent(textwrap.dedent(spec).strip(), '  ')}\n")


@pytest.mark.parametrize("spec, expected", [
    ("steps: [{id: a, script: s, input: {x: 'results.nope'}}]",
     "step 'a' input.x: 'results.nope' refers to unknown step 'nope'"),
    ("steps: [{id: a, script: s}, {id: a, script: t}]", "step id 'a' is used twice"),
    ("steps: [{id: a, script: s, skipWhen: 'flow_input.x +* 2'}]",
     "step 'a' skipWhen: ERROR: <input>:1:15: Syntax error"),
    ("steps: [{id: a, script: s, flow: g}]", "has script and flow: give exactly one"),
    ("steps: [{id: a}]", "step 'a' does nothing"),
    ("steps: [{id: a, script: s, input: {x: 'iter.value'}}]", "uses iter outside a forEach"),
    ("steps: [{id: a, forEach: '[1]', steps: [{id: b, script: s}]},"
     " {id: c, script: s, input: {x: 'results.b'}}]",
     "reads step 'b' from inside a forEach"),
    ("steps: [{id: Bad-Id, script: s}]", "spec.steps[0].id"),
])
def test_bad_flows_say_which_step_and_expression(spec, expected):
    errors = errors_of(flow_yaml(spec))
    assert errors and any(expected in e for e in errors), errors


def test_large_python_code_is_checked_in_a_child_process():
    # Past 64 KiB the code is parsed by a memory-capped child; the answers are the same.
    filler = "".join(f"value_{i} = {i}\n" for i in range(8000))
    assert len(filler) > 64 * 1024
    good = "def main(name: str, count: int = 2):\n    pass\n" + filler
    loaded = load_manifest_text(script_yaml(f"language: python\ncode: |\n"
                                            f"{textwrap.indent(good, '  ')}"), "m.yaml")
    assert not loaded.errors, loaded.errors
    schema = loaded.resources[0].spec.input_schema()
    assert schema["required"] == ["name"] and schema["properties"]["count"]["default"] == 2
    bad = filler + "def main(:\n    pass\n"
    (error,) = errors_of(script_yaml(f"language: python\ncode: |\n{textwrap.indent(bad, '  ')}"))
    assert "spec.code: Python syntax error at line 8001" in error
    no_main = filler
    (error,) = errors_of(script_yaml(f"language: python\ncode: |\n"
                                     f"{textwrap.indent(no_main, '  ')}"))
    assert "spec.code: define a function main(...)" in error


def test_summaries_keep_the_first_problems_and_count_the_rest():
    from gristmill.spec.problems import some_of, summarize
    assert summarize([f"p{i}" for i in range(11)]) == [f"p{i}" for i in range(11)]
    assert summarize([f"p{i}" for i in range(2000)])[-1] == "and 1,990 more"
    assert some_of(["a", "b", "c"], 2) == "a, b, c"
    assert some_of([str(i) for i in range(100)], 3) == "0, 1, 2, ... and 97 more"
