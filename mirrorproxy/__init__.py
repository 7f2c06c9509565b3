"""mirrorproxy: a pull-through OCI registry mirror for containerd."""

__version__ = "0.1.0"
