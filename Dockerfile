# cr-proxy in a container: `cr-proxy serve` runs nginx, the fetcher and the
# CONNECT front together. Build from the repository root:
#   docker build -t cr-proxy .
# docker-compose.yml builds and runs it with its volumes; README "Deployment".
# The image build is not exercised in CI (no Docker engine there);
# tests/test_deploy.py checks this file statically.

# Debian bookworm: the same nginx and njs packages `make serve` and the test
# suite use, so the image runs what was tested.
FROM debian:bookworm-slim

# nginx serves hits and ends TLS; libnginx-mod-http-js runs nginx/cr.js;
# python3-venv because bookworm's Python refuses pip outside a venv (PEP 668);
# ca-certificates so the fetcher (and pip, below) can verify upstream TLS:
# without recommends nothing else pulls it in. No recommends and no package
# lists keep the image small; nothing later runs apt.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        nginx libnginx-mod-http-js python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# A dedicated user, not root: every port is unprivileged, so nothing needs
# root, and nginx (started by a non-root cr-proxy) emits no `user` directive:
# its workers run as cr-proxy too (cr_proxy/nginx.py, user_line). A fixed
# uid/gid, so Kubernetes can name them (deploy/kubernetes: runAsUser, and
# fsGroup, which makes the cache volume writable).
RUN groupadd --system --gid 10001 cr-proxy \
    && useradd --system --uid 10001 --gid cr-proxy --home-dir /var/lib/cr-proxy \
        --shell /usr/sbin/nologin cr-proxy

# The code at /opt/cr-proxy, templates beside the package: cr_proxy/nginx.py
# finds them at Path(cr_proxy.__file__).parent.parent / "nginx".
# README.md because pyproject.toml names it as the package's readme.
WORKDIR /opt/cr-proxy
COPY pyproject.toml README.md ./
COPY cr_proxy/ cr_proxy/
COPY nginx/ nginx/

# An editable install, so cr_proxy is imported from /opt/cr-proxy/cr_proxy
# and finds /opt/cr-proxy/nginx; a regular install would copy the package
# into site-packages, away from its templates. The byte-code is compiled now
# because cr-proxy cannot write to /opt at run time. The last command fails
# the build if the templates ever stop being found.
RUN python3 -m venv /opt/cr-proxy/.venv \
    && /opt/cr-proxy/.venv/bin/pip install --no-cache-dir -e /opt/cr-proxy \
    && /opt/cr-proxy/.venv/bin/python -m compileall -q /opt/cr-proxy/cr_proxy \
    && /opt/cr-proxy/.venv/bin/python -c \
        "from cr_proxy.nginx import TEMPLATE_DIR as t; assert (t / 'nginx.conf').is_file(), t"

# cr-proxy (and its python) first on PATH: `docker compose exec cr-proxy
# cr-proxy ca` works without a full path.
ENV PATH=/opt/cr-proxy/.venv/bin:$PATH

# The paths again as variables: they are what deploy/cr-proxy.yml says, and
# commands run without --config (`cr-proxy ca` through exec) find the same
# CA and cache. A CR_PROXY_* variable overrides the file.
ENV CR_PROXY_CACHE_DIR=/var/cache/cr-proxy \
    CR_PROXY_CERTS_DIR=/var/lib/cr-proxy/certs \
    CR_PROXY_RUN_DIR=/run/cr-proxy

# The cache, the CA, the run directory and the working directory belong to
# cr-proxy; named volumes mounted here start with that ownership. (Nothing
# else is written: Debian's nginx logs to stderr until it reads cr-proxy's
# configuration, which logs to stderr too.)
RUN install -d -o cr-proxy -g cr-proxy -m 0750 \
        /var/cache/cr-proxy /var/lib/cr-proxy /var/lib/cr-proxy/certs /run/cr-proxy

# The example configuration at the path CMD names (mount yours over it), and
# a build that fails on a configuration cr-proxy would refuse at start.
COPY deploy/cr-proxy.yml /etc/cr-proxy/cr-proxy.yml
RUN cr-proxy config --config /etc/cr-proxy/cr-proxy.yml > /dev/null

# The cache and the CA outlive the container even without compose's named
# volumes: clients trust this CA, and the cache is the point.
VOLUME ["/var/cache/cr-proxy", "/var/lib/cr-proxy/certs"]

USER cr-proxy
# Relative paths in a mounted configuration land in cr-proxy's own directory.
WORKDIR /var/lib/cr-proxy

# https_proxy (CONNECT front), mirror over HTTP, mirror over TLS.
EXPOSE 3128 5000 5443

# nginx answers GET /v2/ on the HTTP mirror port itself (the serving path),
# and serve's own event loop, the fetcher's, answers /metrics: a stuck
# fetcher (every miss hanging) fails the check too. Neither touches an
# upstream. Python rather than curl: it is already in the image. No proxy:
# an HTTP(S)_PROXY given to the container must not catch the check.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python3", "-c", "import urllib.request as u; o = u.build_opener(u.ProxyHandler({})); [o.open(p, timeout=2) for p in ('http://127.0.0.1:5000/v2/', 'http://127.0.0.1:9180/metrics')]"]

# serve stops cleanly on SIGTERM: nginx gets SIGQUIT and up to 10 s to finish
# requests in flight (give `docker stop` more than that: compose says 15 s).
STOPSIGNAL SIGTERM
CMD ["cr-proxy", "serve", "--config", "/etc/cr-proxy/cr-proxy.yml"]
