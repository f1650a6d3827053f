"""The `cr-proxy` command: subcommands as data, one function each, one
error handler (tracebacks only with --debug)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Callable
from enum import IntEnum
from pathlib import Path

import yaml

from cr_proxy import config as config_mod
from cr_proxy import nginx, privsep
from cr_proxy.errors import CrProxyError
from cr_proxy.front import certs
from cr_proxy.upstream import members


class ExitStatus(IntEnum):
    OK = 0
    ERROR = 1
    USAGE = 2


def cmd_serve(conf: config_mod.Config, args: argparse.Namespace) -> ExitStatus:
    from cr_proxy.serve import serve

    return ExitStatus(asyncio.run(serve(conf, say=lambda s: print(s, flush=True))))


def cmd_config(conf: config_mod.Config, args: argparse.Namespace) -> ExitStatus:
    """Print the effective configuration, secrets masked; --check also
    renders the nginx configuration and runs nginx -t on it."""
    print(yaml.safe_dump(conf.masked(), sort_keys=False), end="")
    if args.check:
        ca = certs.ensure_ca(conf.certs_dir)
        leaf = certs.ensure_mirror_leaf(ca, conf.certs_dir, conf.mirror_names)
        conf.run_dir.mkdir(parents=True, exist_ok=True)
        conf = nginx.with_front_port(conf)
        conf, _ = members.first(conf)  # cluster.peers as a DNS name: its addresses now
        workers = privsep.pick_workers(conf)
        nginx.check(conf, nginx.render(conf, leaf.cert, leaf.key, workers=workers))
        print("# nginx configuration OK", file=sys.stderr)
    return ExitStatus.OK


def cmd_ca(conf: config_mod.Config, args: argparse.Namespace) -> ExitStatus:
    """Print the CA certificate (PEM) and its SHA-256 fingerprint."""
    pair = certs.ensure_ca(conf.certs_dir)
    print(pair.cert.read_text(), end="")
    print(f"# SHA-256 fingerprint: {certs.fingerprint(pair)}", file=sys.stderr)
    return ExitStatus.OK


def cmd_warm(conf: config_mod.Config, args: argparse.Namespace) -> ExitStatus:
    """Preload images into the cache through a fetcher (serve's, or our own):
    ERROR if one image failed (the others still complete)."""
    from cr_proxy.oci.manifest import Platform
    from cr_proxy.ops.progress import make_progress
    from cr_proxy.ops.warm import collect_images, warm

    wanted = collect_images(args.images, args.from_file)
    if not wanted:
        print("cr-proxy warm: no image given (IMAGE... or --from-file)", file=sys.stderr)
        return ExitStatus.USAGE
    if args.jobs < 1:
        print("cr-proxy warm: --jobs must be at least 1", file=sys.stderr)
        return ExitStatus.USAGE
    platforms = [Platform.parse(p) for p in args.platform or ()]
    progress = make_progress(sys.stderr, len(wanted))
    try:
        summary = asyncio.run(warm(conf, wanted, platforms, args.jobs, progress=progress,
                                   referrers=args.referrers))
    finally:
        progress.close()
    print(json.dumps(summary.as_dict(), indent=2) if args.json else summary.text(), flush=True)
    return ExitStatus.ERROR if summary.failures else ExitStatus.OK


def _warm_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="*", metavar="IMAGE", help="image references (Docker's rules)")
    p.add_argument("--from-file", type=Path, metavar="FILE",
                   help="more images, one a line ('#' comments; '-' for stdin)")
    p.add_argument("--platform", action="append", metavar="OS/ARCH[/VARIANT]",
                   help="only this platform of an index (repeatable; default: all)")
    p.add_argument("--jobs", type=int, default=4, help="requests in flight (default 4)")
    p.add_argument("--referrers", action="store_true",
                   help="also each manifest's referrers (signatures, attestations) and their "
                   "artifacts, recursively and bounded")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def cmd_artifact_url(conf: config_mod.Config, args: argparse.Namespace) -> ExitStatus:
    """Resolve a module (caching it) and print its URL and sha256."""
    from cr_proxy.ops.artifact_url import artifact_url
    from cr_proxy.serve import reached_at

    base = args.base
    if not base:
        http, https = conf.listen.mirror_http, conf.listen.mirror_https
        scheme, mirror = ("http", http) if http.enabled else ("https", https)
        base = f"{scheme}://{reached_at(mirror)}"
    found = asyncio.run(artifact_url(conf, args.reference, args.platform, base))
    print(json.dumps(found.as_dict(), indent=2) if args.json else found.text().rstrip(),
          flush=True)
    return ExitStatus.OK


def cmd_ls(conf: config_mod.Config, args: argparse.Namespace) -> ExitStatus:
    """List cached images: digest, platforms, size, state, last use."""
    from cr_proxy.cache import inventory
    from cr_proxy.cache.pins import Pins
    from cr_proxy.ops import report

    images = inventory.Inventory.from_config(conf).images()
    pinned = Pins.from_config(conf).keys()
    if args.pinned:
        images = [image for image in images if image.key in pinned]
    doc, text = report.images_document(images, pinned), report.images_table(images, pinned)
    print(report.output(doc, text, args.json))
    return ExitStatus.OK


def cmd_pin(conf: config_mod.Config, args: argparse.Namespace) -> ExitStatus:
    """Pin images: never evicted, refreshed whatever their tag (cache/pins.py).
    A serve running picks the pins up at its next pass; an image not cached
    yet is pinned all the same (`cr-proxy warm` fetches it)."""
    from cr_proxy.cache.pins import Pins
    from cr_proxy.cache.store import Store
    from cr_proxy.ops import report

    store = Store(conf.cache_dir)
    store.prepare(clean_temp=False)
    keys = Pins.from_config(conf, store).pin(args.images)
    print(report.output({"pinned": keys}, "\n".join(f"pinned {k}" for k in keys), args.json))
    return ExitStatus.OK


def cmd_unpin(conf: config_mod.Config, args: argparse.Namespace) -> ExitStatus:
    """Unpin images; one the configuration pins (cache.pins) stays pinned
    (exit status 1, naming it)."""
    from cr_proxy.cache.pins import Pins
    from cr_proxy.ops import report

    done = Pins.from_config(conf).unpin(args.images)
    doc = {"unpinned": list(done.removed), "declared": list(done.declared),
           "not_pinned": list(done.absent)}
    lines = [f"unpinned {k}" for k in done.removed]
    lines += [f"still pinned {k}: cache.pins in the configuration names it" for k in done.declared]
    lines += [f"{k} was not pinned" for k in done.absent]
    print(report.output(doc, "\n".join(lines), args.json))
    return ExitStatus.ERROR if done.declared else ExitStatus.OK


def cmd_du(conf: config_mod.Config, args: argparse.Namespace) -> ExitStatus:
    """Disk use per registry domain and in total, each blob counted once."""
    from cr_proxy.cache import inventory
    from cr_proxy.ops import report

    usage = inventory.Inventory.from_config(conf).usage()
    doc, text = report.usage_document(usage), report.usage_table(usage)
    print(report.output(doc, text, args.json))
    return ExitStatus.OK


def cmd_rm(conf: config_mod.Config, args: argparse.Namespace) -> ExitStatus:
    """Remove images, then every blob that no remaining image uses."""
    from cr_proxy.cache import inventory
    from cr_proxy.ops import report

    inv = inventory.Inventory.from_config(conf)
    # Every reference is resolved before anything is removed: a typo removes nothing.
    found = [image for text in args.images for image in inv.find(text)]
    removed = inv.remove(*found)
    doc, text = report.removed_document(removed), report.removed_text(removed)
    print(report.output(doc, text, args.json))
    return ExitStatus.OK


def cmd_verify(conf: config_mod.Config, args: argparse.Namespace) -> ExitStatus:
    """Re-hash every blob; quarantine those that fail (exit status 1)."""
    from cr_proxy.cache import inventory
    from cr_proxy.ops import report

    result = inventory.Inventory.from_config(conf).verification()
    doc, text = report.verification_document(result), report.verification_text(result)
    print(report.output(doc, text, args.json))
    return ExitStatus.ERROR if result.failures else ExitStatus.OK


def cmd_check(conf: config_mod.Config, args: argparse.Namespace) -> ExitStatus:
    """Would each image pull from the cache alone, right now? Exit 1 unless
    every one would (cache/check.py); no network is used."""
    from cr_proxy.cache import inventory
    from cr_proxy.oci.manifest import Platform
    from cr_proxy.ops import report

    wanted = [Platform.parse(p) for p in args.platform or ()]
    checked = inventory.Inventory.from_config(conf).check(args.images, wanted, args.referrers)
    doc, text = report.check_document(checked), report.check_text(checked)
    print(report.output(doc, text, args.json))
    return ExitStatus.OK if all(c.complete for c in checked) else ExitStatus.ERROR


def _inventory_arguments(name: str, p: argparse.ArgumentParser) -> None:
    if name == "ls":
        p.add_argument("--pinned", action="store_true", help="only pinned images")
    if name in ("rm", "check", "pin", "unpin"):
        p.add_argument("images", nargs="+", metavar="IMAGE",
                       help="image references (Docker's rules): name:tag or name@digest")
    if name == "check":
        p.add_argument("--platform", action="append", metavar="OS/ARCH[/VARIANT]",
                       help="check this platform of an index (repeatable; default: every "
                       "platform pulled)")
        p.add_argument("--referrers", action="store_true",
                       help="also each manifest's stored referrers and their artifacts "
                       "(what warm --referrers fetches)")
    p.add_argument("--json", action="store_true", help="print JSON (keys in ops/report.py)")


Command = Callable[[config_mod.Config, argparse.Namespace], ExitStatus]
COMMANDS: dict[str, tuple[Command, str]] = {
    "serve": (cmd_serve, "run the mirror: nginx + fetcher, until SIGTERM/SIGINT"),
    "config": (cmd_config, "print the effective configuration (secrets masked)"),
    "ca": (cmd_ca, "print the CA certificate that clients must trust"),
    "warm": (cmd_warm, "preload images into the cache (IMAGE... or --from-file)"),
    "artifact-url": (cmd_artifact_url, "print a module's URL on the mirror and its sha256"),
    "ls": (cmd_ls, "list cached images: digest, platforms, size, complete or N missing, last use"),
    "du": (cmd_du, "disk use per registry and in total, shared blobs once"),
    "rm": (cmd_rm, "remove images and the blobs no other cached image uses"),
    "verify": (cmd_verify, "re-hash every blob; quarantine corrupt ones"),
    "pin": (cmd_pin, "pin images: never evicted, refreshed whatever their tag"),
    "unpin": (cmd_unpin, "unpin images (those cache.pins names stay pinned)"),
    "check": (cmd_check, "say whether images would pull from the cache alone (no network)"),
}


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="cr-proxy", description=__doc__)
    top.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = top.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", type=Path, help="YAML file merged over the defaults")
        if name == "config":
            p.add_argument("--check", action="store_true", help="also render and nginx -t")
        if name == "warm":
            _warm_arguments(p)
        if name == "artifact-url":
            p.add_argument("reference", metavar="REF", help="registry/repository:tag or @digest")
            p.add_argument("--platform", metavar="OS/ARCH", help="an index's platform "
                           "(default: its only wasm one, or its only one)")
            p.add_argument("--base", metavar="URL", help="the mirror's URL as clients reach "
                           "it (default: listen.mirror_http's)")
            p.add_argument("--json", action="store_true", help="print JSON")
        if name in ("ls", "du", "rm", "verify", "check", "pin", "unpin"):
            _inventory_arguments(name, p)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if not args.command:
        parser().print_help(sys.stderr)
        print(f"\ncr-proxy: choose a command: {', '.join(COMMANDS)}", file=sys.stderr)
        return ExitStatus.USAGE
    try:
        conf = config_mod.load(args.config)
        logging.basicConfig(
            level=conf.log_level.upper(),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            stream=sys.stderr,
        )
        return COMMANDS[args.command][0](conf, args)
    except CrProxyError as err:
        if args.debug:
            raise
        print(f"cr-proxy: {type(err).__name__}: {err.message}", file=sys.stderr)
        return ExitStatus.ERROR
    except KeyboardInterrupt:
        return ExitStatus.ERROR
    except BrokenPipeError:
        # `cr-proxy ls | head`: the reader left. Point stdout at /dev/null so
        # the flush at exit does not raise again (Python's documented recipe).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return ExitStatus.OK
    except (OSError, UnicodeError) as err:
        # The system's word (a port taken, a directory not writable, a file
        # that is not text): it names what it is about.
        if args.debug:
            raise
        print(f"cr-proxy: {type(err).__name__}: {err}", file=sys.stderr)
        return ExitStatus.ERROR


if __name__ == "__main__":
    sys.exit(main())
