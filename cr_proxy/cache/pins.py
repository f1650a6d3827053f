"""Pinned images: never evicted (evict.py), revalidated by the background
refresh whatever their tag (ops/refresh.py), warmed at start when the
configuration names them (ops/pin_warm.py).

Two sources, one set:
- `cache.pins` in the configuration: declarative, for images a site must
  always have; `cr-proxy unpin` refuses them (edit the configuration);
- `cache/pins.json`, written by `cr-proxy pin` / `unpin` (atomically, by
  rename) and read by serve at each eviction and refresh pass, so a pin
  takes effect with no restart and no signal.

A pin is kept as the image key `ls` shows in `--json` (`<domain>/<name>:<tag>`
or `<domain>/<name>@<digest>`, Image.key): the reference resolved once, by
Docker's rules, when it is pinned.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from cr_proxy.cache.layout import resolve_domain
from cr_proxy.cache.store import Store
from cr_proxy.config import Config
from cr_proxy.oci.reference import parse_reference

log = logging.getLogger(__name__)


def pin_key(text: str, default_registry: str, registry_hosts: Mapping[str, str]) -> str:
    """The image key a reference names (BadRequest when it names none)."""
    ref = parse_reference(text, default_registry)
    domain = resolve_domain(ref.registry, dict(registry_hosts))
    return f"{domain}/{ref.name}@{ref.digest}" if ref.digest else f"{domain}/{ref.name}:{ref.tag}"


@dataclass(frozen=True, slots=True)
class Unpinned:
    removed: tuple[str, ...]
    declared: tuple[str, ...]  # in cache.pins: only the configuration unpins them
    absent: tuple[str, ...]  # were not pinned


class Pins:
    """The pinned keys of one cache."""

    __slots__ = ("declared", "default_registry", "registry_hosts", "store")

    def __init__(self, store: Store, declared: Iterable[str], default_registry: str,
                 registry_hosts: Mapping[str, str]) -> None:
        self.store = store
        self.default_registry = default_registry
        self.registry_hosts = dict(registry_hosts)
        self.declared = frozenset(self.key(text) for text in declared)

    @classmethod
    def from_config(cls, config: Config, store: Store | None = None) -> Pins:
        return cls(store or Store(config.cache_dir), config.cache.pins,
                   config.default_registry, config.registry_hosts)

    def __repr__(self) -> str:
        return f"Pins({self.store!r}, {len(self.declared)} declared)"

    def key(self, text: str) -> str:
        return pin_key(text, self.default_registry, self.registry_hosts)

    def keys(self) -> frozenset[str]:
        """Every pinned key: the configuration's and the file's."""
        return self.declared | self._saved()

    def pin(self, texts: Iterable[str]) -> list[str]:
        """Pin each reference (all checked before any is saved); their keys."""
        keys = [self.key(text) for text in texts]
        self._save(self._saved() | set(keys))
        return keys

    def unpin(self, texts: Iterable[str]) -> Unpinned:
        keys = [self.key(text) for text in texts]
        saved = self._saved()
        removed = tuple(k for k in keys if k in saved)
        declared = tuple(k for k in keys if k in self.declared and k not in saved)
        absent = tuple(k for k in keys if k not in saved and k not in self.declared)
        if removed:
            self._save(saved - set(removed))
        return Unpinned(removed, declared, absent)

    def _saved(self) -> set[str]:
        path = self.store.tree.pins_file
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            return set()
        except ValueError as err:
            # Written by rename only, so this is a hand edit: say so, pin nothing from it.
            log.warning("%s is not JSON (%s): its pins are ignored", path, err)
            return set()
        pins = doc.get("pins") if isinstance(doc, dict) else None
        return {p for p in pins if isinstance(p, str)} if isinstance(pins, list) else set()

    def _save(self, keys: set[str]) -> None:
        self.store.save_pins(keys)
