"""Tokenizers: a file-free byte-level one, a wrapper for local Hugging Face tokenizers, and
prompt tokenisation with image placeholders.

Both tokenizers share LongLLaVA's four special tokens (ids 0-3 in its vocabulary), parse
them inside text, and never add BOS themselves: the chat template writes
``<|startoftext|>`` where it belongs.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Protocol, Sequence

import tokenizers
from tokenizers import AddedToken

from .prompt import BOS_TOKEN, EOS_TOKEN, IMAGE_PLACEHOLDER, IMAGE_TOKEN_INDEX

PAD_TOKEN, UNK_TOKEN = "<|pad|>", "<|unk|>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)  # ids 0..3, in LongLLaVA's order


class Tokenizer(Protocol):
    bos_id: int
    eos_id: int
    pad_id: int
    vocab_size: int

    def encode(self, text: str) -> list[int]:
        """Ids for ``text``, special-token strings inside it included; no BOS is added."""
        ...

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str: ...


def _check_ids(ids: Sequence[int], vocab_size: int) -> list[int]:
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"token ids must lie in [0, {vocab_size}); got {bad[:5]}")
    return ids


class ByteTokenizer:
    """UTF-8 bytes as ids 4..259 after the four specials; needs no files.

    The embedded default model uses it, so the whole runtime works without downloads.
    """

    pad_id, bos_id, eos_id, unk_id = 0, 1, 2, 3
    vocab_size = len(SPECIAL_TOKENS) + 256
    _SPLIT = re.compile("(" + "|".join(map(re.escape, SPECIAL_TOKENS)) + ")")

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for k, part in enumerate(self._SPLIT.split(text)):
            if k % 2:  # the capture group: a special token
                ids.append(SPECIAL_TOKENS.index(part))
            else:
                ids += [b + len(SPECIAL_TOKENS) for b in part.encode("utf-8")]
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """Invalid UTF-8 decodes to U+FFFD rather than failing: a model can emit any bytes."""
        out, pending = [], bytearray()
        for i in _check_ids(ids, self.vocab_size):
            if i >= len(SPECIAL_TOKENS):
                pending.append(i - len(SPECIAL_TOKENS))
                continue
            out.append(pending.decode("utf-8", errors="replace"))
            pending.clear()
            if not skip_special:
                out.append(SPECIAL_TOKENS[i])
        out.append(pending.decode("utf-8", errors="replace"))
        return "".join(out)


class HFTokenizer:
    """A local Hugging Face tokenizer, such as LongLLaVA's sentencepiece one, behind the protocol."""

    def __init__(self, backend: tokenizers.Tokenizer, source: str = "tokenizer"):
        ids = {token: backend.token_to_id(token) for token in (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)}
        missing = [token for token, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"{source}: the vocabulary lacks LongLLaVA's special tokens {missing}")
        # registering them (a no-op when already registered) makes encode parse them inside text
        present = [t for t in SPECIAL_TOKENS if backend.token_to_id(t) is not None]
        backend.add_special_tokens([AddedToken(t, special=True) for t in present])
        self.backend = backend
        self.pad_id, self.bos_id, self.eos_id = ids[PAD_TOKEN], ids[BOS_TOKEN], ids[EOS_TOKEN]
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_directory(cls, path: str | Path) -> "HFTokenizer":
        """``tokenizer.json`` (or that file itself), else whatever transformers loads locally from ``path``.

        LongLLaVA ships only ``tokenizer.model``; transformers needs the ``sentencepiece``
        package to convert that.
        """
        path = Path(path)
        file = path if path.is_file() else path / "tokenizer.json"
        if file.is_file():
            try:
                backend = tokenizers.Tokenizer.from_file(str(file))
            except Exception as exc:  # the Rust side raises bare Exceptions
                raise ValueError(f"{file} is not a readable tokenizer.json: {exc}") from exc
            return cls(backend, str(file))
        if not path.is_dir():
            raise FileNotFoundError(f"no tokenizer at {path}")
        from transformers import AutoTokenizer  # only this fallback needs transformers

        try:
            backend = AutoTokenizer.from_pretrained(str(path), local_files_only=True).backend_tokenizer
        except Exception as exc:  # transformers raises OSError, ValueError, AttributeError, ...
            raise ValueError(
                f"{path} has no tokenizer.json and transformers cannot load a tokenizer from it: {exc}"
            ) from exc
        return cls(backend, str(path))

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        return self.backend.decode(_check_ids(ids, self.vocab_size), skip_special_tokens=skip_special)


def load_tokenizer(path: str | Path | None = None, *, builtin: str | None = None) -> Tokenizer:
    """The model's built-in tokenizer when it names one (its ids mean nothing in any other),
    else the one at ``path``; with neither, the byte tokenizer."""
    if builtin not in (None, "byte"):
        raise ValueError(f"unknown built-in tokenizer {builtin!r}; expected 'byte'")
    if builtin == "byte" or path is None:
        return ByteTokenizer()
    return HFTokenizer.from_directory(path)


def tokenize_prompt(tokenizer: Tokenizer, text: str) -> list[int]:
    """Ids of ``text`` with ``IMAGE_TOKEN_INDEX`` for each ``<image>``; chunks are encoded
    separately, as upstream's ``tokenizer_image_token`` does."""
    ids: list[int] = []
    for k, chunk in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if k:
            ids.append(IMAGE_TOKEN_INDEX)
        ids += tokenizer.encode(chunk)
    return ids


class IncrementalDecoder:
    """Text from a stream of ids, emitted only in whole characters (for token streaming).

    It decodes a short window of recent ids and emits what the newest id added once the
    result no longer ends in U+FFFD, the mark of an unfinished UTF-8 sequence. That works
    for byte-level and byte-fallback tokenizers alike, and the window keeps the context
    sentencepiece needs for leading spaces. Call ``finish`` at the end for any held text.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self.ids: list[int] = []
        self.prefix = 0  # the window starts here ...
        self.read = 0  # ... and everything before this has been emitted

    def _new_text(self) -> str:
        decode = self.tokenizer.decode
        done = decode(self.ids[self.prefix : self.read], self.skip_special)
        return decode(self.ids[self.prefix :], self.skip_special)[len(done) :]

    def feed(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self._new_text()
        if not text or text.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text

    def finish(self) -> str:
        """What is still held back; an unfinished character comes out as U+FFFD."""
        text = self._new_text()
        self.prefix = self.read = len(self.ids)
        return text
