"""Fake collaborators for tests: real aiohttp apps with knobs, never mocks."""
