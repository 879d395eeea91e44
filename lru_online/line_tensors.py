"""What a dataclass of per-line tensors (dimension 0: the line) needs to be carried line by line:
one line taken out, lines put together, stored under a prefix beside another state's tensors
in one record and read back."""

from __future__ import annotations

from dataclasses import fields
from typing import ClassVar, Self

import torch

from lru_online import codec


class LineTensors:
    """Mixin for a dataclass whose fields are all tensors of B lines. `DTYPE`: what the fields
    are read back as; `KIND`: how errors name the state."""

    DTYPE: ClassVar[torch.dtype]
    KIND: ClassVar[str]

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {field.name: getattr(self, field.name) for field in fields(self)}

    def select(self, index: int) -> Self:
        """Line `index` alone (B = 1), copied."""
        return type(self)(**{name: tensor[index : index + 1].clone() for name, tensor in self._tensors().items()})

    def place(self, lines: list[int], other: Self) -> Self:
        """A copy with the given lines replaced by `other`'s rows, in order (len(lines) of them)."""
        index = torch.as_tensor(lines, dtype=torch.long)
        replaced = {}
        for name, tensor in self._tensors().items():
            tensor = tensor.clone()
            tensor[index] = getattr(other, name).to(tensor.dtype)
            replaced[name] = tensor
        return type(self)(**replaced)

    @classmethod
    def cat(cls, states: list[Self]) -> Self:
        if not states:
            raise ValueError(f"{cls.__name__}.cat needs at least one state")
        names = [field.name for field in fields(cls)]
        return cls(**{name: torch.cat([getattr(state, name) for state in states]) for name in names})

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """The state's tensors under `prefix`, to be stored beside another state's (one line's
        forecaster state: the model's, the mixture's and its members' in one record)."""
        return {prefix + name: tensor for name, tensor in self._tensors().items()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str) -> Self | None:
        """What `tensors(prefix)` stored, or None where nothing was."""
        names = [field.name for field in fields(cls)]
        if not any(prefix + name in tensors for name in names):
            return None
        if not all(prefix + name in tensors for name in names):
            raise codec.CodecError(f"{cls.KIND} under {prefix!r} lacks some of {names}")
        return cls(**{name: tensors[prefix + name].to(cls.DTYPE) for name in names})
