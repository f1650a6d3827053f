"""The HTTP client to registries (client.py: endpoints, TLS, timeouts,
redirects, rate floor, connection pool limits; health.py: which registries
are down, probed until they answer) and registry auth (auth.py: challenge
parsing, token exchange and cache, dummy tokens; challenges.py: the
challenges kept to replay while a host is down).

May import: cr_proxy.oci, cr_proxy.net, cr_proxy.cache.layout (checked
domains), cr_proxy.cache.store (the kept challenges), cr_proxy.config,
cr_proxy.errors, cr_proxy.metrics (health.py counts outages).
"""
