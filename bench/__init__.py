"""`make bench`: cr-proxy against a plain nginx, the upstream itself and a
CNCF distribution registry in proxy mode, all on loopback (see bench/run.py)."""
