"""The CONNECT front that https_proxy clients talk to: the sans-IO request
parser and decision (connect.py), the ClientHello parser (tlshello.py), the
PROXY-line stamp (stamp.py), the splice relay (relay.py), the leaf
certificates from our CA (certs.py) and the asyncio server that ties them
together (server.py).

May import: cr_proxy.net, cr_proxy.oci, cr_proxy.config, cr_proxy.errors;
server.py also cr_proxy.upstream.client (its policy-checking resolver) and
cr_proxy.cache.layout (whether a host has cached content).
"""
