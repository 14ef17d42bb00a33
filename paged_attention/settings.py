"""Every environment variable the package reads, under the one prefix PAGED_ATTENTION_, parsed
once into an immutable `Settings` (README, "Settings" table).

The core declares its own knobs here; each backend declares its knobs next to its code
(`backends/<name>/settings.py`, imported by the backend package) with `declare(Knob(...))`, so
this module names no backend. Code reads `settings.get().<field>`; the environment is read once,
when the settings are loaded, so hot paths never touch `os.environ`. Tests change settings with
`settings.override(field=value)` (a context manager), or `settings.reload()` after editing the
environment.
`readme_table()` renders the README table from the declarations (tests/units/test_layout.py
checks that they agree).
"""
from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

from .errors import InvalidInput

PREFIX = "PAGED_ATTENTION_"


@dataclass(frozen=True)
class Knob:
    """One setting: attribute `field` of `Settings`, read from $PAGED_ATTENTION_<env>.

    kind      int, float or str: how the variable's text is parsed
    default   the value when the variable is unset or empty (None: "decide at run time")
    doc       what it does (the README table's "effect" column)
    shown     the README "default" column when the literal default says too little
              (e.g. "heuristic", "from `devices.py`")
    """

    field: str
    env: str
    kind: type
    default: Any
    doc: str
    shown: str | None = None

    @property
    def variable(self) -> str:
        return PREFIX + self.env

    def parse(self, raw: str):
        try:
            return self.kind(raw)
        except ValueError:
            raise InvalidInput(f"${self.variable}: expected {self.kind.__name__}, got {raw!r}") from None

    def readme_row(self) -> str:
        shown = self.shown if self.shown is not None else \
            "unset" if self.default in (None, "") else f"`{self.default}`"
        return f"| `{self.variable}` | {shown} | {self.doc} |"


_KNOBS: dict[str, Knob] = {}   # field -> Knob, in declaration order


def declare(*knobs: Knob) -> None:
    """Make knobs readable as `get().<field>`. A field or variable declared twice with a
    different meaning is a programming error; re-declaring the same knob (a module reloaded)
    is harmless."""
    with _lock:
        for k in knobs:
            if k.kind not in (int, float, str):
                raise TypeError(f"knob {k.field}: kind must be int, float or str, got {k.kind!r}")
            clash = [o for o in _KNOBS.values() if (o.field == k.field or o.env == k.env) and o != k]
            if clash:
                raise ValueError(f"knob {k.field} (${k.variable}) clashes with {clash[0]}")
            _KNOBS[k.field] = k


def declared() -> tuple[Knob, ...]:
    """Every knob declared so far (the backends' once their packages are imported)."""
    return tuple(_KNOBS.values())


class Settings:
    """The values of every declared knob. Immutable; a knob declared after the settings were
    loaded (its backend imported later) is parsed on first read from the same snapshot of the
    environment, so the order of imports never changes a value."""

    __slots__ = ("_env", "_hash", "__dict__")

    def __init__(self, _env: Mapping[str, str] | None = None, **values):
        object.__setattr__(self, "_env", dict(_env or {}))
        object.__setattr__(self, "_hash", None)
        for name, value in values.items():
            if name not in _KNOBS:
                raise InvalidInput(f"unknown setting {name!r}; declared settings: {sorted(_KNOBS)}")
            self.__dict__[name] = value

    @classmethod
    def load(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        """Parse the PAGED_ATTENTION_* variables of `environ` (default: os.environ); every knob
        declared by now is parsed here, so a bad value fails at once."""
        env = os.environ if environ is None else environ
        s = cls({k: v for k, v in env.items() if k.startswith(PREFIX)})
        for field in list(_KNOBS):
            getattr(s, field)
        return s

    def __getattr__(self, name: str):
        knob = _KNOBS.get(name)
        if knob is None:
            raise AttributeError(f"no setting {name!r}; declared settings: {sorted(_KNOBS)}")
        raw = self._env.get(knob.variable, "").strip()
        value = knob.parse(raw) if raw else knob.default
        self.__dict__[name] = value
        return value

    def __setattr__(self, name, value):
        raise AttributeError("Settings are immutable; use settings.override(...)")

    def replace(self, **changes) -> "Settings":
        new = Settings(self._env, **changes)
        for name, value in self.__dict__.items():
            new.__dict__.setdefault(name, value)
        return new

    def _values(self) -> dict:
        return {f: getattr(self, f) for f in _KNOBS}

    def __eq__(self, other) -> bool:
        return self is other or (isinstance(other, Settings) and self._values() == other._values())

    def __hash__(self) -> int:
        # Settings key caches of per-geometry decisions (backends/mlx/fused.py): hashed once.
        if self._hash is None:
            object.__setattr__(self, "_hash", hash(tuple(self._values().items())))
        return self._hash

    def __repr__(self) -> str:
        return "Settings(" + ", ".join(f"{k}={v!r}" for k, v in self._values().items()) + ")"


_lock = threading.RLock()
_current: Settings | None = None

declare(
    Knob("path", "PATH", str, None, "force `path=\"auto\"` to this path on every backend"),
    Knob("selector_dir", "SELECTOR_DIR", str, None, "where calibration tables are read and written",
         shown="`${XDG_CACHE_HOME:-~/.cache}/paged-attention/selector`"),
    Knob("tuning_table", "TUNING_TABLE", str, None,
         "the per-device tuning table the fused kernels read (`paged-attn tune --write` writes it)",
         shown="the shipped `paged_attention/tuning.json`"),
    Knob("tuning_device", "TUNING_DEVICE", str, None,
         "the tuning table's row to use (a `devices.py` key) instead of the device's own",
         shown="the device's `devices.py` key"),
)


def get() -> Settings:
    """The process's settings, parsed from the environment on first use."""
    global _current
    s = _current
    if s is None:
        with _lock:
            if _current is None:
                _current = Settings.load()
            s = _current
    return s


def reload() -> Settings:
    """Parse the environment again (after a test or a launcher changed it)."""
    global _current
    with _lock:
        _current = Settings.load()
        return _current


@contextlib.contextmanager
def override(**changes) -> Iterator[Settings]:
    """Within the block, `get()` returns the current settings with `changes` applied; an
    undeclared name raises InvalidInput."""
    global _current
    before = get()
    with _lock:
        _current = before.replace(**changes)
    try:
        yield _current
    finally:
        with _lock:
            _current = before


def readme_table() -> str:
    """The README "Settings" table rows of every declared knob, in declaration order."""
    return "\n".join(k.readme_row() for k in _KNOBS.values())

