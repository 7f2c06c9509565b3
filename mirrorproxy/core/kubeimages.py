"""Image references in Kubernetes YAML: what a cluster would pull for these manifests.

Reads the output of ``kubectl kustomize``, ``helm template`` or a directory of
manifests (multi-document YAML, or JSON) and finds the ``image`` of every container,
init container and ephemeral container in each Pod and pod template: Deployments,
StatefulSets, DaemonSets, ReplicaSets, ReplicationControllers, Jobs, CronJobs,
PodTemplates, ``kind: List`` items, and any other object with a pod template at
``spec.template`` (Argo Rollouts, OpenKruise workloads). Other fields that merely
look like images (a custom resource's ``spec.image``) are not guessed at.

The YAML is composed into nodes rather than loaded, so every reference and every
problem carries the line it came from. Pure: text in, findings out; normalising the
references is ``mirrorproxy.core.reference``'s job.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import yaml

_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_MERGE = "tag:yaml.org,2002:merge"
_NULL = "tag:yaml.org,2002:null"
_TEMPLATE = ("spec", "template", "spec")
# Where each kind keeps its pod spec.
POD_SPECS: dict[str, tuple[str, ...]] = {
    "Pod": ("spec",),
    "PodTemplate": ("template", "spec"),
    "Deployment": _TEMPLATE,
    "StatefulSet": _TEMPLATE,
    "DaemonSet": _TEMPLATE,
    "ReplicaSet": _TEMPLATE,
    "ReplicationController": _TEMPLATE,
    "Job": _TEMPLATE,
    "CronJob": ("spec", "jobTemplate", "spec", "template", "spec"),
}
CONTAINER_LISTS = ("initContainers", "containers", "ephemeralContainers")
MAX_LIST_DEPTH = 8  # a List of Lists of ...


@dataclass(frozen=True, slots=True)
class Found:
    line: int  # 1-based
    image: str  # as written


@dataclass(slots=True)
class Findings:
    images: list[Found] = field(default_factory=list)
    problems: list[tuple[int, str]] = field(default_factory=list)  # (line, why)


def images_in_yaml(text: str) -> Findings:
    """Every container image in the YAML documents of ``text``, with its line.

    A document that is not valid YAML ends the reading (YAML cannot resume after
    a syntax error); what came before it is kept, and the error is a problem.
    """
    out = Findings()
    try:
        for doc in yaml.compose_all(text, Loader=_LOADER):
            if doc is not None:
                _object(doc, out, 0)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        line = mark.line + 1 if mark is not None else 1
        problem = getattr(err, "problem", None) or str(err)
        out.problems.append((line, f"not valid YAML: {problem}"))
    return out


def _object(node: yaml.Node, out: Findings, depth: int) -> None:
    if not isinstance(node, yaml.MappingNode):
        return
    kind = _text(_get(node, "kind")) or ""
    items = _get(node, "items")
    if kind.endswith("List") and isinstance(items, yaml.SequenceNode):
        if depth < MAX_LIST_DEPTH:
            for item in items.value:
                _object(item, out, depth + 1)
        return
    path = POD_SPECS.get(kind, _TEMPLATE)
    spec = _path(node, path)
    if spec is None:
        return
    name = _text(_path(node, ("metadata", "name"))) or "(unnamed)"
    for field_name in CONTAINER_LISTS:
        containers = _get(spec, field_name)
        if isinstance(containers, yaml.SequenceNode):
            for container in containers.value:
                _container(container, f"{kind or 'object'} {name}", out)


def _container(node: yaml.Node, owner: str, out: Findings) -> None:
    if not isinstance(node, yaml.MappingNode):
        out.problems.append((_line(node), f"{owner}: a container that is not a mapping"))
        return
    cname = _text(_get(node, "name")) or "(unnamed)"
    image = _get(node, "image")
    if image is None or (isinstance(image, yaml.ScalarNode) and image.tag == _NULL):
        out.problems.append((_line(node), f"{owner}: container {cname} has no image"))
        return
    text = _text(image)
    if text is None:
        out.problems.append((_line(image), f"{owner}: container {cname}: image is not a string"))
        return
    out.images.append(Found(_line(image), text))


def _path(node: yaml.Node | None, keys: tuple[str, ...]) -> yaml.MappingNode | None:
    for key in keys:
        node = _get(node, key)
    return node if isinstance(node, yaml.MappingNode) else None


def _get(node: yaml.Node | None, key: str) -> yaml.Node | None:
    """The value of ``key`` in a mapping node (following ``<<`` merge keys), else None."""
    if not isinstance(node, yaml.MappingNode):
        return None
    merged: yaml.Node | None = None
    for k, v in node.value:
        if isinstance(k, yaml.ScalarNode):
            if k.tag == _MERGE:
                sources = v.value if isinstance(v, yaml.SequenceNode) else [v]
                for source in sources:
                    merged = merged or _get(source, key)
            elif k.value == key:
                return v  # type: ignore[no-any-return]
    return merged


def _text(node: yaml.Node | None) -> str | None:
    if isinstance(node, yaml.ScalarNode) and node.tag != _NULL:
        return str(node.value)
    return None


def _line(node: yaml.Node) -> int:
    return int(node.start_mark.line) + 1
