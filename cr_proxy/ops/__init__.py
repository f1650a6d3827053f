"""What operators run beside serving: `cr-proxy warm` (warm.py the walk and
summary, fetcher_client.py the fetcher it asks, progress.py what it shows), the
background tag refresh (refresh.py), the usage feed read from nginx's log
for metrics and eviction (usage.py), log rotation (logs.py), the URL
`cr-proxy artifact-url` prints (artifact_url.py), and what
`ls|du|rm|verify` print (report.py).

May import: cr_proxy.edge, cr_proxy.fetch, cr_proxy.cache, cr_proxy.upstream, cr_proxy.oci,
cr_proxy.config, cr_proxy.errors, cr_proxy.metrics.
"""
