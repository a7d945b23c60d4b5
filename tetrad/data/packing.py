"""Packing documents into fixed-length training windows, with no padding and no token lost."""


class TokenPacker:
    """Concatenates documents into one token stream and cuts it into disjoint windows.

    Window i is stream[i * size : (i + 1) * size], with size = seq_len + 1 so that one window gives
    both the inputs (its first seq_len tokens) and the labels (its last seq_len tokens). Windows
    share no tokens, so each token of the stream lands in exactly one window; a window may span
    several documents (they carry their own BOS/EOS). Tokens that do not yet fill a window wait in
    the carry buffer, which is the packer's whole state.
    """

    def __init__(self, size: int) -> None:
        if size < 2:
            raise ValueError(f"a window needs at least 2 tokens (one input, one label), got {size}")
        self.size = size
        self._carry: list[int] = []

    @property
    def num_windows(self) -> int:
        """Full windows ready to pop."""
        return len(self._carry) // self.size

    def add(self, tokens: list[int]) -> None:
        """Append one document to the stream."""
        self._carry.extend(tokens)

    def pop(self, n: int) -> list[list[int]]:
        """The next `n` windows of the stream."""
        if n > self.num_windows:
            raise ValueError(f"asked for {n} windows, only {self.num_windows} are full")
        end = n * self.size
        windows = [self._carry[start : start + self.size] for start in range(0, end, self.size)]
        del self._carry[:end]
        return windows

    def state_dict(self) -> dict[str, list[int]]:
        return {"carry": list(self._carry)}

    def load_state_dict(self, state: dict[str, list[int]]) -> None:
        self._carry = list(state["carry"])
