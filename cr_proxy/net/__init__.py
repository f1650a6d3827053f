"""Where cr-proxy may connect, pure (no I/O): host, port, address and URL
parsing (address.py, one function per question) and the destination policy
(policy.py) that the CONNECT front, the fetcher and the upstream resolver
all apply.

Owns: the wall against using cr-proxy as a doorway into the LAN (SSRF).
May import: cr_proxy.oci, cr_proxy.errors (and cr_proxy.config for types).
"""
