"""The cache tree on disk, the only code that writes it.

- layout.py: wire names -> paths under cache_dir and back (pure; the tree
  is drawn in its docstring);
- store.py: the commit protocol (temp file, hash, sidecars, rename, one
  copy per digest), reads, removals;
- inventory.py: the walk behind `cr-proxy ls|du|rm|verify`;
- sizes.py: byte counts as people read them (every command that prints one);
- evict.py: LRU eviction under cache.max_size.

Policy: content addressed by a digest is immutable and enters the tree
only verified; tags are rewritten only by a whole, checked manifest.
May import: cr_proxy.oci, cr_proxy.net (host and URL parsing), cr_proxy.config,
cr_proxy.errors, cr_proxy.metrics.
"""
