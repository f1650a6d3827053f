"""OCI knowledge, pure (no I/O): Docker's reference grammar, digests,
media types and the manifest rules (reference.py).

Owns: what a name, tag, digest or manifest media type may be.
May import: cr_proxy.errors only.
"""
