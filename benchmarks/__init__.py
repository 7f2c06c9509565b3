"""Side-by-side benchmarks: mirrorproxy against docker-registry's proxy mode and nginx.

Run ``python -m benchmarks --help`` from the repository root; ``benchmarks/README.md``
describes the scenarios, what is measured and how.
"""
