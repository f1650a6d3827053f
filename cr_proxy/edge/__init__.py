"""Edge delivery: modules (a Wasm module, or any OCI artifact's one layer)
by reference, for clients that cannot speak the registry protocol (Envoy's
remote Wasm source, devices). resolve.py turns a reference into the module
layer, through the fetcher's own cached manifest and blob paths (so it
works offline, honours tag_ttl, and costs one upstream download per
digest); http.py answers `/artifacts/...` on the mirror ports, nginx
serving the bytes from the tree; signing.py makes and checks the tokens of
signed URLs (`artifacts.signed_urls`); mqtt.py answers devices over MQTT
(Propeller's proxy protocol, `mqtt:`), chunks read from the cached blob.

May import: cr_proxy.fetch, cr_proxy.cache, cr_proxy.oci, cr_proxy.config,
cr_proxy.errors.
"""
