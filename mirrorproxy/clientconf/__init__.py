"""Client configuration: what points containerd, k3s, podman/CRI-O and Docker at the
mirror (hosts.toml, registries.yaml, registries.conf, daemon.json), and the
``doctor`` checks of a node. Renderers are pure; no CLI code lives here.
"""
