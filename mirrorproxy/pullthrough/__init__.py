"""Pull-through policy: the only package that knows both the cache and the upstreams.

Manifests, tags, referrers and blobs; shared downloads (fills) and how clients
follow them; namespace isolation; the engine that wires stores, budget and client.
"""
