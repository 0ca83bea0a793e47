"""Tokenizers and the DeepSeek-V4 chat prompt (spec §8).

Two tokenizers with one interface (``encode``, ``decode``, ``bos_id``, ``eos_id``, ``vocab_size``):

* :class:`ByteTokenizer` -- the embedded default for the ``tiny`` preset: the DeepSeek special tokens
  at ids ``0..NUM_SPECIALS-1`` (BOS 0 and EOS 1, as in the real vocabulary and the ``tiny`` config),
  then one id per byte (``NUM_SPECIALS + b``). Any UTF-8 text round-trips.
* :class:`HFTokenizer` -- a real ``tokenizer.json`` through the HF ``tokenizers`` library (installed with
  the ``dev`` extra). BOS/EOS come from the ``tokenizer_config.json`` beside it when there is one, else
  from the DeepSeek special-token strings.

Both recognise special-token strings inside the text, so ``encode(chat_prompt(...))`` gives the
template's special ids (the template adds BOS; the tokenizer never does, spec §8).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK = "<think>"
END_THINK = "</think>"

#: special tokens of the byte tokenizer, by id (BOS and EOS first, like the real vocabulary)
BYTE_SPECIALS: tuple[str, ...] = (BOS, EOS, USER, ASSISTANT, THINK, END_THINK, "<｜latest_reminder｜>", "<tool_result>",
                                  "</tool_result>")
NUM_SPECIALS = 16  # ids 0..15 are reserved for specials; bytes start here


@runtime_checkable
class Tokenizer(Protocol):
    bos_id: int
    eos_id: int
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


def chat_prompt(user: str, system: str = "", *, thinking: bool = False) -> str:
    """One user turn in DeepSeek-V4's format: ``BOS {system} <｜User｜>{user} <｜Assistant｜>`` then
    ``</think>`` (chat mode) or ``<think>`` (thinking mode), without spaces (``encoding_dsv4.py``)."""
    return f"{BOS}{system}{USER}{user}{ASSISTANT}{THINK if thinking else END_THINK}"


class ByteTokenizer:
    """Bytes plus DeepSeek's special tokens; ``vocab_size = NUM_SPECIALS + 256 = 272`` ids are used."""

    bos_id = 0
    eos_id = 1
    vocab_size = NUM_SPECIALS + 256

    def __init__(self):
        self._special_ids = {s: i for i, s in enumerate(BYTE_SPECIALS)}
        self._split = re.compile("(" + "|".join(re.escape(s) for s in BYTE_SPECIALS) + ")")

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in self._split.split(text):
            if piece in self._special_ids:
                ids.append(self._special_ids[piece])
            else:
                ids.extend(NUM_SPECIALS + b for b in piece.encode("utf-8"))
        return ids

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        """Bytes are decoded as UTF-8 (invalid or incomplete sequences become U+FFFD); specials are
        written as their strings unless ``skip_special``; unused ids (272..vocab) as ``<|id|>``."""
        out, pending = [], bytearray()
        for i in ids:
            i = int(i)
            if NUM_SPECIALS <= i < NUM_SPECIALS + 256:
                pending.append(i - NUM_SPECIALS)
                continue
            out.append(pending.decode("utf-8", errors="replace"))
            pending = bytearray()
            if i < 0:
                raise ValueError(f"negative token id {i}")
            if i < len(BYTE_SPECIALS):
                out.append("" if skip_special else BYTE_SPECIALS[i])
            elif not skip_special:
                out.append(f"<|{i}|>")
        out.append(pending.decode("utf-8", errors="replace"))
        return "".join(out)


class HFTokenizer:
    """A ``tokenizer.json`` read with the HF ``tokenizers`` library (no BOS added by encoding)."""

    def __init__(self, path: str | os.PathLike):
        try:
            from tokenizers import Tokenizer as _Tokenizer
        except ImportError as e:  # pragma: no cover - tokenizers is in the dev extra
            raise ImportError("--tokenizer needs the `tokenizers` package: pip install tokenizers") from e
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no tokenizer file at {path}")
        self._tok = _Tokenizer.from_file(path)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        bos, eos = _special_strings(os.path.join(os.path.dirname(path), "tokenizer_config.json"))
        self.bos_id, self.eos_id = self._id(bos, "BOS"), self._id(eos, "EOS")

    def _id(self, token: str, what: str) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            raise ValueError(f"the tokenizer has no {what} token {token!r}")
        return i

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)


def _special_strings(config_path: str) -> tuple[str, str]:
    """BOS/EOS strings from a ``tokenizer_config.json`` (plain strings or ``{"content": ...}``), else DeepSeek's."""
    if not os.path.isfile(config_path):
        return BOS, EOS
    with open(config_path) as f:
        conf = json.load(f)

    def content(key: str, default: str) -> str:
        v = conf.get(key)
        return v.get("content", default) if isinstance(v, dict) else (v or default)

    return content("bos_token", BOS), content("eos_token", EOS)


class StreamDecoder:
    """Incremental detokenisation for streaming: ``push(ids)`` returns only the newly complete text.

    Decodes the whole sequence each time and holds back a trailing U+FFFD (an incomplete UTF-8
    sequence of a byte tokenizer, or a partial byte-fallback piece), so multi-byte characters print once.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special: bool = False):
        self.tokenizer, self.skip_special = tokenizer, skip_special
        self.ids: list[int] = []
        self.printed = 0

    def push(self, ids: Sequence[int]) -> str:
        self.ids.extend(int(i) for i in ids)
        text = self.tokenizer.decode(self.ids, skip_special=self.skip_special)
        stable = text.rstrip("\ufffd")
        new = stable[self.printed:]
        self.printed = max(self.printed, len(stable))
        return new

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special=self.skip_special)
        new = text[self.printed:]
        self.printed = len(text)
        return new
