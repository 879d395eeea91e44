"""Reservoir replay of past training windows (Vitter's algorithm R).

Every window ever offered has the same chance capacity/seen of being held, so the buffer is a
uniform sample of the whole stream, old regimes included.
"""

from __future__ import annotations

import torch

Window = dict[str, torch.Tensor]


class ReservoirReplay:
    def __init__(self, capacity: int, seed: int = 0) -> None:
        if capacity < 0:
            raise ValueError(f"replay capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self.seen = 0
        self.windows: list[Window] = []
        self._generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.windows)

    def _randint(self, high: int) -> int:
        return int(torch.randint(high, (1,), generator=self._generator))

    def add(self, window: Window) -> None:
        self.seen += 1
        if self.capacity == 0:
            return
        if len(self.windows) < self.capacity:
            self.windows.append(_copied(window))
            return
        # The slot is drawn before anything is copied: once the reservoir is full, most
        # windows are not kept (a fleet offers thousands per file).
        slot = self._randint(self.seen)
        if slot < self.capacity:
            self.windows[slot] = _copied(window)

    def sample(self, count: int) -> list[Window]:
        if not self.windows or count <= 0:
            return []
        picks = torch.randperm(len(self.windows), generator=self._generator)[:count]
        return [self.windows[int(i)] for i in picks]

    def state_dict(self) -> dict:
        """Windows that share their fields and shapes are stacked field by field: a checkpoint
        then holds a dozen tensors instead of thousands, and saves and loads in milliseconds."""
        state = {"capacity": self.capacity, "seen": self.seen, "generator": self._generator.get_state()}
        fields = {tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(w.items())) for w in self.windows}
        if len(fields) == 1:
            keys = sorted(self.windows[0])
            state["stacked"] = {key: torch.stack([w[key] for w in self.windows]) for key in keys}
        else:
            state["windows"] = [dict(w) for w in self.windows]
        return state

    def load_state_dict(self, state: dict) -> None:
        self.capacity = int(state["capacity"])
        self.seen = int(state["seen"])
        self._generator.set_state(state["generator"])
        if "stacked" in state:
            stacked = state["stacked"]
            count = len(next(iter(stacked.values())))
            self.windows = [{key: values[i] for key, values in stacked.items()} for i in range(count)]
        else:
            self.windows = [dict(w) for w in state["windows"]]


def _copied(window: Window) -> Window:
    """The window's own copy, detached from the batch it was cut from."""
    return {key: value.detach().clone() for key, value in window.items()}
