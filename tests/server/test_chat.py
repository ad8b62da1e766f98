"""Chat rows: rendering with the shipped templates and the assistant masks, against the
transformers tokenizer's own ``apply_chat_template``; bad rows named by source and line.

The tokenizers are the demo teacher's, saved with each format's special tokens added and the
shipped template as their chat template, so ``apply_chat_template`` with
``return_assistant_tokens_mask`` is the independent answer the masks are compared with.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from logitcache.client.errors import InvalidArgument, NotFound
from logitcache.server.chat import (
    TEMPLATES_DIR,
    ChatError,
    ChatRenderer,
    ChatTemplate,
    chat_renderer,
)
from logitcache.server.inputs import load_sequences

SPECIAL_TOKENS = {
    "chatml": {"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]},
    "llama3": {
        "bos_token": "<|begin_of_text|>",
        "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    },
}
STYLES = sorted(SPECIAL_TOKENS)

CONVERSATIONS = [
    [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi there"},
        {"role": "assistant", "content": "hello, friend"},
        {"role": "user", "content": "bye"},
        {"role": "assistant", "content": " see you soon \n"},
    ],
    [{"role": "user", "content": "one question"}, {"role": "assistant", "content": "one answer"}],
    [{"role": "user", "content": "only a question, nobody answers"}],
    [{"role": "assistant", "content": "I speak first"}, {"role": "user", "content": "ok"}],
]


def _template_text(style: str) -> str:
    return (TEMPLATES_DIR / f"{style}.jinja").read_text()


def _unmarked(source: str) -> str:
    """The template without its generation markers: the masks then come from aligning turns."""
    return re.sub(r"\{%-?\s*(end)?generation\s*-?%\}", "", source)


@pytest.fixture(scope="module")
def chat_tokenizers(demo_teacher: Path, tmp_path_factory) -> dict[str, Path]:
    """A tokenizer directory per style: the demo tokenizer, the style's special tokens, and the
    shipped template as its own chat template."""
    from transformers import AutoTokenizer

    folders = {}
    for style in STYLES:
        tokenizer = AutoTokenizer.from_pretrained(str(demo_teacher))
        tokenizer.add_special_tokens(SPECIAL_TOKENS[style])
        tokenizer.chat_template = _template_text(style)
        folders[style] = tmp_path_factory.mktemp(f"tok-{style}")
        tokenizer.save_pretrained(str(folders[style]))
    return folders


def _expected(tokenizer, conversation: list[dict]) -> tuple[list[int], np.ndarray]:
    """The tokenizer's own ids and assistant mask, shifted onto targets (row t: token t + 1)."""
    out = tokenizer.apply_chat_template(
        conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    assistant = np.asarray(out["assistant_masks"], dtype=np.uint8)
    return list(out["input_ids"]), np.append(assistant[1:], 0).astype(np.uint8)


def test_shipped_templates_render_each_format(chat_tokenizers: dict[str, Path]) -> None:
    """The templates render what the formats specify, written out by hand here."""
    from transformers import AutoTokenizer

    conversation = CONVERSATIONS[1][:1] + [{"role": "assistant", "content": " one answer "}]
    expected = {
        "chatml": "<|im_start|>user\none question<|im_end|>\n"
        "<|im_start|>assistant\n one answer <|im_end|>\n",
        "llama3": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\none question"
        "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\none answer<|eot_id|>",
    }
    prompts = {
        "chatml": "<|im_start|>user\none question<|im_end|>\n<|im_start|>assistant\n",
        "llama3": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\none question"
        "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    }
    for style in STYLES:
        tokenizer = AutoTokenizer.from_pretrained(str(chat_tokenizers[style]))
        assert tokenizer.apply_chat_template(conversation, tokenize=False) == expected[style]
        prompt = tokenizer.apply_chat_template(
            conversation[:1], tokenize=False, add_generation_prompt=True
        )
        assert prompt == prompts[style]


@pytest.mark.parametrize("style", STYLES)
def test_masks_match_the_tokenizers_own(chat_tokenizers: dict[str, Path], style: str) -> None:
    """The teacher's own template, a shipped one by name, and the same template without its
    generation markers (aligned turns) all give the tokenizer's own ids and assistant mask."""
    folder = chat_tokenizers[style]
    marked_own = chat_renderer(folder, "messages", None)
    by_name = chat_renderer(folder, "messages", style)
    unmarked = ChatTemplate("unmarked", _unmarked(_template_text(style)))
    aligned = ChatRenderer(marked_own.tokenizer, unmarked, "messages")
    assert marked_own.provenance["assistant_mask"] == "generation markers"
    assert by_name.provenance["chat_template"] == style
    assert aligned.provenance["assistant_mask"] == "aligned turns"
    assert marked_own.template.sha256 == by_name.template.sha256 != aligned.template.sha256
    for conversation in CONVERSATIONS:
        ids, mask = _expected(marked_own.tokenizer, conversation)
        for renderer in (marked_own, by_name, aligned):
            got_ids, got_mask = renderer.render(conversation)
            assert got_ids.tolist() == ids
            np.testing.assert_array_equal(got_mask, mask)
    # Row t counts when token t + 1 is the assistant's: those targets spell the replies.
    ids, mask = marked_own.render(CONVERSATIONS[0])
    targets = marked_own.tokenizer.decode(ids[1:][mask[:-1] == 1])
    end = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}[style]
    reply = " see you soon \n" if style == "chatml" else "see you soon"
    assert targets == f"hello, friend{end}{reply}{end}"
    assert mask[-1] == 0


def test_aligned_turns_on_tokens_that_cross_turns(demo_teacher: Path, tmp_path: Path) -> None:
    """Without special tokens the markers are ordinary byte pieces, and tokens may straddle a
    turn's edges: aligned turns still give the tokenizer's own mask (a token touched by a
    turn is the assistant's)."""
    unmarked = tmp_path / "chatml-unmarked.jinja"
    unmarked.write_text(_unmarked(_template_text("chatml")))
    aligned = chat_renderer(demo_teacher, "messages", str(unmarked))
    marked = chat_renderer(demo_teacher, "messages", "chatml")
    for conversation in CONVERSATIONS:
        a_ids, a_mask = aligned.render(conversation)
        m_ids, m_mask = marked.render(conversation)
        np.testing.assert_array_equal(a_ids, m_ids)
        np.testing.assert_array_equal(a_mask, m_mask)
        expected_ids, expected_mask = _expected_with(marked, conversation)
        assert a_ids.tolist() == expected_ids
        np.testing.assert_array_equal(a_mask, expected_mask)


def _expected_with(
    renderer: ChatRenderer, conversation: list[dict]
) -> tuple[list[int], np.ndarray]:
    out = renderer.tokenizer.apply_chat_template(
        conversation,
        chat_template=renderer.template.source,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    assistant = np.asarray(out["assistant_masks"], dtype=np.uint8)
    return list(out["input_ids"]), np.append(assistant[1:], 0).astype(np.uint8)


def test_a_template_that_rewrites_earlier_turns_needs_markers(
    demo_teacher: Path, tmp_path: Path
) -> None:
    """Turns cannot be aligned when rendering more of a conversation changes what came before."""
    shifty = tmp_path / "shifty.jinja"
    shifty.write_text(
        "{% for m in messages %}{{ m['role'] | upper if loop.last else m['role'] }}: "
        "{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    renderer = chat_renderer(demo_teacher, "messages", str(shifty))
    with pytest.raises(ChatError, match=r"message 2 .*generation %\} markers"):
        renderer.render(CONVERSATIONS[1])


def test_template_choice_errors(demo_teacher: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="has no chat template; pass chat_template"):
        chat_renderer(demo_teacher, "messages", None)  # the demo tokenizer ships none
    with pytest.raises(NotFound, match="neither a shipped template"):
        chat_renderer(demo_teacher, "messages", str(tmp_path / "missing.jinja"))


def _rows_file(tmp_path: Path, rows: list[object]) -> Path:
    path = tmp_path / "chat.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD = {"messages": CONVERSATIONS[1]}
EMPTY = "'messages': the messages must be a non-empty list of {'role', 'content'} objects"


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"messages": []}, EMPTY),
        ({"messages": "hello"}, EMPTY),
        ({"messages": [{"role": "user"}]}, "'messages': message 1 has no 'content'"),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": 3, "content": "b"}]},
            "'messages': message 2: 'role' must be a string, not int",
        ),
        (
            {"messages": [["user", "hi"]]},
            "'messages': message 1 must be an object with 'role' and 'content'",
        ),
        (
            {"conversation": []},
            "missing field 'messages', 'text' or 'input_ids' (found ['conversation'])",
        ),
    ],
)
def test_a_bad_messages_row_is_named_by_source_and_line(
    demo_teacher: Path, tmp_path: Path, row: object, reason: str
) -> None:
    path = _rows_file(tmp_path, [GOOD, GOOD, row])
    chat = chat_renderer(demo_teacher, "messages", "chatml")
    with pytest.raises(InvalidArgument) as caught:
        _load(path, chat)
    assert str(caught.value) == f"{path}:3: {reason}"


def test_a_template_refusal_names_the_row(demo_teacher: Path, tmp_path: Path) -> None:
    strict = tmp_path / "strict.jinja"
    strict.write_text(
        _template_text("chatml").replace(
            "{%- for message in messages -%}",
            "{%- if messages[0]['role'] == 'assistant' -%}"
            "{{ raise_exception('a conversation starts with the user') }}{%- endif -%}"
            "{%- for message in messages -%}",
        )
    )
    path = _rows_file(tmp_path, [GOOD, {"messages": CONVERSATIONS[3]}])
    with pytest.raises(InvalidArgument, match=r"chat.jsonl:2: 'messages': the chat template "
                       r"refused the conversation \(a conversation starts with the user\)"):  # fmt: skip
        _load(path, chat_renderer(demo_teacher, "messages", str(strict)))


def test_masks_follow_rows_skips_and_splits(demo_teacher: Path, tmp_path: Path) -> None:
    """Every sequence gets its mask in input order: text rows all ones, skipped rows none, and a
    split conversation the pieces of its mask."""
    chat = chat_renderer(demo_teacher, "messages", "chatml")
    rows = [{"messages": CONVERSATIONS[0]}, {"messages": []}, {"text": "plain text"}, GOOD]
    report = _load(_rows_file(tmp_path, rows), chat, skip_invalid=True, max_len=20)
    assert report.skipped == {"bad messages": 1}
    text = np.asarray(chat.tokenizer("plain text")["input_ids"])
    rendered = [
        chat.render(CONVERSATIONS[0]),
        (text, np.ones(len(text))),
        chat.render(GOOD["messages"]),
    ]
    expected = [
        (ids[start : start + 20], mask[start : start + 20], line)
        for (ids, mask), line in zip(rendered, (1, 3, 4), strict=True)
        for start in range(0, len(ids), 20)
    ]
    masks = report.loss_masks
    assert masks is not None and len(masks) == len(report.sequences) == len(expected)
    for sequence, mask, (ids, expected_mask, line) in zip(
        report.sequences, masks, expected, strict=True
    ):
        np.testing.assert_array_equal(sequence.input_ids, ids)
        np.testing.assert_array_equal(mask, expected_mask)
        assert sequence.source.endswith(f":{line}")


def test_chat_rows_in_parquet(demo_teacher: Path, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    chat = chat_renderer(demo_teacher, "conversation", "llama3")
    path = tmp_path / "chat.parquet"
    pq.write_table(pa.table({"conversation": CONVERSATIONS[:2]}), path)
    report = _load(path, chat)
    assert report.loss_masks is not None
    for i, conversation in enumerate(CONVERSATIONS[:2]):
        ids, mask = chat.render(conversation)
        np.testing.assert_array_equal(report.sequences[i].input_ids, ids)
        np.testing.assert_array_equal(report.loss_masks[i], mask)


def _load(path: Path, chat: ChatRenderer, *, skip_invalid: bool = False, max_len: int = 1000):
    return load_sequences(
        path,
        vocab_size=len(chat.tokenizer),
        max_len=max_len,
        tokenize=lambda texts: chat.tokenizer(texts)["input_ids"],
        overflow="split",
        skip_invalid=skip_invalid,
        chat=chat,
    )
