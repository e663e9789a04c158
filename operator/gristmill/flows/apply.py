"""Applying a Flow: what its graph needs from the store is there, and no sub-flow cycles."""

from __future__ import annotations

import psycopg

from gristmill.spec import Flow, FlowSpec
from gristmill.spec.problems import summarize
from gristmill.store import flows as flow_store
from gristmill.store import scripts as script_store


async def _spec_of(conn: psycopg.AsyncConnection, namespace: str, name: str,
                   pending: dict[str, FlowSpec]) -> FlowSpec | None:
    if name in pending:
        return pending[name]
    found = await flow_store.get(conn, namespace, name)
    return FlowSpec.model_validate(found[1]) if found else None


async def flow_problems(conn: psycopg.AsyncConnection, flow: Flow,
                        pending: dict[str, FlowSpec] | None = None) -> list[str]:
    """What keeps a Flow from running: missing Scripts or sub-flows, a sub-flow cycle (the
    first few, then how many more).

    `pending` holds Flows of the same namespace being applied together, which
    may refer to each other.
    """
    pending = pending or {}
    namespace = flow.metadata.namespace
    problems = []
    for name in sorted(flow.spec.script_names()):
        if await script_store.get(conn, namespace, name) is None:
            problems.append(f"Script {name!r} does not exist in namespace {namespace!r}")
    # Walk sub-flows depth first, looking for a way back to this flow.
    stack = [(flow.metadata.name, flow.spec, (flow.metadata.name,))]
    visited: set[str] = set()
    while stack:
        _, spec, trail = stack.pop()
        for child in sorted(spec.flow_names()):
            if child in trail:
                problems.append(f"sub-flow cycle: {' -> '.join((*trail, child))}")
                continue
            if child in visited:
                continue
            visited.add(child)
            child_spec = await _spec_of(conn, namespace, child, pending)
            if child_spec is None:
                problems.append(f"sub-flow {child!r} does not exist in namespace {namespace!r}")
            else:
                stack.append((child, child_spec, (*trail, child)))
    return summarize(problems)


async def apply_flow(conn: psycopg.AsyncConnection, flow: Flow) -> tuple[str, bool]:
    """Store a Flow and the versions of its inline Scripts; (version, whether it moved)."""
    for step, _ in flow.spec.all_steps():
        if step.inline is not None:
            await script_store.put_version(conn, step.inline.content_hash(),
                                           step.inline.model_dump(mode="json", by_alias=True))
    return await flow_store.apply(conn, flow)
