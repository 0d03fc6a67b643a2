"""The pass registry: name -> (pass class, options schema, description).

A registry is an ordinary object, not a global: `default_registry()` builds the one with optc's
passes, and tests can build their own.

An entry either is a pass (`pass_class`) or expands into passes (`expand`: options -> a list of
(pass class, options)); the latter keeps earlier config names working while every pass does one
job.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from optc.errors import OptcError


@dataclass(frozen=True)
class PassEntry:
    name: str
    pass_class: type | None    # constructed as pass_class(options, context)
    options_model: type        # a pydantic model (subclass of optc.config.PassOptions)
    summary: str
    lossy: bool = False
    expand: Callable | None = None  # for a config name that stands for other passes

    def passes(self, options) -> list[tuple[type, object]]:
        """The (pass class, options) pairs this entry runs with these options."""
        if self.expand is not None:
            return self.expand(options)
        return [(self.pass_class, options)]

    def declared_perplexity_budget(self, options) -> float | None:
        declared = [c.declared_perplexity_budget(o) for c, o in self.passes(options)]
        declared = [d for d in declared if d is not None]
        return sum(declared) if declared else None


class PassRegistry:
    def __init__(self, entries=()):
        self._entries: dict[str, PassEntry] = {}
        for e in entries:
            self.add(e)

    def add(self, entry: PassEntry) -> None:
        if entry.name in self._entries:
            raise ValueError(f"pass {entry.name!r} registered twice")
        self._entries[entry.name] = entry

    def names(self) -> list[str]:
        return sorted(self._entries)

    def get(self, name: str, where: str = "pass") -> PassEntry:
        try:
            return self._entries[name]
        except KeyError:
            raise OptcError(f"{where}: unknown pass {name!r} (known: {', '.join(self.names()) or 'none'})") from None

    def __iter__(self):
        return iter(self._entries[n] for n in self.names())


def default_registry() -> PassRegistry:
    from optc.passes import ALL_PASSES

    return PassRegistry(ALL_PASSES)
