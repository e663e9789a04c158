"""What a network plugin that enforces NetworkPolicies would allow, from the policies' own
selectors (the tests' control plane has no such plugin: tests/k8s_network.py is a bare
bridge). Pods only: ipBlock peers and named ports are not modelled."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Pod:
    namespace: str
    labels: dict[str, str]


def selects(selector: dict, labels: dict[str, str]) -> bool:
    """A LabelSelector against labels; {} selects everything."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expression in selector.get("matchExpressions") or []:
        key, operator, values = expression["key"], expression["operator"], expression.get(
            "values") or []
        present = key in labels
        if not {"In": present and labels[key] in values,
                "NotIn": not present or labels[key] not in values,
                "Exists": present, "DoesNotExist": not present}[operator]:
            return False
    return True


def _peer_admits(peer: dict, policy_namespace: str, other: Pod) -> bool:
    if "ipBlock" in peer:
        return False
    namespace_labels = {"kubernetes.io/metadata.name": other.namespace}
    if "namespaceSelector" in peer:
        if not selects(peer["namespaceSelector"], namespace_labels):
            return False
    elif other.namespace != policy_namespace:
        return False  # a podSelector alone means the policy's own namespace
    return selects(peer.get("podSelector") or {}, other.labels)


def _port_admits(rule: dict, port: int) -> bool:
    ports = rule.get("ports")
    return not ports or any(p.get("port") == port for p in ports)


def allowed(policies: list[dict], direction: str, pod: Pod, other: Pod, port: int) -> bool:
    """Whether `pod` may receive from `other` on `port` (direction "Ingress"), or send to
    `other` on `port` ("Egress"), counting only this one side's policies."""
    rules_key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    mine = [p for p in policies if p["metadata"]["namespace"] == pod.namespace
            and direction in p["spec"].get("policyTypes", ["Ingress"])
            and selects(p["spec"]["podSelector"], pod.labels)]
    if not mine:
        return True  # not isolated
    return any(_port_admits(rule, port) and (
        not rule.get(peers_key)  # no peers: from (or to) anywhere
        or any(_peer_admits(peer, policy["metadata"]["namespace"], other)
               for peer in rule[peers_key]))
        for policy in mine for rule in policy["spec"].get(rules_key) or [])


def connects(policies: list[dict], source: Pod, target: Pod, port: int) -> bool:
    """Both sides agree: the source's egress and the target's ingress."""
    return (allowed(policies, "Egress", source, target, port)
            and allowed(policies, "Ingress", target, source, port))
