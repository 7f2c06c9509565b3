"""Everything aiohttp: the app factory, keys, routes, handlers, blob sending,
middleware, the listener and the access log.

Translates HTTP to calls on ``mirrorproxy.pullthrough`` and back; holds no policy.
``blobsend`` is the one module that writes blob bytes to client sockets.
"""
