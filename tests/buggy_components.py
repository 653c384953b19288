"""Components with an injected bug, for tests that check a bug is never reported as a user error."""


def broken_attention(q, k, v, causal=True, scale=None):
    raise RuntimeError("injected bug in an attention implementation")


class BrokenComponent:
    def __init__(self, size: int = 1):
        raise KeyError("injected bug in a constructor")
