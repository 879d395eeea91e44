"""The recurrent state a model carries from one batch of events to the next."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lru_online import codec


@dataclass
class RecurrentState:
    """Per-layer LRU states (each (B, N) complex) and the last forecast (B, horizon, targets).

    The last forecast is carried so that the first event of the next batch is scored against
    the forecast made for it at the end of the previous batch.
    """

    hidden: list[torch.Tensor]
    last_forecast: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.hidden[0].shape[0]

    def detach(self) -> RecurrentState:
        forecast = self.last_forecast.detach() if self.last_forecast is not None else None
        return RecurrentState([h.detach() for h in self.hidden], forecast)

    def to(self, device: torch.device | str) -> RecurrentState:
        forecast = self.last_forecast.to(device) if self.last_forecast is not None else None
        return RecurrentState([h.to(device) for h in self.hidden], forecast)

    def unbind(self) -> list[RecurrentState]:
        """Splits a batched state into one state of batch size 1 per row."""
        return [self.select(index) for index in range(self.batch_size)]

    def select(self, index: int) -> RecurrentState:
        return self.select_rows(slice(index, index + 1))

    def select_rows(self, rows: torch.Tensor | slice | list[int]) -> RecurrentState:
        """The states of the given rows, in that order."""
        forecast = self.last_forecast[rows] if self.last_forecast is not None else None
        return RecurrentState([h[rows] for h in self.hidden], forecast)

    def place(self, rows: list[int], other: RecurrentState) -> RecurrentState:
        """A copy with the given rows replaced by `other`'s, in order; rows `other` carries no
        forecast for keep this state's."""
        index = torch.as_tensor(rows, dtype=torch.long)

        def replaced(mine: torch.Tensor, theirs: torch.Tensor) -> torch.Tensor:
            out = mine.clone()
            out[index] = theirs.to(out.dtype)
            return out

        hidden = [replaced(mine, theirs) for mine, theirs in zip(self.hidden, other.hidden, strict=True)]
        forecast = self.last_forecast
        if forecast is not None and other.last_forecast is not None:
            forecast = replaced(forecast, other.last_forecast)
        return RecurrentState(hidden, forecast)

    @staticmethod
    def cat(states: list[RecurrentState]) -> RecurrentState:
        """Stacks states along the batch axis (the inverse of `unbind`)."""
        if not states:
            raise ValueError("RecurrentState.cat needs at least one state")
        layers = len(states[0].hidden)
        if any(len(s.hidden) != layers for s in states):
            raise ValueError("RecurrentState.cat: states have different numbers of layers")
        hidden = [torch.cat([s.hidden[i] for s in states]) for i in range(layers)]
        has_forecast = [s.last_forecast is not None for s in states]
        if any(has_forecast) and not all(has_forecast):
            raise ValueError("RecurrentState.cat: some states carry a forecast and others do not")
        forecast = torch.cat([s.last_forecast for s in states]) if all(has_forecast) else None
        return RecurrentState(hidden, forecast)

    def _record(self, beside: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        tensors = {f"hidden.{i}": h for i, h in enumerate(self.hidden)}
        if self.last_forecast is not None:
            tensors["last_forecast"] = self.last_forecast
        if beside:
            clash = set(beside) & set(tensors)
            if clash:
                raise ValueError(f"RecurrentState: {sorted(clash)} are the state's own tensors")
            tensors |= beside
        return tensors

    def to_bytes(self, beside: dict[str, torch.Tensor] | None = None) -> bytes:
        """The state's bytes; `beside`: more tensors of the same line's forecaster stored with
        it (a mixture's, lru_online.mixture), which `from_bytes` leaves alone."""
        return codec.encode(self._record(beside), {"kind": "RecurrentState", "layers": len(self.hidden)})

    def lines_to_bytes(self, beside: dict[str, torch.Tensor] | None = None) -> list[bytes]:
        """Each row's `to_bytes(beside=...)` (`beside`: tensors of B rows), written at once."""
        return codec.encode_lines(self._record(beside), {"kind": "RecurrentState", "layers": len(self.hidden)})

    @classmethod
    def from_bytes(cls, data: bytes) -> RecurrentState:
        return cls.from_decoded(*codec.decode(data))

    @classmethod
    def from_decoded(cls, tensors: dict[str, torch.Tensor], meta: dict) -> RecurrentState:
        """The state in a record `codec.decode` already read (whose other tensors, stored
        `beside` it, a caller may read too)."""
        layers = meta.get("layers")
        if meta.get("kind") != "RecurrentState" or not isinstance(layers, int) or layers < 1:
            raise codec.CodecError("state bytes do not hold a RecurrentState")
        try:
            hidden = [tensors[f"hidden.{i}"] for i in range(layers)]
        except KeyError as missing:
            raise codec.CodecError(f"state bytes lack tensor {missing}") from None
        if any(h.dim() != 2 or not h.is_complex() for h in hidden):
            raise codec.CodecError("state bytes hold a hidden state that is not a complex (B, N) tensor")
        return cls(hidden, tensors.get("last_forecast"))
