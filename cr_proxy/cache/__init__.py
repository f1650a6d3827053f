"""The cache tree on disk, the only code that writes it.

- layout.py: wire names and keys -> paths under cache_dir and back (pure;
  the tree is drawn in its docstring);
- scan.py: the walkers over the tree, and a reader that leaves atimes alone;
- store.py: the commit protocol (temp file, hash, sidecars, rename, one
  copy per digest), reads, removals;
- image.py: an image as the cache holds it, and when it was last used;
- inventory.py: the tree read as images (`cr-proxy ls`), the door to
  diskuse.py (`du`), removal.py (`rm`, with reference counts) and
  verify.py (`verify`); ops/report.py prints their results;
- sizes.py: byte counts as people read them (every command that prints one);
- evict.py: LRU eviction under cache.max_size.

Policy: content addressed by a digest is immutable and enters the tree
only verified; tags are rewritten only by a whole, checked manifest.
May import: cr_proxy.oci, cr_proxy.net (host and URL parsing), cr_proxy.config,
cr_proxy.errors, cr_proxy.metrics.
"""
