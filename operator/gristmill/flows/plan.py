"""The static shape of a Flow: where each step sits, what follows it, what it reads.

A step instance is named by its path: the step id plus the index of each
enclosing forEach iteration, e.g. `resize[3]` or `cell[1][4]`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from gristmill.spec import FlowSpec, Step
from gristmill.spec.expressions import referenced_steps

MAIN = "main"
ON_FAILURE = "onFailure"
_PATH = re.compile(r"^([a-z_][a-z0-9_]*)((?:\[\d+\])*)$")

Indices = tuple[int, ...]


def step_path(step_id: str, indices: Indices) -> str:
    return step_id + "".join(f"[{i}]" for i in indices)


def parse_path(path: str) -> tuple[str, Indices]:
    match = _PATH.match(path)
    if not match:
        raise ValueError(f"not a step path: {path!r}")
    return match.group(1), tuple(int(i) for i in re.findall(r"\d+", match.group(2)))


@dataclass(frozen=True)
class StepInfo:
    step: Step
    parent: str | None  # the container step, None at the top of the flow
    block: int  # which of the parent's blocks (branch) it is in
    position: int  # index within that block
    depth: int  # enclosing forEach steps
    section: str  # MAIN or ON_FAILURE
    reads: frozenset[str] = frozenset()  # step ids its expressions read


@dataclass
class FlowPlan:
    spec: FlowSpec
    version: str
    steps: dict[str, StepInfo] = field(default_factory=dict)
    blocks: dict[tuple[str | None, int, str], list[str]] = field(default_factory=dict)

    @classmethod
    def build(cls, spec: FlowSpec, version: str) -> FlowPlan:
        plan = cls(spec, version)
        plan._add_block(spec.steps, None, 0, 0, MAIN)
        if spec.onFailure:
            plan._add_block([spec.onFailure], None, 0, 0, ON_FAILURE)
        return plan

    def _add_block(self, steps: list[Step], parent: str | None, block: int, depth: int,
                   section: str) -> None:
        self.blocks[(parent, block, section)] = [s.id for s in steps]
        for position, step in enumerate(steps):
            reads = set()
            for _, expression in step.expressions():
                reads |= referenced_steps(expression)
            self.steps[step.id] = StepInfo(step, parent, block, position, depth, section,
                                           frozenset(reads))
            inner_depth = depth + (1 if step.forEach is not None else 0)
            for i, inner in enumerate(step.blocks()):
                self._add_block(inner, step.id, i, inner_depth, section)

    def block_of(self, step_id: str) -> list[str]:
        info = self.steps[step_id]
        return self.blocks[(info.parent, info.block, info.section)]

    def next_step(self, step_id: str) -> str | None:
        block = self.block_of(step_id)
        position = self.steps[step_id].position
        return block[position + 1] if position + 1 < len(block) else None

    def first_of(self, container: str, block: int) -> str | None:
        steps = self.blocks[(container, block, self.steps[container].section)]
        return steps[0] if steps else None

    def container_indices(self, step_id: str, indices: Indices) -> Indices:
        """Indices of the container of a step instance (a forEach drops its iteration index)."""
        parent = self.steps[step_id].parent
        if parent is not None and self.steps[parent].step.forEach is not None:
            return indices[:-1]
        return indices

    def innermost_loop(self, step_id: str) -> str | None:
        parent = self.steps[step_id].parent
        while parent is not None:
            if self.steps[parent].step.forEach is not None:
                return parent
            parent = self.steps[parent].parent
        return None

    def descendants(self, container: str) -> set[str]:
        found: set[str] = set()
        for step in self.steps[container].step.blocks():
            for inner in step:
                found.add(inner.id)
                found |= self.descendants(inner.id)
        return found

    def top_level(self) -> list[str]:
        return self.blocks[(None, 0, MAIN)]
