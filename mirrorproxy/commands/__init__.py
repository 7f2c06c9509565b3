"""The CLI verbs (serve, hosts, cache, preload, healthcheck): each turns parsed
arguments into work and an exit code. ``mirrorproxy.cli`` only parses and dispatches.
"""
