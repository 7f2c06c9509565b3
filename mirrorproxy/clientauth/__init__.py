"""Client authentication and per-namespace access for the mirror's own clients.

``[server.auth]`` turns it on: Basic auth against an htpasswd file of bcrypt
entries, Bearer JWTs from an existing token service, or both; each namespace's
``access`` says who may pull through it. Nothing here knows about upstream
credentials (``upstream/auth.py``) or the cache. This package file imports nothing,
so the config loader can use the parsers without importing the service.
"""
