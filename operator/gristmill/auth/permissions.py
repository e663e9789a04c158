"""What an action needs, as Kubernetes RBAC names it, and the ready-made roles that grant
it (the chart's ClusterRoles are rendered from ROLES; a test keeps them equal)."""

from __future__ import annotations

from dataclasses import dataclass

GROUP = "gristmill.io"


@dataclass(frozen=True)
class Permission:
    """A verb on a gristmill.io resource (and subresource) in a namespace ("" for every
    namespace), as a SubjectAccessReview's resourceAttributes hold it; or, with `path`,
    a verb on a non-resource URL such as /metrics."""

    verb: str
    resource: str = ""
    subresource: str = ""
    namespace: str = ""
    name: str = ""
    path: str = ""

    @property
    def what(self) -> str:
        """As `kubectl auth can-i` takes it: runs/cancel, scripts/runs, /metrics."""
        if self.path:
            return self.path
        return f"{self.resource}/{self.subresource}" if self.subresource else self.resource

    def phrase(self) -> str:
        """"update runs/cancel in namespace team-a", "list scripts in all namespaces"."""
        target = self.what + (f" {self.name}" if self.name else "")
        if self.path:
            return f"{self.verb} {target}"
        where = f"in namespace {self.namespace}" if self.namespace else "in all namespaces"
        return f"{self.verb} {target} {where}"

    def can_i(self, username: str) -> str:
        """The kubectl command that asks the same question. (kubectl reads TYPE/NAME, so a
        subresource goes in --subresource: `scripts/runs` there would mean a Script
        named runs.)"""
        if self.path:
            return f"kubectl auth can-i {self.verb} {self.path} --as {username}"
        target = f"{self.resource}.{GROUP}" + (f"/{self.name}" if self.name else "")
        sub = f" --subresource {self.subresource}" if self.subresource else ""
        where = f"-n {self.namespace}" if self.namespace else "--all-namespaces"
        return f"kubectl auth can-i {self.verb} {target}{sub} {where} --as {username}"


@dataclass(frozen=True)
class Rule:
    verbs: tuple[str, ...]
    resources: tuple[str, ...]


# The chart's ClusterRoles. Each grants what a kind of user does; they nest (a runner can
# do what a viewer can) so one binding is enough.
_VIEW = Rule(("get", "list"), ("runs",)), Rule(("get", "list"), ("scripts", "flows"))
_RUN = (Rule(("create",), ("scripts/runs", "flows/runs")),
        Rule(("update",), ("runs/cancel", "runs/restart")))
_APPROVE = (Rule(("update",), ("runs/approval",)),)
ROLES: dict[str, tuple[Rule, ...]] = {
    "gristmill-viewer": _VIEW,
    "gristmill-runner": (*_VIEW, *_RUN),
    # The audit trail (who did what, from where) is for those who oversee: approvers and
    # admins.
    "gristmill-approver": (Rule(("get",), ("runs",)), *_APPROVE, Rule(("list",), ("audit",))),
    "gristmill-admin": (Rule(("*",), ("*",)),),
}


def grants(rule: Rule, permission: Permission) -> bool:
    if permission.path:
        return False
    return ((permission.verb in rule.verbs or "*" in rule.verbs)
            and (permission.what in rule.resources or "*" in rule.resources))


def roles_granting(permission: Permission) -> list[str]:
    """The ready-made roles that grant `permission`, narrowest first (admin last)."""
    return [name for name, rules in ROLES.items() if any(grants(r, permission) for r in rules)]
