import pytest
import torch
from transformers import AutoTokenizer

from apollo_train.shared.protocol import BadRequest
from apollo_train.shared.schema import Example, parse
from apollo_train.tiny_models import build_tiny_model
from worker.chat_tokens import Encoded, ExampleError, _token_ids, encode_example, example_key

SYSTEM = {"role": "system", "content": "Answer like a pirate."}
USER = {"role": "user", "content": "Where is Paris?"}
ANSWER = {"role": "assistant", "content": "Paris is in France."}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    model_dir = build_tiny_model(tmp_path_factory.getbasetemp() / "tiny-qwen3", "qwen3")
    return AutoTokenizer.from_pretrained(model_dir)


def context_and_target(tok, e: Encoded) -> tuple[str, str]:
    return tok.decode(e.input_ids[: e.target_start]), tok.decode(e.input_ids[e.target_start:])


def test_target_is_the_answer_up_to_end_of_turn(tok):
    e = encode_example(tok, Example(messages=[SYSTEM, USER, ANSWER]))
    context, target = context_and_target(tok, e)
    assert context == (
        "<|im_start|>system\nAnswer like a pirate.<|im_end|>\n"
        "<|im_start|>user\nWhere is Paris?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert target == "Paris is in France.<|im_end|>"  # the template's trailing newline is cut
    assert e.input_ids[-1] == tok.eos_token_id
    # The tokens are exactly what the template gives, not a re-tokenization of pieces.
    full = tok.apply_chat_template([SYSTEM, USER, ANSWER], tokenize=True, return_dict=False)
    assert full[: len(e.input_ids)] == e.input_ids
    assert tok.decode(full[len(e.input_ids):]) == "\n"
    assert e.num_target_tokens == len(e.input_ids) - e.target_start


def test_strip_removes_messages_from_the_context(tok):
    stripped = encode_example(tok, Example(messages=[SYSTEM, USER, ANSWER], strip=[0]))
    plain = encode_example(tok, Example(messages=[USER, ANSWER]))
    assert stripped == plain
    context, target = context_and_target(tok, stripped)
    assert "pirate" not in context and context.startswith("<|im_start|>user\n")
    assert target == "Paris is in France.<|im_end|>"


def test_keys(tok):
    base = encode_example(tok, Example(messages=[SYSTEM, USER, ANSWER]))
    assert encode_example(tok, Example(messages=[dict(SYSTEM), dict(USER), dict(ANSWER)])).key == base.key
    other_answer = {"role": "assistant", "content": "Paris is in Texas."}
    assert encode_example(tok, Example(messages=[SYSTEM, USER, other_answer])).key != base.key
    assert encode_example(tok, Example(messages=[USER, ANSWER])).key != base.key
    stripped = encode_example(tok, Example(messages=[SYSTEM, USER, ANSWER], strip=[0]))
    assert stripped.key == encode_example(tok, Example(messages=[USER, ANSWER])).key
    # The key separates context from target: moving the boundary changes it.
    assert example_key([1, 2], [3]) != example_key([1], [2, 3])
    assert len(base.key) == 64 and int(base.key, 16) >= 0


def test_empty_context(tok):
    e = encode_example(tok, Example(messages=[ANSWER]))
    assert context_and_target(tok, e) == ("<|im_start|>assistant\n", "Paris is in France.<|im_end|>")
    e2 = encode_example(tok, Example(messages=[SYSTEM, ANSWER], strip=[0]))
    assert e2 == e


def test_eos_ids(tok):
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    plain = Example(messages=[USER, ANSWER])
    assert encode_example(tok, plain, eos_token_ids=[im_end]) == encode_example(tok, plain)
    # Without an end-of-turn token the whole rendered rest is the target.
    e = encode_example(tok, Example(messages=[USER, ANSWER]), eos_token_ids=[])
    assert context_and_target(tok, e)[1] == "Paris is in France.<|im_end|>\n"


def test_answer_containing_end_of_turn_text_is_not_cut(tok):
    answer = {"role": "assistant", "content": "Say <|im_end|> to stop."}
    e = encode_example(tok, Example(messages=[USER, answer]))
    assert context_and_target(tok, e)[1] == "Say <|im_end|> to stop.<|im_end|>"


def test_max_len(tok):
    e = encode_example(tok, Example(messages=[USER, ANSWER]))
    assert encode_example(tok, Example(messages=[USER, ANSWER]), max_len=len(e.input_ids)) == e
    message = rf"example 3: the example is {len(e.input_ids)} tokens long, more than the limit of 5 tokens"
    with pytest.raises(ExampleError, match=message):
        encode_example(tok, Example(messages=[USER, ANSWER]), max_len=5, where="example 3")


@pytest.mark.parametrize(
    "messages, strip, message",
    [
        ([USER], [], "example 0: the last message must be from the assistant (it is 'user')"),
        ([], [], "example 0: messages: List should have at least 1 item"),
        ("hi", [], "example 0: messages: Input should be a valid list"),
        ([USER, {"role": "assistant", "content": "  "}], [], "example 0: the last (assistant) message is empty"),
        ([{"role": "bot", "content": "x"}, ANSWER], [],
         "example 0: messages[0].role: Input should be 'system', 'user', 'assistant' or 'tool'"),
        ([{"role": "user", "content": 3}, ANSWER], [],
         "example 0: messages[0].content: Input should be a valid string"),
        ([{"role": "user"}, ANSWER], [], "example 0: messages[0].content: Field required"),
        ([{"role": "user", "content": "x", "name": "a"}, ANSWER], [], "example 0: messages[0]: unknown key 'name'"),
        ([{"role": "user", "content": "\ud800"}, ANSWER], [],
         "example 0: messages[0].content: text must be valid Unicode"),
        (["hello", ANSWER], [], "example 0: messages[0]: Input should be a valid dictionary"),
        ([SYSTEM, USER, ANSWER], [2], "example 0: strip index 2 is out of range; it must name a message "
                                      "before the last one (0 to 1)"),
        ([SYSTEM, USER, ANSWER], [-1], "example 0: strip[0]: Input should be greater than or equal to 0"),
        ([ANSWER], [0], "example 0: strip index 0 is out of range; it must name a message before the last one "
                        "(none: this example has no context)"),
        ([SYSTEM, USER, ANSWER], [0, 0], "example 0: strip lists an index twice"),
        ([SYSTEM, USER, ANSWER], [True], "example 0: strip[0]: Input should be a valid integer"),
        ([SYSTEM, USER, ANSWER], "0", "example 0: strip: Input should be a valid list"),
    ],
)
def test_validation(messages, strip, message):
    with pytest.raises(BadRequest) as info:
        parse(Example, {"messages": messages, "strip": strip}, where="example 0")
    assert str(info.value).startswith(message)


def test_valid_examples_pass():
    parse(Example, {"messages": [SYSTEM, USER, ANSWER], "strip": [0, 1]})
    parse(Example, {"messages": [ANSWER]})
    parse(Example, {"messages": [{"role": "tool", "content": ""}, ANSWER], "strip": []})


def test_template_that_does_not_extend_its_prompt(tok, tmp_path):
    tok = AutoTokenizer.from_pretrained(tok.name_or_path)
    tok.chat_template = (
        "{%- for m in messages %}<|im_start|>{{ 'bot' if m['role'] == 'assistant' else m['role'] }}\n"
        "{{ m['content'] }}<|im_end|>\n{%- endfor %}"
        "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
    )
    with pytest.raises(ExampleError, match="example 1: the model's chat template does not render"):
        encode_example(tok, Example(messages=[USER, ANSWER]), where="example 1")


def test_template_that_raises(tok):
    tok = AutoTokenizer.from_pretrained(tok.name_or_path)
    tok.chat_template = (
        "{%- for m in messages %}{%- if m['role'] == 'system' %}{{ raise_exception('System role not "
        "supported') }}{%- endif %}{{ m['content'] }}{%- endfor %}"
    )
    with pytest.raises(ExampleError, match="example 0: the model's chat template rejected this conversation: "
                                           "System role not supported"):
        encode_example(tok, Example(messages=[SYSTEM, ANSWER]), where="example 0")
    assert encode_example(tok, Example(messages=[SYSTEM, ANSWER], strip=[0])).input_ids


def test_tokenizer_without_template_is_not_a_user_error(tok):
    tok = AutoTokenizer.from_pretrained(tok.name_or_path)
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat template") as info:
        encode_example(tok, Example(messages=[USER, ANSWER]))
    assert not isinstance(info.value, ExampleError)


def test_token_ids_accepts_every_return_type(tok):
    ids = [1, 2, 3]
    assert _token_ids(ids) == ids
    assert _token_ids({"input_ids": ids, "attention_mask": [1, 1, 1]}) == ids
    batched = tok(["a b"], add_special_tokens=False)
    assert _token_ids(batched) == tok("a b", add_special_tokens=False)["input_ids"]
    assert _token_ids(torch.tensor([ids])) == ids
