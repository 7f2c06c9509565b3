"""Prometheus metrics and logging, declared once and injected where used."""
