"""The fetcher: the aiohttp app nginx hands every miss to, split by concern
as distribution's registry/proxy. app.py dispatches (make_app, the one
route, mode and Target, errors); blobs.py, manifests.py, tags.py,
referrers.py and passthrough.py each own a kind and state its cache policy
(tags.py and referrers.py the way of listings.py: stored per query, fresh
for tag_ttl, stale offline);
context.py holds what they share (FetchContext); flight.py merges
duplicate work in flight (one download per source and digest, readers tail
the growing file).

Policy (as distribution's registry/proxy): blobs and manifests by digest
are local-first and immutable; tags are upstream-first once stale, with the
stale copy served while the upstream is down; everything else is passed
through uncached or refused.
May import: cr_proxy.cache, cr_proxy.upstream, cr_proxy.net, cr_proxy.oci,
cr_proxy.front.connect (the port rule it shares with the front),
cr_proxy.config, cr_proxy.errors, cr_proxy.metrics.
"""
