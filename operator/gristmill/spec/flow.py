"""The Flow custom resource: Scripts chained into steps, branches, loops and sub-flows.

Structure is checked here (one action per step, unique ids, expressions that
compile and name existing steps); what needs the store (referenced Scripts
and Flows exist, no sub-flow cycles) is checked when a Flow is applied.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from gristmill.spec.base import KubernetesModel
from gristmill.spec.expressions import (
    MAX_EXPRESSION_LENGTH,
    ExpressionError,
    analyse,
    compile_expression,
    shown,
)
from gristmill.spec.meta import ObjectMeta
from gristmill.spec.problems import clip, some_of, summarize
from gristmill.spec.quantities import Duration
from gristmill.spec.script import (
    EnvVar,
    ScriptSpec,
    check_schema_depth,
    check_storable,
    content_hash,
)
from gristmill.spec.status import FlowStatus

STEP_ID_PATTERN = r"^[a-z_][a-z0-9_]*$"
ACTIONS = ("script", "inline", "branchOne", "branchAll", "forEach", "flow")
MAX_STEPS = 1000  # in a Flow, nested ones and onFailure included
MAX_STEP_DEPTH = 16  # steps inside steps (branches, forEach bodies)
_NESTED = (("branchOne", "branches"), ("branchOne", "default"), ("branchAll", "branches"),
           ("steps",))

Expression = Annotated[str, Field(max_length=MAX_EXPRESSION_LENGTH)]


class RetryPolicy(KubernetesModel):
    attempts: int = Field(2, ge=1, le=100, description="Attempts in all, the first included.")
    backoff: Literal["constant", "exponential"] = Field(
        "exponential", description="constant: always `delay`; exponential: delay doubles.")
    delay: Duration = Field("1s", description="Delay before the second attempt.")
    maxDelay: Duration = Field("5m", description="Upper bound of the delay.")


# Kubernetes user and group names: any text but empty, as RBAC subjects have them.
SubjectName = Annotated[str, Field(min_length=1, max_length=253)]


class Approvers(KubernetesModel):
    """Who may decide a suspended step: a caller whose username is in `users` or who is in
    one of `groups` (as the API server authenticated them, e.g. a ServiceAccount is
    system:serviceaccount:NAMESPACE:NAME). On top of RBAC's update on runs/approval."""

    users: list[SubjectName] = Field(default_factory=list, max_length=100,
                                     description="Usernames that may approve or reject.")
    groups: list[SubjectName] = Field(default_factory=list, max_length=100,
                                      description="Groups whose members may approve or "
                                                  "reject.")

    @model_validator(mode="after")
    def _names_someone(self) -> Approvers:
        if not self.users and not self.groups:
            raise ValueError("approvers names nobody: list users or groups, or leave "
                             "approvers out to let anyone with update on runs/approval "
                             "decide")
        return self


class Suspend(KubernetesModel):
    timeout: Duration = Field("24h", description="Reject the step when nobody answers by then.")
    message: str | None = Field(None, description="Shown to whoever is asked to approve.")
    approvers: Approvers | None = Field(
        None, description="Only these users or groups may decide (default: anyone allowed "
                          "update on runs/approval in the run's namespace).")
    forbidSubmitter: bool = Field(False, description="The user who started the run may not "
                                                     "decide this step (four eyes).")


class Branch(KubernetesModel):
    when: Expression = Field(description="CEL condition; the first branch whose condition "
                                         "holds runs.")
    steps: list[Step] = Field(min_length=1, max_length=MAX_STEPS,
                              description="Steps of the branch.")


class BranchOne(KubernetesModel):
    branches: list[Branch] = Field(min_length=1, max_length=MAX_STEPS,
                                   description="Branches, tried in order.")
    default: list[Step] = Field(default_factory=list, max_length=MAX_STEPS,
                                description="Steps run when no branch condition holds.")


class ParallelBranch(KubernetesModel):
    name: str | None = Field(None, description="A label for people.")
    steps: list[Step] = Field(min_length=1, max_length=MAX_STEPS,
                              description="Steps of the branch.")


class BranchAll(KubernetesModel):
    parallel: bool = Field(True, description="Run the branches at once (true) or in order.")
    branches: list[ParallelBranch] = Field(min_length=1, max_length=MAX_STEPS,
                                           description="Branches that all run.")


class Step(KubernetesModel):
    id: str = Field(pattern=STEP_ID_PATTERN, max_length=63,
                    description="Unique in the flow; expressions read results.<id>.")
    description: str | None = Field(None, description="What the step is for.")
    script: str | None = Field(None, description="Name of a Script in the Flow's namespace.")
    inline: ScriptSpec | None = Field(None, description="A one-off Script written in place.")
    branchOne: BranchOne | None = Field(None, description="Run the first branch whose `when` holds.")
    branchAll: BranchAll | None = Field(None, description="Run every branch.")
    forEach: Expression | None = Field(None, description="CEL expression giving a list; `steps` run "
                                                  "once per item with iter.value and iter.index.")
    steps: list[Step] | None = Field(None, max_length=MAX_STEPS,
                                     description="The loop body of a forEach step.")
    parallelism: int = Field(1, ge=1, le=10000,
                             description="forEach: iterations at once (1 = one after another).")
    flow: str | None = Field(None, description="Name of a Flow to run as a sub-flow.")
    input: dict[str, Expression] = Field(default_factory=dict,
                                         description="Argument name to CEL expression.")
    retry: RetryPolicy | None = Field(None, description="Retries of a script, inline step.")
    timeout: Duration | None = Field(None, description="Time limit of one attempt of a script "
                                                        "or inline step (overrides the Script's).")
    skipWhen: Expression | None = Field(None, description="CEL condition; when true the step is "
                                                   "skipped and its result is null.")
    continueOnError: bool = Field(False, description="A failure of this step does not fail the "
                                                     "flow; its result is then the error.")
    stopWhen: Expression | None = Field(None, description="CEL condition evaluated after the step; "
                                                   "when true the flow ends successfully with "
                                                   "this step's result.")
    sleep: Duration | None = Field(None, description="Wait this long before the step starts.")
    suspend: Suspend | None = Field(None, description="After the step, wait for approve or "
                                                      "reject. Alone, an approval gate.")

    @model_validator(mode="after")
    def _one_action(self) -> Step:
        chosen = [name for name in ACTIONS if getattr(self, name) is not None]
        if len(chosen) > 1:
            raise ValueError(f"step {self.id!r} has {' and '.join(chosen)}: give exactly one "
                             f"of {', '.join(ACTIONS)}")
        if not chosen and self.suspend is None:
            raise ValueError(f"step {self.id!r} does nothing: give one of {', '.join(ACTIONS)} "
                             f"(or suspend alone, for an approval gate)")
        if (self.forEach is None) != (self.steps is None):
            raise ValueError(f"step {self.id!r}: forEach and steps go together (steps is the "
                             f"loop body)")
        if self.steps is not None and not self.steps:
            raise ValueError(f"step {self.id!r}: the forEach body needs at least one step")
        leaf = self.script is not None or self.inline is not None
        if (self.retry or self.timeout) and not leaf:
            raise ValueError(f"step {self.id!r}: retry and timeout apply to script and inline "
                             f"steps")
        if self.input and not (leaf or self.flow):
            raise ValueError(f"step {self.id!r}: input applies to script, inline and flow steps")
        if self.inline is not None and self.inline.secret_names():
            # The operator grants workers the Secrets that Scripts declare, not Flows.
            raise ValueError(f"step {self.id!r}: an inline step cannot read Secrets; move it "
                             f"to a Script and call it with `script:`")
        return self

    @property
    def action(self) -> str:
        for name in ACTIONS:
            if getattr(self, name) is not None:
                return name
        return "approval"

    def blocks(self) -> list[list[Step]]:
        """The step lists nested directly in this step, in order."""
        if self.branchOne:
            return [b.steps for b in self.branchOne.branches] + [self.branchOne.default]
        if self.branchAll:
            return [b.steps for b in self.branchAll.branches]
        if self.steps is not None:
            return [self.steps]
        return []

    def expressions(self) -> Iterator[tuple[str, str]]:
        """(field, expression) of every CEL expression of this step itself."""
        for name in ("skipWhen", "stopWhen", "forEach"):
            if getattr(self, name) is not None:
                yield name, getattr(self, name)
        for arg, expression in self.input.items():
            yield f"input.{arg}", expression
        if self.branchOne:
            for i, branch in enumerate(self.branchOne.branches):
                yield f"branchOne.branches[{i}].when", branch.when


class FlowSpec(KubernetesModel):
    description: str | None = Field(None, description="What the flow does.")
    input: dict[str, Any] = Field(default_factory=lambda: {"type": "object"},
                                  description="JSON Schema of the flow's input.")
    steps: list[Step] = Field(min_length=1, max_length=MAX_STEPS,
                              description=f"The steps, run in order; at most {MAX_STEPS} in "
                                          f"the whole Flow, nested at most {MAX_STEP_DEPTH} "
                                          f"deep.")
    onFailure: Step | None = Field(None, description="Runs when the flow fails; its expressions "
                                                     "see error.message and error.step.")
    output: Expression | None = Field(None, description="CEL expression of the flow's result "
                                                 "(default: the last step's result).")
    timeout: Duration | None = Field(None, description="The whole run's time limit.")
    concurrency: int | None = Field(None, ge=1, description="Runs of this flow at once; "
                                                            "more wait their turn.")
    priority: int = Field(0, ge=-100, le=100, description="Priority of the flow's jobs.")
    env: list[EnvVar] = Field(default_factory=list,
                              description="Constants readable as env.<NAME> in expressions.")

    @model_validator(mode="before")
    @classmethod
    def _bounded(cls, data: Any) -> Any:
        check_size(data)
        check_storable(data)
        if isinstance(data, dict) and "input" in data:
            try:
                check_schema_depth(data["input"])
            except ValueError as exc:
                raise ValueError(f"input: {exc}") from None
        return data

    @model_validator(mode="after")
    def _check_graph(self) -> FlowSpec:
        errors = check_flow(self)
        if errors:
            raise ValueError("; ".join(summarize(errors)))
        return self

    def all_steps(self) -> Iterator[tuple[Step, int]]:
        """Every step with its loop depth (enclosing forEach steps), onFailure last."""
        def walk(steps: list[Step], depth: int) -> Iterator[tuple[Step, int]]:
            for step in steps:
                yield step, depth
                for block in step.blocks():
                    yield from walk(block, depth + (1 if step.forEach is not None else 0))
        yield from walk(self.steps, 0)
        if self.onFailure:
            yield from walk([self.onFailure], 0)

    def content_hash(self) -> str:
        return content_hash(self)

    def script_names(self) -> set[str]:
        return {step.script for step, _ in self.all_steps() if step.script}

    def flow_names(self) -> set[str]:
        return {step.flow for step, _ in self.all_steps() if step.flow}


def check_size(data: Any) -> None:
    """Refuse a Flow with more than MAX_STEPS steps or steps nested deeper than
    MAX_STEP_DEPTH, before pydantic (recursive) reads it; iterative, so any depth is safe."""
    if not isinstance(data, dict):
        return
    roots = [("steps", data.get("steps")), ("onFailure", [data.get("onFailure")])]
    stack = [(path, steps, 1) for path, steps in roots if isinstance(steps, list)]
    count = 0
    while stack:
        path, steps, depth = stack.pop()
        for i, step in enumerate(steps):
            if not isinstance(step, dict):
                continue
            where = f"{path}[{i}]" if path != "onFailure" else path
            count += 1
            if count > MAX_STEPS:
                raise ValueError(f"the Flow has more than {MAX_STEPS} steps (nested ones "
                                 f"included): split it into sub-flows")
            if depth > MAX_STEP_DEPTH:
                step_id = step.get("id")
                named = f"step {clip(step_id, 63)!r}" if isinstance(step_id, str) else where
                raise ValueError(f"{named} is nested {depth} steps deep; the limit is "
                                 f"{MAX_STEP_DEPTH}: move the inner part into a sub-flow")
            for nested in _NESTED:
                container = step
                for key in nested[:-1]:
                    container = container.get(key) if isinstance(container, dict) else None
                inner = container.get(nested[-1]) if isinstance(container, dict) else None
                inner_path = f"{where}.{'.'.join(nested)}"
                if nested[-1] == "branches" and isinstance(inner, list):
                    stack.extend((f"{inner_path}[{b}].steps", branch.get("steps"), depth + 1)
                                 for b, branch in enumerate(inner)
                                 if isinstance(branch, dict)
                                 and isinstance(branch.get("steps"), list))
                elif isinstance(inner, list):
                    stack.append((inner_path, inner, depth + 1))


def _loop_depths(spec: FlowSpec) -> dict[str, int]:
    return {step.id: depth for step, depth in spec.all_steps()}


def check_flow(spec: FlowSpec) -> list[str]:
    """Unique ids; every expression compiles and reads only steps that exist."""
    errors: list[str] = []
    seen: set[str] = set()
    for step, _ in spec.all_steps():
        if step.id in seen:
            errors.append(f"step id {step.id!r} is used twice; step ids must be unique")
        seen.add(step.id)
    depths = _loop_depths(spec)
    known = sorted(depths)
    for step, depth in spec.all_steps():
        for field, expression in step.expressions():
            errors += _check_expression(f"step {step.id!r} {field}", expression, depths, known,
                                        depth)
    if spec.output:
        errors += _check_expression("output", spec.output, depths, known, 0)
    return errors


def _check_expression(where: str, expression: str, depths: dict[str, int], known: list[str],
                      depth: int) -> list[str]:
    try:
        compile_expression(expression)
    except ExpressionError as exc:
        return [f"{where}: {exc}"]
    analysis = analyse(expression)
    problems = []
    for ref in sorted(analysis.steps):
        if ref not in depths:
            problems.append(f"{where}: {shown(expression)} refers to unknown step {ref!r} "
                            f"(known: {some_of(known, 5)})")
        elif depths[ref] > depth:
            problems.append(f"{where}: {shown(expression)} reads step {ref!r} from inside a "
                            f"forEach it is not in; read the forEach step's result (a list) "
                            f"instead")
    if depth == 0 and "iter" in analysis.free_variables and where != "output":
        problems.append(f"{where}: {shown(expression)} uses iter outside a forEach")
    return problems


class Flow(KubernetesModel):
    apiVersion: Literal["gristmill.io/v1alpha1"] = "gristmill.io/v1alpha1"
    kind: Literal["Flow"] = "Flow"
    metadata: ObjectMeta
    spec: FlowSpec
    status: FlowStatus | None = Field(None, exclude=True)
