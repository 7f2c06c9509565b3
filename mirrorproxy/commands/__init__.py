"""The CLI verbs (serve, hosts, healthcheck, doctor, preload, images, cache, export,
import): each module's ``run`` turns parsed arguments into work and an exit code, and
raises ``errors.CliError`` for a one-line failure. ``mirrorproxy.cli`` only parses and
dispatches.
"""
