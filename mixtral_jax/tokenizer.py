"""SentencePiece tokenizer with Mistral's v1 instruct chat format and streaming decode.

`Tokenizer.encode_chat` gives exactly the ids of mistral-common's `InstructTokenizerV1` (with its
request validator and normaliser), without importing mistral-common:

    <s>[INST] {system}\\n\\n{user} [/INST] {assistant}</s>[INST] {user} [/INST]

Each user turn is encoded as the one string `"[INST] {content} [/INST]"` (v1 has no [INST] control
tokens), each assistant turn as its content followed by EOS.
"""

import importlib.resources
import itertools
import os
import pathlib
from collections.abc import Mapping, Sequence

import sentencepiece

from mixtral_jax.errors import ChatFormatError, CheckpointError, MixtralError

_ROLES = ("system", "user", "assistant")
_JOIN = "\n\n"  # mistral-common joins merged messages and system prompts with this
# Mistral's safe-mode system prompt (mistral-inference's `--safe_prompt`; `chat --safe`, `safe_prompt: true`)
SAFE_PROMPT = (
    "Always assist with care, respect, and truth. Respond with utmost utility yet securely. Avoid harmful, "
    "unethical, prejudiced, or negative content. Ensure replies promote fairness and positivity."
)


def default_tokenizer_path() -> pathlib.Path:
    """The Mixtral 8x7B v1 tokenizer shipped with this package (from mistral-common, see NOTICE)."""
    return pathlib.Path(str(importlib.resources.files("mixtral_jax.assets") / "tokenizer.model.v1"))


class Tokenizer:
    """A SentencePiece model: plain text, v1 instruct chats, and control ids."""

    def __init__(self, path: str | os.PathLike) -> None:
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=os.fspath(path))
        except (RuntimeError, OSError) as e:
            raise CheckpointError(f"cannot load SentencePiece tokenizer {path}: {e}") from None
        self._control_ids = frozenset(i for i in range(self._sp.vocab_size()) if self._sp.is_control(i))

    @classmethod
    def from_default(cls) -> "Tokenizer":
        """The Mixtral 8x7B v1 tokenizer shipped with this package."""
        return cls(default_tokenizer_path())

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def pad_id(self) -> int | None:
        """None when the model has no pad piece (the Mixtral v1 model has none)."""
        pad = self._sp.pad_id()
        return None if pad < 0 else pad

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        return self._sp.encode(_checked(text), add_bos=bos, add_eos=eos)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids` with control ids (BOS, EOS) dropped first, so they never split a UTF-8
        sequence spelled in byte pieces."""
        ids = [int(i) for i in ids]
        unknown = next((i for i in ids if not 0 <= i < self.vocab_size), None)
        if unknown is not None:
            raise MixtralError(f"token id {unknown} is outside the tokenizer's {self.vocab_size} pieces")
        return self._sp.decode([i for i in ids if i not in self._control_ids])

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token adds to a text (SentencePiece's word-start mark as a space, a byte piece as its
        byte); nothing for a control token."""
        token_id = int(token_id)
        if self.is_control(token_id):
            return b""
        piece = self._sp.id_to_piece(token_id)
        if self._sp.is_byte(token_id):
            return bytes([int(piece[3:-1], 16)])  # <0xNN>
        return piece.replace("\u2581", " ").encode()

    def is_control(self, token_id: int) -> bool:
        """Whether `token_id` is a control token (BOS, EOS), which decodes to nothing."""
        return int(token_id) in self._control_ids

    def encode_chat(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """Ids of OpenAI-style `{"role", "content"}` messages in the v1 instruct format.

        Matches mistral-common: consecutive messages of one role are merged, all system messages
        form one prompt put in front of the first user turn, and an empty user turn is added when
        the chat starts with an assistant. A chat ending with a user (or system) message is a
        generation prompt (mistral-common's default "test" mode); one ending with an assistant
        message ends with EOS (its "finetuning" mode). Raises ChatFormatError where it refuses.
        """
        system, turns = _chat_turns(messages)
        ids = [self.bos_id]
        for i, (role, content) in enumerate(turns):
            if role == "assistant":
                ids += self._sp.encode(content) + [self.eos_id]
                continue
            if i == 0 and system:
                content = system + _JOIN + content
            ids += self._sp.encode(f"[INST] {content} [/INST]")
        return ids


def _checked(text: str) -> str:
    """`text`, if it is valid Unicode: text read from invalid UTF-8 (a command line, a pipe) carries the bad
    bytes as lone surrogates, which SentencePiece cannot encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        what = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"lone surrogate U+{code:04X}"
        raise MixtralError(f"the text is not valid UTF-8 ({what} at character {e.start})") from None
    return text


def _chat_turns(messages: Sequence[Mapping[str, str]]) -> tuple[str | None, list[tuple[str, str]]]:
    """Validate `messages` as mistral-common's v1 validator does; merge them as its normaliser does.

    Returns the system prompt (non-empty system contents joined, or None) and the user/assistant
    turns, the first always a user turn. A system message ends a run of same-role messages.
    """
    if isinstance(messages, (str, Mapping)) or not isinstance(messages, Sequence) or not messages:
        raise ChatFormatError("a chat must be a non-empty list of messages")
    pairs = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ChatFormatError(f"message {i} is not a mapping with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if role not in _ROLES:
            raise ChatFormatError(f"message {i} has role {role!r}; expected 'system', 'user' or 'assistant'")
        if not isinstance(content, str):
            raise ChatFormatError(f"message {i} ({role}) content must be a string, not {type(content).__name__}")
        _checked(content)
        if role == "assistant" and not content:
            raise ChatFormatError(f"message {i} (assistant) has empty content")
        if role == "system" and i > 0 and pairs[-1][0] == "assistant":
            raise ChatFormatError(f"message {i}: a system message cannot follow an assistant message")
        pairs.append((role, content))
    if len(pairs) == 1 and pairs[0][0] == "assistant":
        raise ChatFormatError("a single-message chat must be a user or system message")

    system = _JOIN.join(c for r, c in pairs if r == "system" and c) or None
    turns = [
        (role, _JOIN.join(c for _, c in run if c))
        for role, run in itertools.groupby(pairs, key=lambda rc: rc[0])
        if role != "system"
    ]
    if not turns or turns[0][0] != "user":
        turns.insert(0, ("user", ""))
    return system, turns


class StreamDecoder:
    """Text pieces for ids arriving one at a time; the pieces concatenate to `decode(all ids)`.

    Text ending in an incomplete UTF-8 sequence (byte-fallback pieces such as `<0xE2>`) is held
    back until it completes; call `flush` after the last id for anything still held.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._start = 0  # window start: decoding from here strips the same leading space each time
        self._read = 0  # ids before this have been returned as text

    def push(self, token_id: int) -> str:
        """The new text that `token_id` completes, possibly empty."""
        if self._tokenizer.is_control(token_id):  # decode drops them; keep them out of the window
            return ""
        self._ids.append(int(token_id))
        return self._advance(final=False)

    def flush(self) -> str:
        """Text held back at the end of the stream (U+FFFD for bytes that never completed)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self._read == len(self._ids):
            return ""
        done = self._tokenizer.decode(self._ids[self._start : self._read])
        text = self._tokenizer.decode(self._ids[self._start :])
        if text.endswith("\ufffd") and not final:
            return ""
        self._start, self._read = self._read, len(self._ids)
        return text[len(done) :]
