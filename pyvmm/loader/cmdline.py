"""Building the kernel command line (Documentation/admin-guide/kernel-parameters.rst: space-separated
``key`` or ``key=value`` words, double quotes around values with spaces, ``--`` ends the kernel's
parameters and passes the rest to init).  The result is handed to the boot-params writer as bytes,
without the terminating NUL."""

from __future__ import annotations

from pyvmm.errors import LoaderError


def _key(word: str) -> str:
    return word.split("=", 1)[0]


class Cmdline:
    """An ordered list of command-line words with a length limit (excluding the NUL)."""

    def __init__(self, max_len: int) -> None:
        """``max_len``: the architecture's limit in bytes, without the NUL (x86: the kernel's
        ``cmdline_size``; arm64: COMMAND_LINE_SIZE - 1)."""
        self.max_len = max_len
        self._words: list[str] = []
        self._init_args: list[str] = []

    @staticmethod
    def _check(text: str) -> None:
        if "\0" in text or "\n" in text or "\r" in text:
            raise LoaderError(f"kernel command line argument {text!r} contains a NUL or newline")
        if not text.isascii():
            raise LoaderError(f"kernel command line argument {text!r} is not ASCII")

    def _fits(self, words: list[str], init_args: list[str]) -> None:
        n = len(self._render(words, init_args))
        if n > self.max_len:
            raise LoaderError(f"kernel command line would be {n} bytes; the limit is {self.max_len}")

    @staticmethod
    def _render(words: list[str], init_args: list[str]) -> str:
        return " ".join(words + (["--", *init_args] if init_args else []))

    def has(self, key: str) -> bool:
        """Whether a kernel parameter ``key`` (or ``key=...``) is present (init arguments excluded)."""
        return any(_key(w) == key for w in self._words)

    def value(self, key: str) -> str | None:
        """The value of the last ``key=value`` word (the one the kernel acts on), without quotes; None when
        ``key`` is absent or has no value."""
        for word in reversed(self._words):
            k, sep, v = word.partition("=")
            if k == key:
                return v.strip('"') if sep else None
        return None

    def add(self, key: str, value: str | int | None = None, *, if_absent: bool = False) -> Cmdline:
        """Append ``key`` or ``key=value``; with ``if_absent``, only when ``key`` is not there yet."""
        if not key or "=" in key or any(c.isspace() for c in key) or '"' in key:
            raise LoaderError(f"bad kernel parameter name {key!r}")
        if if_absent and self.has(key):
            return self
        word = key
        if value is not None:
            v = str(value)
            if '"' in v:
                raise LoaderError(f"kernel parameter {key}: value {v!r} contains a double quote")
            word = f'{key}="{v}"' if any(c.isspace() for c in v) else f"{key}={v}"
        self._check(word)
        self._fits([*self._words, word], self._init_args)
        self._words.append(word)
        return self

    def extend(self, text: str) -> Cmdline:
        """Append a user-written command line verbatim (words after ``--`` go to init)."""
        self._check(text)
        words = text.split()
        if "--" in words:
            i = words.index("--")
            words, init = words[:i], words[i + 1 :]
        else:
            init = []
        self._fits([*self._words, *words], [*self._init_args, *init])
        self._words.extend(words)
        self._init_args.extend(init)
        return self

    def __str__(self) -> str:
        return self._render(self._words, self._init_args)

    def __len__(self) -> int:
        return len(str(self))

    def to_bytes(self) -> bytes:
        return str(self).encode("ascii")
