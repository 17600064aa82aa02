"""Tokenizer: plain text against sentencepiece, chats against mistral-common, streaming decode."""

import hashlib

import pytest
import sentencepiece
from hypothesis import given, settings
from hypothesis import strategies as st

from mixtral_jax.errors import ChatFormatError, MixtralError
from mixtral_jax.tokenizer import StreamDecoder, Tokenizer, default_tokenizer_path

mistral_common = pytest.importorskip("mistral_common")
pydantic = pytest.importorskip("pydantic")
from mistral_common.exceptions import MistralCommonException  # noqa: E402
from mistral_common.protocol.instruct.request import ChatCompletionRequest  # noqa: E402
from mistral_common.protocol.instruct.validator import ValidationMode  # noqa: E402
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer  # noqa: E402

MC_V1 = MistralTokenizer._data_path() / "tokenizer.model.v1"
MC_GENERATE = MistralTokenizer.v1()  # "test" mode: the chat must not end with an assistant message
MC_FINETUNE = MistralTokenizer.from_file(MC_V1, mode=ValidationMode.finetuning)  # must end with one
TOK = Tokenizer.from_default()
SP = sentencepiece.SentencePieceProcessor(model_file=str(MC_V1))

TEXTS = ["", "Hello", " leading", "trailing ", "  a  b  ", "x\r\ny\n\n", "Grüße, 日本語, emoji 🎉", "ꙮ 𓀀 𝔘"]


def U(content):
    return {"role": "user", "content": content}


def A(content):
    return {"role": "assistant", "content": content}


def S(content):
    return {"role": "system", "content": content}


def mistral_common_ids(messages):
    """mistral-common's v1 ids for `messages`, or None where it refuses them.

    A chat ending with an assistant message is a training example (finetuning mode); any other
    chat is a generation prompt (the default test mode).
    """
    ends_with_answer = bool(messages) and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant"
    mc = MC_FINETUNE if ends_with_answer else MC_GENERATE
    try:
        return mc.encode_chat_completion(ChatCompletionRequest(messages=messages)).tokens
    except (MistralCommonException, pydantic.ValidationError):
        return None


def test_shipped_tokenizer_is_mistral_common_v1():
    shipped = hashlib.sha256(default_tokenizer_path().read_bytes()).hexdigest()
    assert shipped == hashlib.sha256(MC_V1.read_bytes()).hexdigest()
    assert (default_tokenizer_path().parent / "NOTICE").read_text().count("Apache") == 1


def test_special_ids_and_vocab():
    assert (TOK.vocab_size, TOK.bos_id, TOK.eos_id, TOK.pad_id) == (32000, 1, 2, None)
    assert TOK.id_to_piece(1) == "<s>" and TOK.id_to_piece(2) == "</s>"
    assert TOK.is_control(1) and TOK.is_control(2) and not TOK.is_control(0)


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("bos,eos", [(True, False), (False, False), (True, True)])
def test_encode_matches_sentencepiece(text, bos, eos):
    expected = [SP.bos_id()] * bos + SP.encode(text) + [SP.eos_id()] * eos
    assert TOK.encode(text, bos=bos, eos=eos) == expected


@pytest.mark.parametrize("text", TEXTS)
def test_decode_skips_control_tokens(text):
    ids = TOK.encode(text, bos=True, eos=True)
    assert TOK.decode(ids) == text
    interleaved = [j for i in ids for j in (i, TOK.bos_id, TOK.eos_id)]
    assert TOK.decode(interleaved) == text


def test_missing_tokenizer_file_raises_mixtral_error(tmp_path):
    with pytest.raises(MixtralError, match="cannot load"):
        Tokenizer(tmp_path / "missing.model")


CHATS = {
    "single turn": [U("What is the capital of France?")],
    "multi turn": [U("Hi"), A("Hello! How can I help?"), U("Tell me a joke."), A("No."), U("Please?")],
    "system prompt": [S("You are terse."), U("Why is the sky blue?")],
    "system prompt, several turns": [S("Be kind."), U("q1"), A("a1"), U("q2"), A("a2"), U("q3")],
    "non-ascii": [S("Réponds en français."), U("Grüße, 日本語, emoji 🎉 ꙮ"), A("Très bien 👍"), U("Ça va ?")],
    "trailing assistant": [U("2+2?"), A("4"), U("and 3+3?"), A("6")],
    "system + trailing assistant": [S("sys"), U("q"), A("a")],
    "whitespace in content": [S("  sys \n"), U("  hi  "), A(" yo "), U("\nq\n"), A("\t")],
    "empty user content": [U(""), A("a"), U("")],
    "consecutive users merged": [U("a"), U("b"), A("c"), A("d"), U("e")],
    "assistant first gets empty user turn": [A("hello"), U("hi")],
    "system after user": [U("q"), S("late system"), U("q2")],
    "several system messages joined": [S("one"), S(""), S("two"), U("q")],
    "system only": [S("sys")],
}


@pytest.mark.parametrize("messages", CHATS.values(), ids=CHATS.keys())
def test_chat_ids_equal_mistral_common(messages):
    expected = mistral_common_ids(messages)
    assert expected is not None
    assert TOK.encode_chat(messages) == expected


def test_chat_format_is_inst_markers_with_system_prompt_in_first_user_turn():
    ids = TOK.encode_chat([S("sys"), U("q1"), A("a1"), U("q2")])
    assert ids[0] == TOK.bos_id
    assert TOK.decode(ids) == "[INST] sys\n\nq1 [/INST] a1 [INST] q2 [/INST]"
    assert ids.count(TOK.eos_id) == 1


REFUSED = {
    "empty list": [],
    "single assistant": [A("hi")],
    "system after assistant": [U("q"), A("a"), S("sys"), U("q2")],
    "empty assistant content": [U("q"), A(""), U("q2")],
    "unknown role": [U("q"), {"role": "bot", "content": "x"}],
    "tool role": [U("q"), {"role": "tool", "content": "x"}],
    "missing content": [{"role": "user"}],
    "non-string content": [U(123)],
    "none content": [U("q"), A(None)],
}


@pytest.mark.parametrize("messages", REFUSED.values(), ids=REFUSED.keys())
def test_wrong_role_order_raises(messages):
    assert mistral_common_ids(messages) is None
    with pytest.raises(ChatFormatError) as info:
        TOK.encode_chat(messages)
    assert isinstance(info.value, MixtralError)
    assert "\n" not in str(info.value) and str(info.value)


@pytest.mark.parametrize("messages", ["just a string", {"role": "user", "content": "x"}, ["not a mapping"]])
def test_non_list_chat_raises(messages):
    with pytest.raises(ChatFormatError):
        TOK.encode_chat(messages)


def stream(ids):
    decoder = StreamDecoder(TOK)
    return [decoder.push(i) for i in ids] + [decoder.flush()]


@pytest.mark.parametrize("text", TEXTS)
def test_stream_decoder_equals_decode(text):
    ids = TOK.encode(text, eos=True)
    assert "".join(stream(ids)) == TOK.decode(ids) == text


def test_stream_decoder_holds_incomplete_utf8():
    euro = [TOK._sp.piece_to_id(p) for p in ("<0xE2>", "<0x82>", "<0xAC>")]
    hello = TOK.encode("Hello", bos=False)
    assert stream(hello + euro + hello) == ["Hello", "", "", "€", " Hello", ""]
    assert stream(euro[:2]) == ["", "", TOK.decode(euro[:2])]


# Any vocabulary id, biased toward byte pieces (ids 3..258), <unk> and the BOS/EOS control ids.
IDS = st.lists(st.one_of(st.integers(0, TOK.vocab_size - 1), st.integers(0, 258), st.sampled_from([1, 2])), max_size=24)


@settings(max_examples=300, deadline=None)
@given(IDS)
def test_stream_decoder_equals_decode_for_any_ids(ids):
    assert "".join(stream(ids)) == TOK.decode(ids)


# Lone surrogates cannot be encoded as UTF-8, so sentencepiece rejects them; bias toward whitespace,
# byte-fallback characters and the "▁" (U+2581) that sentencepiece uses for a space.
TEXT = st.text(st.one_of(st.characters(codec="utf-8"), st.sampled_from(" \u2581\n\t\r\ufffdꙮ𓀀é日🎉")))


@settings(max_examples=300, deadline=None)
@given(TEXT)
def test_decode_inverts_encode_except_u2581_reads_as_space(text):
    """The v1 model normalises nothing ("identity", no whitespace removal, byte fallback), so every
    UTF-8 text round-trips exactly, except that a literal U+2581 decodes as a space."""
    assert TOK.decode(TOK.encode(text, eos=True)) == text.replace("\u2581", " ")


@settings(max_examples=100, deadline=None)
@given(TEXT)
def test_stream_decoder_equals_decode_for_any_text(text):
    ids = TOK.encode(text)
    assert "".join(stream(ids)) == TOK.decode(ids)


CONTENT = st.one_of(st.sampled_from(["", " ", "\n\n", "hi", " hi ", "Grüße 🎉", "ꙮ"]), st.text(max_size=8))
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "user", "assistant", "assistant", "tool"]), "content": CONTENT}
)


@settings(max_examples=300, deadline=None)
@given(st.lists(MESSAGE, max_size=6))
def test_any_chat_equals_mistral_common_or_both_refuse(messages):
    expected = mistral_common_ids(messages)
    if expected is None:
        with pytest.raises(ChatFormatError):
            TOK.encode_chat(messages)
    else:
        assert TOK.encode_chat(messages) == expected
