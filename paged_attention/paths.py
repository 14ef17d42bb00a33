"""Path resolution of `PagedAttention` (interface.py): which of a backend's paths runs a step.

`path="auto"` is $PAGED_ATTENTION_PATH when set, else the backend's `PathSelector` (selector.py);
either way the choice then steps around a path that lacks a feature of the step's variant
(ADR 0010), cannot read its pools' KV format (ADR 0011) or cannot handle its geometry. An
explicit path is checked and refused by name. Backends override the reasons and `_auto_path`.
"""
from __future__ import annotations

import functools

from . import settings
from .errors import UnsupportedPath
from .validation import PLAIN, PoolSpec, StepArgs


class PathResolution:
    """Mixin of `PagedAttention` (which defines `name`, `device`, `paths`, `variants`,
    `kv_formats` and the per-instance `_resolved_paths` memo read here). Users subclass
    `PagedAttention`, never this."""

    @property
    def known_paths(self) -> tuple[str, ...]:
        """Every path this backend has on some device; `paths` is the subset usable here."""
        return self.paths

    def paths_reading(self, kv_dtype: str | None) -> tuple[str, ...]:
        """The paths available here that read pools of `kv_dtype` (None: plain pools, all)."""
        return self.paths if kv_dtype is None else \
            tuple(p for p in self.paths if kv_dtype in self.kv_formats.get(p, ()))

    def path_unavailable_reason(self, path: str) -> str | None:
        """None when `path` runs here, else why not (used for errors and test skips)."""
        if path in self.paths:
            return None
        return f"path {path!r} is not available on backend {self.name!r} (device {self.device})"

    def shape_unsupported_reason(self, path: str, spec: PoolSpec) -> str | None:
        """None when `path` (available here) handles pools of this geometry, else why not
        (e.g. a kernel limited to some head dims). 'auto' never picks such a path."""
        return None

    def resolve_path(self, path: str, args: StepArgs, spec: PoolSpec, *more: PoolSpec) -> str:
        """'auto' -> $PAGED_ATTENTION_PATH if set, else the selector's choice (moved to the first
        path that handles every given pool geometry); explicit paths are checked."""
        chosen = settings.get().path if path == "auto" else path
        if not chosen:   # the selector looks at the step itself
            return self._resolve_path(path, args, spec, *more)
        # Decided by names, geometry and variant alone: once per combination (plan() runs every
        # step).
        key = (chosen, spec, more, self.paths,
               () if args.variant is PLAIN else args.variant.features())
        hit = self._resolved_paths.get(key)
        if hit is None:
            hit = self._resolved_paths[key] = self._resolve_path(chosen, args, spec, *more)
        return hit

    def _resolve_path(self, path: str, args: StepArgs, spec: PoolSpec, *more: PoolSpec) -> str:
        auto = False
        if path == "auto":
            path = settings.get().path
            if not path:
                path, auto = self._auto_path(args, spec), True
        if path not in self.paths:
            why = self.path_unavailable_reason(path) if path in self.known_paths else \
                f"unknown path {path!r} for backend {self.name!r}"
            raise UnsupportedPath(f"{why}; available paths: {self.paths}")

        feats = () if args.variant is PLAIN else args.variant.features()
        specs = (spec, *more)
        # Depends on names, geometries and features alone: memoised (plan() with path="auto"
        # asks every step).
        memo = self.__dict__.setdefault("_unsupported_memo", {})

        def unsupported(p):
            key = (p, specs, feats)
            if key not in memo:
                memo[key] = self._why_unsupported(p, specs, feats)
            return memo[key]
        why = unsupported(path)
        if why and auto:
            path = next((p for p in self.paths if not unsupported(p)), path)
            why = unsupported(path)
        if why:
            raise UnsupportedPath(why)
        return path

    def _why_unsupported(self, p: str, specs: tuple, feats: tuple) -> str | None:
        """Why path p cannot run a step of these pool geometries with these features, or None."""
        missing = tuple(f for f in feats if f not in self.variants.get(p, ()))
        if missing:
            return self._variant_reason(p, missing)
        fmt = next((s.kv_dtype for s in specs if s.kv_dtype is not None and
                    s.kv_dtype not in self.kv_formats.get(p, ())), None)
        if fmt is not None:
            return (f"path {p!r} of backend {self.name!r} does not read kv_dtype {fmt!r} "
                    f"pools; paths that do: {self.paths_reading(fmt)}")
        return next(filter(None, (self.shape_unsupported_reason(p, s) for s in specs)), None)

    def _variant_reason(self, path: str, features) -> str:
        return (f"path {path!r} of backend {self.name!r} does not implement "
                f"{', '.join(features)}; paths that do: "
                f"{[p for p in self.paths if set(features) <= set(self.variants.get(p, ()))]}")

    def _auto_path(self, args: StepArgs, spec: PoolSpec) -> str:
        return self.selector.choose(args, spec)

    @functools.cached_property
    def selector(self):
        """This instance's PathSelector (paged_attention.selector): path="auto" decisions."""
        from .selector import PathSelector
        return PathSelector(self.name, self.device, self.paths)
