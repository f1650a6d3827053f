"""The HTTP client to registries (client.py: endpoints, TLS, timeouts,
redirects, rate floor, connection pool limits; health.py: which registries
are down, probed until they answer) and registry auth (auth.py: challenge
parsing, token exchange and cache, dummy tokens; challenges.py: the
challenges kept to replay while a host is down). In a cluster, the other
nodes as upstreams: peers.py asks a digest's owner through nginx's ring,
members.py says who is on the ring (a DNS name's addresses) and what
share each owns.

May import: cr_proxy.oci, cr_proxy.net, cr_proxy.cache.layout (checked
domains), cr_proxy.cache.store (the kept challenges), cr_proxy.config,
cr_proxy.errors, cr_proxy.metrics (health.py counts outages).
"""
