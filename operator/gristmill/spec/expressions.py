"""CEL expressions of Flows: compiled and analysed once when a Flow loads.

Variables: flow_input, results.<step_id>, iter.value / iter.index (inside a
forEach), env.<NAME>, and error.message / error.step (in onFailure); inside a
macro (`xs.map(x, ...)`, filter, all, exists, exists_one) also its loop
variable. CEL never mixes int and double (`1 + 1.5` is an error): write
`double(x)`.

Evaluation (with its budget) is `gristmill.flows.evaluator`'s job; this module
only says what an expression is: its program, the variables and steps it
reads, and whether it loops (the evaluator runs loops where they can be
stopped).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import cel

VARIABLES = ("flow_input", "results", "iter", "env", "error")
MACROS = ("all", "exists", "exists_one", "map", "filter")
# Longer expressions are refused before the CEL library sees them: it recurses per operator
# and crashed this process (SIGSEGV) at about 16,000 chained `+` (32 KB); 4 KiB is 8x below.
MAX_EXPRESSION_LENGTH = 4096
_KEYWORDS = {"true", "false", "null", "in", "as", "break", "const", "continue", "else", "for",
             "function", "if", "import", "let", "loop", "package", "namespace", "return", "var",
             "void", "while"}

_TOKEN = re.compile(r"""
    (?P<space>\s+|//[^\n]*)
  | (?P<string>(?:[rR][bB]?|[bB][rR]?)?(?:'''(?:\\.|[^\\])*?'''|\"\"\"(?:\\.|[^\\])*?\"\"\"
               |'(?:\\.|[^'\\\n])*'|"(?:\\.|[^"\\\n])*"))
  | (?P<number>0[xX][0-9a-fA-F]+[uU]?|(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?[uU]?)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<op>&&|\|\||==|!=|<=|>=|\?\.|[-+*/%!<>?:.,\[\](){}])
  | (?P<other>.)
""", re.VERBOSE | re.DOTALL)


class ExpressionError(ValueError):
    """An expression that does not compile or cannot be evaluated; says which and why."""


def shown(expression: str, limit: int = 120) -> str:
    """The expression as error messages quote it: whole when short, its start otherwise."""
    if len(expression) <= limit:
        return repr(expression)
    return f"{expression[:limit]!r}... ({len(expression)} characters)"


@dataclass(frozen=True)
class Analysis:
    """What an expression reads and how it loops, read from its tokens."""

    free_variables: frozenset[str]  # top-level names it reads (loop variables excluded)
    steps: frozenset[str]  # step ids it reads through results.<id> or results["<id>"]
    loops: int  # macro calls (map, filter, all, exists, exists_one)
    loop_depth: int  # the deepest nesting of macro calls
    references: int  # occurrences of free variables: each one copies what it names


@dataclass(frozen=True)
class CompiledExpression:
    source: str
    program: cel.Program
    analysis: Analysis


def _tokens(expression: str) -> list[tuple[str, str]]:
    found = []
    for match in _TOKEN.finditer(expression):
        kind = match.lastgroup
        if kind != "space":
            found.append((kind, match.group()))
    return found


def _string_value(literal: str) -> str | None:
    """The text of a plain string literal (no escapes), for results["<id>"]."""
    body = literal.lstrip("rR")
    if body[:1] in "bB" or len(body) < 2 or "\\" in body:
        return None
    quote = body[:3] if body[:3] in ("'''", '"""') else body[0]
    return body[len(quote):-len(quote)]


def analyse(expression: str) -> Analysis:
    """Free variables with the scope of each macro's loop variable, the steps read, loops.

    A loop variable is bound from its macro's opening parenthesis to the matching
    closing one, so `xs.map(x, x * 2)` reads xs only and `xs.map(x, x) + [x]` reads x.
    """
    tokens = _tokens(expression)
    free: set[str] = set()
    steps: set[str] = set()
    references = 0
    loops = 0
    loop_depth = 0
    brackets: list[tuple[str, str | None]] = []  # (bracket, loop variable bound inside)
    message_fields = False
    for i, (kind, text) in enumerate(tokens):
        before = tokens[i - 1][1] if i else ""
        after = tokens[i + 1][1] if i + 1 < len(tokens) else ""
        if kind == "op" and text in "([{":
            bound = None
            if (text == "(" and i >= 2 and tokens[i - 1][1] in MACROS
                    and tokens[i - 2][1] in (".", "?.") and i + 2 < len(tokens)
                    and tokens[i + 1][0] == "ident" and tokens[i + 2][1] == ","):
                bound = tokens[i + 1][1]
                loops += 1
            brackets.append((text, bound))
            loop_depth = max(loop_depth, sum(1 for _, b in brackets if b))
            message_fields = text == "{" and i > 0 and tokens[i - 1][0] == "ident"
            continue
        if kind == "op" and text in ")]}":
            if brackets:
                brackets.pop()
            continue
        if kind != "ident" or text in _KEYWORDS:
            continue
        if before in (".", "?."):
            continue  # a field or a method
        if after == "(" or after == "{":
            continue  # a function (size, has, int...) or a message type
        if message_fields and after == ":":
            continue
        if any(bound == text for _, bound in brackets):
            continue  # a loop variable, in its macro's scope
        if i >= 2 and tokens[i - 1][1] == "(" and tokens[i - 2][1] in MACROS and after == ",":
            continue  # the loop variable itself, where it is declared
        free.add(text)
        references += 1
        if text == "results":
            nxt = tokens[i + 2] if i + 2 < len(tokens) else ("", "")
            if after in (".", "?.") and nxt[0] == "ident":
                steps.add(nxt[1])
            elif (after == "[" and nxt[0] == "string" and i + 3 < len(tokens)
                  and tokens[i + 3][1] == "]"):
                value = _string_value(nxt[1])
                if value is not None:
                    steps.add(value)
    return Analysis(frozenset(free), frozenset(steps), loops, loop_depth, references)


@functools.lru_cache(maxsize=4096)
def compile_expression(expression: str) -> CompiledExpression:
    if len(expression) > MAX_EXPRESSION_LENGTH:
        raise ExpressionError(f"is {len(expression):,} characters long; the limit is "
                              f"{MAX_EXPRESSION_LENGTH:,}: compute large things in a Script")
    try:
        program = cel.compile(expression)
    except (ValueError, RuntimeError) as exc:
        message = str(exc).removeprefix(f"Failed to parse expression {expression!r}: ")
        raise ExpressionError(" ".join(message.split())) from None
    analysis = analyse(expression)
    # What the library sees and the token scan does not (a leading-dot name) is read too.
    names = set(program.variables())
    unknown = sorted((analysis.free_variables | {n for n in names if not n.isidentifier()})
                     - set(VARIABLES))
    if unknown:
        raise ExpressionError(f"unknown variable(s) {', '.join(unknown)}; expressions can read "
                              f"{', '.join(VARIABLES)}, and a macro's loop variable inside it "
                              f"(xs.map(x, x * 2))")
    return CompiledExpression(expression, program, analysis)


def referenced_steps(expression: str) -> set[str]:
    """Step ids an expression reads through `results`."""
    return set(analyse(expression).steps)
