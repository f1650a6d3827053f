"""The HTTP client to registries (client.py: endpoints, TLS, timeouts,
down-host memory, redirects, rate floor, connection pool limits) and
registry auth (auth.py: challenges, token exchange and cache, dummy tokens).

May import: cr_proxy.oci, cr_proxy.net, cr_proxy.cache.layout (checked
domains), cr_proxy.config, cr_proxy.errors.
"""
