"""Turning one training example from the API into the tokens the trainer sees.

An example is a chat: a list of messages whose last one is the assistant's answer to train on.
Everything before it is the context the answer is conditioned on; `strip` names context
messages to leave out (context distillation: train the answer as if the instruction that
produced it had not been there). Both are tokenized through the model's own chat template,
exactly as vLLM tokenizes a chat request, so the model is trained on what it sees when serving.

    messages = [{"role": "system", "content": "Answer like a pirate."},
                {"role": "user", "content": "Where is Paris?"},
                {"role": "assistant", "content": "Arr, in France!"}]
    encode_example(tokenizer, Example(messages=messages, strip=[0]))
    # context: <|im_start|>user\nWhere is Paris?<|im_end|>\n<|im_start|>assistant\n
    # target:  Arr, in France!<|im_end|>
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct
from collections.abc import Iterable, Sequence

from apollo_train.shared.schema import Example


class ExampleError(ValueError):
    """An example the user sent is unusable; the message says what is wrong and how to fix it."""


@dataclasses.dataclass(frozen=True)
class Encoded:
    """One tokenized example: the loss covers input_ids[target_start:]."""

    input_ids: list[int]
    target_start: int  # index of the first target (answer) token
    key: str  # dedupe key: sha256 of the context and target token ids

    @property
    def num_target_tokens(self) -> int:
        """Target tokens the loss covers. The first token of a sequence has nothing to be
        predicted from, so a target starting at index 0 loses its first token."""
        return len(self.input_ids) - max(self.target_start, 1)


def encode_example(
    tokenizer,
    example: Example,
    max_len: int | None = None,
    *,
    eos_token_ids: Iterable[int] | None = None,
    where: str = "example",
) -> Encoded:
    """Tokenize one example (validated by the shared schema) through the tokenizer's chat template.

    Context = messages[:-1] without the stripped ones, rendered with the generation prompt (what
    vLLM feeds the model before it answers). Target = the rest of the full conversation's tokens,
    cut right after the end-of-turn token so whatever the template puts after it (newlines) is
    not trained. End-of-turn tokens are `eos_token_ids` (pass the generation config's eos ids)
    or else the tokenizer's eos token; if none appears the whole rest is the target.
    """
    messages = example.chat()
    stripped = set(example.strip)
    context = [m for i, m in enumerate(messages[:-1]) if i not in stripped]
    target = messages[-1]

    prompt = _render(tokenizer, context, add_generation_prompt=True, where=where)
    full = _render(tokenizer, context + [target], add_generation_prompt=False, where=where)
    if full[: len(prompt)] != prompt:
        raise ExampleError(
            f"{where}: the model's chat template does not render this conversation as its prompt followed "
            f"by the answer (the tokens with the generation prompt are not a prefix of the tokens with the "
            f"answer), so the answer cannot be separated for training; this happens with templates whose "
            f"generation prompt differs from how they render an assistant message (e.g. one that opens a "
            f"reasoning block the rendered answer does not have)"
        )

    answer = full[len(prompt):]
    if eos_token_ids is None:
        eos_token_ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    eos = set(eos_token_ids)
    # The last end-of-turn token, so an answer that itself contains one is not cut short.
    ends = [i for i, t in enumerate(answer) if t in eos]
    if ends:
        answer = answer[: ends[-1] + 1]
    if not answer:
        raise ExampleError(f"{where}: the chat template rendered no tokens for the assistant message")

    input_ids = prompt + answer
    if max_len is not None and len(input_ids) > max_len:
        raise ExampleError(
            f"{where}: the example is {len(input_ids)} tokens long, more than the limit of {max_len} "
            f"tokens; shorten its messages"
        )
    return Encoded(input_ids=input_ids, target_start=len(prompt), key=example_key(prompt, answer))


def eos_token_ids(model_dir, tokenizer) -> list[int]:
    """End-of-turn tokens: the generation config's eos ids, else the tokenizer's eos token."""
    from transformers import GenerationConfig

    try:
        eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
    except OSError:
        eos = None
    if eos is None:
        return [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    return list(eos) if isinstance(eos, (list, tuple)) else [eos]


def example_key(context_ids: Sequence[int], target_ids: Sequence[int]) -> str:
    """sha256 hex of the tokenized context and target: equal exactly when both are equal."""
    h = hashlib.sha256()
    for ids in (context_ids, target_ids):
        h.update(struct.pack("<Q", len(ids)))
        h.update(struct.pack(f"<{len(ids)}q", *ids))
    return h.hexdigest()


def _render(tokenizer, conversation: list[dict[str, str]], *, add_generation_prompt: bool, where: str):
    if getattr(tokenizer, "chat_template", None) is None:
        # The server's model, not the example, is at fault: not an ExampleError.
        raise ValueError("the tokenizer has no chat template; training needs a chat model's tokenizer")
    try:
        if conversation:
            out = tokenizer.apply_chat_template(
                conversation, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
            )
        else:
            # transformers refuses an empty conversation; render the bare generation prompt the
            # way apply_chat_template renders any other conversation.
            from transformers.utils.chat_template_utils import render_jinja_template

            rendered, _ = render_jinja_template(
                conversations=[[]],
                chat_template=tokenizer.get_chat_template(),
                add_generation_prompt=add_generation_prompt,
                **tokenizer.special_tokens_map,
            )
            out = tokenizer(rendered[0], add_special_tokens=False)
    except ExampleError:
        raise
    except Exception as exc:  # jinja's raise_exception, bad role order, ...
        raise ExampleError(f"{where}: the model's chat template rejected this conversation: {exc}") from None
    return _token_ids(out)


def _token_ids(out) -> list[int]:
    """apply_chat_template returns a list, a BatchEncoding or a tensor depending on version."""
    if hasattr(out, "keys"):
        out = out["input_ids"]
    if hasattr(out, "tolist"):
        out = out.tolist()
    if out and isinstance(out[0], (list, tuple)):
        out = out[0]
    return [int(t) for t in out]
