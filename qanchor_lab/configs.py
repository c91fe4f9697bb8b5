"""The to/from-dict mixin every flat dataclass config shares (in the way of peft's PeftConfigMixin).

`to_dict` gives a plain JSON-able dict (manifests and run directories store it); `from_dict` is its inverse
and names any unknown key with the valid ones, so a typo in a saved or hand-written config is a clear error.
"""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any, Mapping


class DictConfig:
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown key(s) {unknown}; valid keys: {', '.join(sorted(known))}")
        return cls(**d)
