"""The pure core: OCI grammar, errors as data, namespaces, references, units.

No I/O and no aiohttp (a test checks the imports): what a client sends is parsed
and validated here, before anything touches the disk or the network.
"""
