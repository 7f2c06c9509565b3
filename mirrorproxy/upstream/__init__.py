"""Talking to upstream registries: the only package that opens network connections."""
