"""Image references found in Kubernetes manifests shaped like real-world ones.

The manifests below imitate what operators feed ``preload``: ``helm template``
output (``# Source:`` comments, quoted values, empty documents, hooks),
``kubectl kustomize`` output, ``kubectl get -o json`` lists, a directory of files,
and standard input. Each test asserts the exact normalised references (and the
exact problems, with their lines) rather than a subset.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from mirrorproxy.cli import main
from mirrorproxy.commands.imagelists import read_sources
from mirrorproxy.core.kubeimages import images_in_yaml

DIGEST = "sha256:" + "ab" * 32

HELM = f"""\
---
# Source: shop/templates/serviceaccount.yaml
apiVersion: v1
kind: ServiceAccount
metadata:
  name: shop
---
# Source: shop/templates/configmap.yaml
apiVersion: v1
kind: ConfigMap
metadata:
  name: shop-config
data:
  note: |
    image: not/an-image:because-it-is-data
---
# Source: shop/templates/deployment.yaml
apiVersion: apps/v1
kind: Deployment
metadata:
  name: shop-web
  labels: {{app: shop}}
spec:
  replicas: 2
  template:
    metadata:
      labels: {{app: shop}}
    spec:
      initContainers:
        - name: migrate
          image: "ghcr.io/acme/shop-migrate:2.3.1"
          args: ["--image", "decoy:1"]
      containers:
        - name: web
          image: "nginx:1.25-alpine"
          ports: [{{containerPort: 80}}]
        - name: sidecar
          image: quay.io/prometheus/statsd-exporter@{DIGEST}
---
# Source: shop/templates/empty.yaml
---
# Source: shop/templates/statefulset.yaml
apiVersion: apps/v1
kind: StatefulSet
metadata:
  name: shop-db
spec:
  serviceName: db
  template:
    spec:
      containers:
        - name: postgres
          image: docker.io/library/postgres:16
---
# Source: shop/templates/cronjob.yaml
apiVersion: batch/v1
kind: CronJob
metadata:
  name: shop-backup
spec:
  schedule: "0 3 * * *"
  jobTemplate:
    spec:
      template:
        spec:
          restartPolicy: OnFailure
          containers:
            - name: backup
              image: registry.example.com:5000/ops/backup:v7@{DIGEST}
---
# Source: shop/templates/tests/test-connection.yaml
apiVersion: v1
kind: Pod
metadata:
  name: "shop-test-connection"
  annotations:
    "helm.sh/hook": test
spec:
  containers:
    - name: wget
      image: busybox
  ephemeralContainers:
    - name: debug
      image: index.docker.io/nicolaka/netshoot:latest
"""

HELM_WANT = [
    "ghcr.io/acme/shop-migrate:2.3.1",
    "docker.io/library/nginx:1.25-alpine",
    f"quay.io/prometheus/statsd-exporter@{DIGEST}",
    "docker.io/library/postgres:16",
    f"registry.example.com:5000/ops/backup:v7@{DIGEST}",
    "docker.io/library/busybox:latest",
    "docker.io/nicolaka/netshoot:latest",
]

KUSTOMIZE = """\
apiVersion: v1
kind: Service
metadata:
  name: api
spec:
  ports:
  - port: 80
---
apiVersion: apps/v1
kind: DaemonSet
metadata:
  name: node-agent
  namespace: kube-system
spec:
  selector:
    matchLabels:
      app: node-agent
  template:
    metadata:
      labels:
        app: node-agent
    spec:
      containers:
      - image: registry.k8s.io/kube-proxy:v1.30.2
        name: agent
---
apiVersion: batch/v1
kind: Job
metadata:
  name: seed
spec:
  template:
    spec:
      containers:
      - image: ghcr.io/acme/seed:1
        name: seed
      restartPolicy: Never
---
apiVersion: apps/v1
kind: ReplicaSet
metadata:
  name: legacy
spec:
  template:
    spec:
      containers:
      - image: nginx:1.25-alpine
        name: web
---
apiVersion: monitoring.coreos.com/v1
kind: Prometheus
metadata:
  name: main
spec:
  image: quay.io/prometheus/prometheus:v2.53.0
---
apiVersion: argoproj.io/v1alpha1
kind: Rollout
metadata:
  name: canary
spec:
  template:
    spec:
      containers:
      - image: ghcr.io/acme/canary:3
        name: canary
"""

KUSTOMIZE_WANT = [
    "registry.k8s.io/kube-proxy:v1.30.2",
    "ghcr.io/acme/seed:1",
    "docker.io/library/nginx:1.25-alpine",
    "ghcr.io/acme/canary:3",
]


def _pod(image: str) -> dict[str, object]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p"},
        "spec": {"containers": [{"name": "c", "image": image}]},
    }


REDIS = {"name": "c", "image": "redis:7"}
KUBECTL_JSON = json.dumps(
    {
        "apiVersion": "v1",
        "kind": "List",
        "items": [
            _pod("coredns/coredns:1.11.1"),
            {
                "apiVersion": "v1",
                "kind": "PodTemplate",
                "metadata": {"name": "t"},
                "template": {"spec": {"containers": [REDIS]}},
            },
            {
                "apiVersion": "v1",
                "kind": "ReplicationController",
                "metadata": {"name": "rc"},
                "spec": {"template": {"spec": {"containers": [REDIS]}}},
            },
        ],
    },
    indent=2,
)


def _strs(text: str) -> list[str]:
    found = read_sources(["-"], io.StringIO(text))
    assert found.problems == []
    return [str(ref) for ref in found.refs]


def test_helm_template_output() -> None:
    assert _strs(HELM) == HELM_WANT


def test_kustomize_output_skips_look_alike_fields_but_takes_pod_templates() -> None:
    assert _strs(KUSTOMIZE) == KUSTOMIZE_WANT


def test_kubectl_json_list() -> None:
    assert _strs(KUBECTL_JSON) == ["docker.io/coredns/coredns:1.11.1", "docker.io/library/redis:7"]


def test_lines_are_the_image_lines() -> None:
    found = images_in_yaml(HELM)
    lines = HELM.splitlines()
    assert [lines[f.line - 1].strip() for f in found.images][:2] == [
        'image: "ghcr.io/acme/shop-migrate:2.3.1"',
        'image: "nginx:1.25-alpine"',
    ]


BROKEN = """\
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  template:
    spec:
      containers:
        - name: web
          image: $(WEB_IMAGE)
        - name: no-image
        - name: numeric
          image: {a: 1}
        - name: fine
          image: alpine:3
---
apiVersion: v1
kind: Pod
metadata: {name: after}
spec:
  containers:
    - name: ok
      image: redis:7
---
kind: Pod
spec: [unclosed
"""


def test_every_problem_is_reported_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(BROKEN)
    found = read_sources([str(path)], io.StringIO())
    assert [str(r) for r in found.refs] == [
        "docker.io/library/alpine:3",
        "docker.io/library/redis:7",
    ]
    # In line order; the YAML error ends the reading at the end of the input.
    assert [p.split(": ", 1)[0] for p in found.problems] == [
        f"{path}:{n}" for n in (9, 10, 12, 26)
    ]
    assert any("container no-image has no image" in p for p in found.problems)
    assert any("container numeric: image is not a string" in p for p in found.problems)
    assert any("'$(WEB_IMAGE)'" in p for p in found.problems)
    assert any("not valid YAML" in p for p in found.problems)


def test_a_directory_a_list_and_stdin_together(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    chart = tmp_path / "rendered"
    (chart / "base").mkdir(parents=True)
    (chart / "base" / "all.yaml").write_text(KUSTOMIZE)
    (chart / "helm.yml").write_text(HELM)
    (chart / "kubectl.json").write_text(KUBECTL_JSON)
    (chart / "README.md").write_text("image: not/this:1\n")
    (chart / ".hidden.yaml").write_text(KUSTOMIZE.replace("seed:1", "hidden:1"))
    listing = tmp_path / "extra.txt"
    listing.write_text("# more\nalpine:3\nnginx:1.25-alpine  # again\n")
    monkeypatch.setattr("sys.stdin", io.StringIO("---\n" + json.dumps(_pod("busybox:1.36"))))

    assert main(["images", str(chart), str(listing), "-"]) == 0
    out, err = capsys.readouterr()
    # Files in path order (base/all.yaml, helm.yml, kubectl.json), then the list,
    # then stdin; each reference once, where it was first seen.
    assert out.splitlines() == [
        *KUSTOMIZE_WANT,
        *[r for r in HELM_WANT if r not in KUSTOMIZE_WANT],
        "docker.io/coredns/coredns:1.11.1",
        "docker.io/library/redis:7",
        "docker.io/library/alpine:3",
        "docker.io/library/busybox:1.36",
    ]
    assert err == ""


def test_images_reports_bad_lines_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    listing = tmp_path / "images.txt"
    listing.write_text("alpine:3\nUPPER/Case:1\n\nok/fine:2\nbad tag:x\n")
    assert main(["images", str(listing), str(tmp_path / "missing.yaml")]) == 1
    out, err = capsys.readouterr()
    assert out.splitlines() == ["docker.io/library/alpine:3", "docker.io/ok/fine:2"]
    lines = err.splitlines()
    assert [line.split(": ")[1] for line in lines] == [
        f"{listing}:2",
        f"{listing}:5",
        f"{tmp_path / 'missing.yaml'}",
    ]
    assert lines[2].endswith("cannot read: No such file or directory")
