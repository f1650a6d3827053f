"""The test bed: what the tests and the bench run cr-proxy against and with.

A Docker-Hub-like upstream on loopback (registry: CNCF distribution with token
auth and a CDN), OCI image layouts built in memory (oci_layout), `cr-proxy
serve` as a subprocess (crproxy) and free loopback ports (ports); and a
production-like bed (realnames) where that upstream answers as Docker Hub
by its real names over TLS on 443, inside network namespaces (netns). It imports
cr_proxy only as a command line, never its modules, and is not shipped with
the product (pyproject packages only cr_proxy).
"""
