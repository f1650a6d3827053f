"""OCI knowledge, pure (no I/O): Docker's reference grammar and digests
(reference.py); manifests and indexes: media types, what they name,
platforms, attestations, foreign layers, size and nesting limits
(manifest.py); tag list queries and pages (tags.py); referrers indexes
and the tag schema (referrers.py).

Owns: what a name, tag, digest or manifest may be, and what a manifest names.
May import: cr_proxy.errors only.
"""
