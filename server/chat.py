"""Chat rows: conversations rendered with the teacher's chat template, and assistant-only masks.

A chat row holds ``{"messages": [{"role": ..., "content": ...}, ...]}`` (the OpenAI / Hugging
Face format; ``messages_field`` names the column). It is rendered to text with a Jinja chat
template (the teacher tokenizer's own, one shipped here by name, or a file) and tokenised with
the teacher's tokenizer without adding special tokens, exactly as the tokenizer's
``apply_chat_template`` does.

Each sequence gets a loss mask, uint8 [T], about *targets* (ARCHITECTURE.md, "Rows": row t
predicts token t + 1): ``mask[t] == 1`` where token t + 1 belongs to an assistant turn, so the
student is scored on what the assistant says, end-of-turn token included, given everything
before it. The last position has no next token: its mask is 0. Which tokens are the
assistant's comes from:

- the template's generation markers (``{% generation %}...{% endgeneration %}``) where it has
  them: the tokenizer's ``return_assistant_tokens_mask``;
- otherwise, aligning the rendered turns: each assistant turn is the text that rendering the
  conversation up to and including it adds to the rendering up to it with a generation prompt
  (trailing whitespace left out), mapped onto the tokens through their character offsets. A
  template that does not render a conversation's turns as prefixes of it gets a clear error
  (add generation markers to it).

``SHIPPED_TEMPLATES`` are written from the formats' specifications, with generation markers:
``chatml`` and ``llama3``.
"""

from __future__ import annotations

import hashlib
import mmap
import re
import tempfile
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from logitcache.client.errors import InvalidArgument, NotFound

TEMPLATES_DIR = Path(__file__).with_name("chat_templates")
SHIPPED_TEMPLATES = ("chatml", "llama3")
TEACHER_TEMPLATE = "teacher"  # the name recorded for the teacher tokenizer's own template
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
_SPOOL_POSITIONS = 1 << 22  # mask bytes buffered before they go to the spool file


class ChatError(ValueError):
    """A conversation that cannot be rendered; the message says why (the row is named by the
    caller)."""


@dataclass(frozen=True)
class ChatTemplate:
    """A Jinja chat template and where it came from (a shipped name, a file, or the teacher)."""

    name: str
    source: str

    @property
    def sha256(self) -> str:
        """The template's exact text, hashed: whitespace in a template is part of what it renders."""
        return hashlib.sha256(self.source.encode()).hexdigest()

    @property
    def marked(self) -> bool:
        """Whether the template marks assistant turns with ``{% generation %}`` blocks."""
        return _GENERATION_TAG.search(self.source) is not None


def load_chat_template(spec: str | None, tokenizer: Any) -> ChatTemplate:
    """The template ``spec`` names: a shipped one (``chatml``, ``llama3``), a Jinja file, or
    (None or empty) the teacher tokenizer's own."""
    if not spec:
        try:
            source = tokenizer.get_chat_template()
        except ValueError:
            raise InvalidArgument(
                "the teacher's tokenizer has no chat template; pass chat_template "
                f"({', '.join(SHIPPED_TEMPLATES)} or a Jinja file)",
                fields=["chat_template"],
            ) from None
        return ChatTemplate(TEACHER_TEMPLATE, source)
    if spec in SHIPPED_TEMPLATES:
        return ChatTemplate(spec, (TEMPLATES_DIR / f"{spec}.jinja").read_text())
    path = Path(spec).expanduser()
    if not path.is_file():
        raise NotFound(
            f"chat template {spec!r} is neither a shipped template "
            f"({', '.join(SHIPPED_TEMPLATES)}) nor a file",
            fields=["chat_template"],
        )
    return ChatTemplate(str(path), path.read_text())


class ChatRenderer:
    """Conversations to (token ids, loss mask) with one tokenizer and one template; ``redact``
    (a sensitive-data filter's) rewrites each message's content before it is rendered."""

    def __init__(
        self,
        tokenizer: Any,
        template: ChatTemplate,
        messages_field: str,
        redact: Callable[[str], str] | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.template = template
        self.field = messages_field
        self.redact = redact

    @property
    def provenance(self) -> dict[str, str]:
        """What a dataset records about how its chat rows were rendered and masked."""
        return {
            "messages_field": self.field,
            "chat_template": self.template.name,
            "chat_template_sha256": self.template.sha256,
            "assistant_mask": "generation markers" if self.template.marked else "aligned turns",
        }

    def render(self, messages: object) -> tuple[np.ndarray, np.ndarray]:
        """Token ids (int64 [T]) and the target loss mask (uint8 [T]) of one conversation;
        ChatError says what is wrong with it."""
        conversation = _checked(messages)
        if self.redact is not None:
            conversation = [{**m, "content": self.redact(m["content"])} for m in conversation]
        from jinja2 import TemplateError

        try:
            if self.template.marked:
                ids, assistant = self._marked(conversation)
            else:
                ids, assistant = self._aligned(conversation)
        except TemplateError as e:
            raise ChatError(f"the chat template refused the conversation ({e})") from None
        if ids.size == 0:
            raise ChatError("the conversation renders to no tokens")
        mask = np.zeros(ids.shape[0], dtype=np.uint8)
        mask[:-1] = assistant[1:]  # row t is scored when token t + 1 is the assistant's
        return ids, mask

    def _text(self, conversation: list[dict], generation_prompt: bool = False) -> str:
        text: str = self.tokenizer.apply_chat_template(
            conversation,
            chat_template=self.template.source,
            tokenize=False,
            add_generation_prompt=generation_prompt,
        )
        return text

    def _marked(self, conversation: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        out = self.tokenizer.apply_chat_template(
            conversation,
            chat_template=self.template.source,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
        )
        return np.asarray(out["input_ids"], dtype=np.int64), np.asarray(
            out["assistant_masks"], dtype=np.uint8
        )

    def _aligned(self, conversation: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        text = self._text(conversation)
        spans = np.asarray(self._assistant_spans(conversation, text), dtype=np.int64)
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(encoded["input_ids"], dtype=np.int64)
        offsets = np.asarray(encoded["offset_mapping"], dtype=np.int64).reshape(-1, 2)
        if spans.size == 0:
            return ids, np.zeros(ids.shape[0], dtype=np.uint8)
        start, end = offsets[:, :1], offsets[:, 1:]
        # A token is the assistant's if it overlaps an assistant span (an empty token: if it
        # sits inside one), as the tokenizer's own mask takes every token a span touches.
        overlaps = (start < spans[:, 1]) & (
            (end > spans[:, 0]) | ((end == start) & (start >= spans[:, 0]))
        )
        return ids, overlaps.any(axis=1).astype(np.uint8)

    def _assistant_spans(self, conversation: list[dict], text: str) -> list[tuple[int, int]]:
        """Character spans [start, end) of the assistant turns in ``text``, the whole render."""
        spans = []
        for i, message in enumerate(conversation):
            if message["role"] != "assistant":
                continue
            through = self._text(conversation[: i + 1]).rstrip()
            if i == 0:
                start = through.rfind(message["content"].strip())
            else:
                before = self._text(conversation[:i], generation_prompt=True)
                start = len(before) if through.startswith(before) else -1
            if start < 0 or not text.startswith(through):
                raise ChatError(
                    f"the chat template does not render message {i + 1} as a prefix of the "
                    "conversation, so its assistant tokens cannot be found by aligning turns; "
                    "use a template with {% generation %} markers"
                )
            spans.append((start, len(through)))
        return spans


def chat_renderer(
    tokenizer_path: str | Path,
    messages_field: str,
    chat_template: str | None,
    redact: Callable[[str], str] | None = None,
) -> ChatRenderer:
    """A renderer with the teacher's tokenizer (in ``tokenizer_path``), ``chat_template`` and
    ``redact`` (see ChatRenderer)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path))
    if not getattr(tokenizer, "is_fast", False):
        raise InvalidArgument(
            f"the teacher's tokenizer in {tokenizer_path} is not a fast tokenizer; chat rows "
            "need its character offsets for the assistant masks"
        )
    template = load_chat_template(chat_template, tokenizer)
    return ChatRenderer(tokenizer, template, messages_field, redact)


def _checked(messages: object) -> list[dict]:
    """The conversation as a list of messages with string roles and contents, or ChatError."""
    if not isinstance(messages, list) or not messages:
        raise ChatError("the messages must be a non-empty list of {'role', 'content'} objects")
    for i, message in enumerate(messages, start=1):
        if not isinstance(message, dict):
            raise ChatError(f"message {i} must be an object with 'role' and 'content'")
        for key in ("role", "content"):
            if key not in message:
                raise ChatError(f"message {i} has no {key!r}")
            if not isinstance(message[key], str):
                raise ChatError(
                    f"message {i}: {key!r} must be a string, not {type(message[key]).__name__}"
                )
        if not message["role"].strip():
            raise ChatError(f"message {i}: 'role' is empty")
    return messages


class ChatMasks:
    """The loss masks of an input's sequences, in input order, spooled like their token ids
    (``inputs.SpooledSequences``): memory holds where each ends, not the masks. ``rendering``
    is the renderer's provenance."""

    def __init__(self, rendering: dict[str, str]) -> None:
        self.rendering = rendering
        self._file = tempfile.TemporaryFile(prefix="logitcache-masks-")
        self._pending: list[np.ndarray] = []
        self._pending_positions = 0
        self._ends = array("q")
        self._masks: np.ndarray | None = None

    def add(self, mask: np.ndarray) -> None:
        if self._masks is not None:
            raise RuntimeError("masks are sealed")
        self._pending.append(mask)
        self._pending_positions += len(mask)
        self._ends.append((self._ends[-1] if self._ends else 0) + len(mask))
        if self._pending_positions >= _SPOOL_POSITIONS:
            self._flush()

    def seal(self) -> None:
        """Map the spooled masks back; no more ``add``."""
        self._flush()
        self._file.flush()
        if self._ends and self._ends[-1]:
            self._masks = np.frombuffer(
                mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ), dtype=np.uint8
            )
        else:
            self._masks = np.empty(0, dtype=np.uint8)
        self._file.close()  # the mapping keeps the (unlinked) file's pages

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, index: int) -> np.ndarray:
        if self._masks is None:
            raise RuntimeError("masks are not sealed yet")
        index = range(len(self._ends))[index]
        start = self._ends[index - 1] if index else 0
        return self._masks[start : self._ends[index]]

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[i] for i in range(len(self)))

    def _flush(self) -> None:
        if self._pending:
            self._file.write(np.concatenate(self._pending).astype(np.uint8, copy=False).tobytes())
            self._pending, self._pending_positions = [], 0


def chat_provenance(masks: ChatMasks | None) -> dict[str, dict[str, str]]:
    """The ``chat`` entry of a dataset's provenance (none for a dataset without chat rows)."""
    return {} if masks is None else {"chat": masks.rendering}
