"""The HTTP engine: the client-facing HTTP/1.1 server, upstream connection pools, write coalescing,
TLS and upstream URLs. It imports nothing else of shadowproxy.
"""
