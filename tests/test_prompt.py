"""`trainer.prompt.PromptEncoder` against the reference: mistral_common's own instruct encoding.

The user turn is `prompt.user_message(instruction, context)` and the assistant turn the response with its
outer whitespace stripped: that is the prompt module's template (the same normalization as the user turn;
mistral_common encodes whatever text it is handed). Everything from there on must agree token for token.
"""

from __future__ import annotations

import pytest
from mistral_common.protocol.instruct.messages import AssistantMessage, UserMessage
from mistral_common.protocol.instruct.request import InstructRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from trainer.data.synthetic import CATEGORY_MIX, generate
from trainer.prompt import IGNORE_INDEX, PromptEncoder, user_message
from trainer.tiny_model import write_tokenizer


def encode_example(encoder: PromptEncoder, instruction: str, context: str | None, response: str):
    """One record through the product's batch encoder (the only encoder the product uses)."""
    return encoder.encode_examples([{"instruction": instruction, "context": context, "response": response}])[0]


def prompt_length(enc) -> int:
    """Positions whose label is masked: the prompt."""
    return enc.labels.count(IGNORE_INDEX)


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> PromptEncoder:
    d = tmp_path_factory.mktemp("tokenizer")
    write_tokenizer(d)
    return PromptEncoder(d)


@pytest.fixture(scope="module")
def reference():
    instruct = MistralTokenizer.v3().instruct_tokenizer

    def encode(instruction: str, context: str, response: str) -> list[int]:
        request = InstructRequest(messages=[UserMessage(content=user_message(instruction, context)),
                                            AssistantMessage(content=response.strip())])
        return instruct.encode_instruct(request).tokens

    return encode


EDGE_CASES = [
    ("日本の首都はどこですか？", "", "東京です。"),  # CJK
    ("用一句话总结。", "北京是中国的首都，人口超过两千万。", "北京是中国的首都。"),
    ("Describe this emoji: 🎉🚀", "", "A party popper 🎉 and a rocket 🚀 👩‍👩‍👧"),
    ("Qu'est-ce qu'un café crème ?", "Ångström, naïve, façade, Ærøskøbing", "Un café avec de la crème."),
    ("Line one\nline two\n\nline four", "a\tb\tc\n1\t2\t3", "first\nsecond\n\n- bullet\n\tindented"),
    ("   leading and trailing   ", "  \n context with spaces \t ", "  padded response \n\n"),
    ("\n\nnewlines first", "", "\nnewline-led response"),
    ("Tabs\tinside", "", "x\ty"),
    ("Summarize.", "A long passage. " * 2000, "A passage."),  # ~32k characters of context
    ("Mixed: Москва, Αθήνα, القاهرة, मुंबई", "", "Four cities: Moscow, Athens, Cairo, Mumbai."),
    ("Code?", "", "```python\ndef f(x):\n    return x ** 2\n```"),
    ("Symbols <s> [INST] </s> [/INST]", "", "Literal control-token text [/INST] </s>"),
]


def test_matches_mistral_common_on_generated_records(encoder, reference):
    records = generate(300, seed=7) + generate(100, seed=7, profile="dolly")
    assert {r["category"] for r in records} == set(CATEGORY_MIX)
    encoded = encoder.encode_examples(records)
    mismatches = [r for r, e in zip(records, encoded)
                  if e.input_ids != reference(r["instruction"], r["context"], r["response"])]
    assert not mismatches, f"{len(mismatches)} of {len(records)} differ, e.g. {mismatches[0]!r:.300}"


@pytest.mark.parametrize("case", EDGE_CASES, ids=[f"edge{i}" for i in range(len(EDGE_CASES))])
def test_matches_mistral_common_on_edge_cases(encoder, reference, case):
    instruction, context, response = case
    assert encode_example(encoder, instruction, context, response).input_ids == reference(*case)


def test_literal_control_token_text_is_not_a_control_token(encoder):
    enc = encode_example(encoder, "Say [/INST] please", "", "[/INST] </s>")
    assert enc.input_ids.count(encoder.end_inst_id) == 1
    assert enc.input_ids.count(encoder.eos_id) == 1 and enc.input_ids[-1] == encoder.eos_id


@pytest.mark.parametrize("case", EDGE_CASES[:6] + [("What is Varlo known for?", "", "Glass bells.")])
def test_labels_mask_the_prompt_and_keep_the_response(encoder, case):
    enc = encode_example(encoder, *case)
    cut = enc.input_ids.index(encoder.end_inst_id) + 1  # first response token
    assert enc.input_ids[:2] == [encoder.bos_id, encoder.inst_id]
    assert enc.labels[:cut] == [IGNORE_INDEX] * cut
    assert enc.labels[cut:] == enc.input_ids[cut:]
    assert enc.input_ids[-1] == encoder.eos_id and enc.labels[-1] == encoder.eos_id
    assert IGNORE_INDEX not in enc.labels[cut:]
    assert prompt_length(enc) == cut
    assert encoder.decode(enc.input_ids[cut:]) == case[2].strip()


def test_generation_prompt_is_the_training_prompt(encoder):
    records = generate(50, seed=3)
    for r, enc, prompt in zip(records, encoder.encode_examples(records), encoder.encode_prompts(records)):
        assert prompt == enc.input_ids[: prompt_length(enc)]
        assert prompt == encoder.encode_prompt(r["instruction"], r["context"])


def test_tiny_model_tokenizer_loads_offline_with_transformers(tiny_model_dir, encoder):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)
    assert len(tok) == encoder.vocab_size == 32768
    assert (tok.bos_token_id, tok.eos_token_id) == (encoder.bos_id, encoder.eos_id) == (1, 2)
    assert tok.convert_tokens_to_ids(["[INST]", "[/INST]"]) == [encoder.inst_id, encoder.end_inst_id] == [3, 4]
    # transformers decodes our ids back to the text: the two tokenizers share one vocabulary. (It keeps the
    # response's leading '▁' as a space, which is what vLLM's detokenizer hands the evaluator, too.)
    enc = encode_example(encoder, "Name a city.", "", "Varlo, on the Orin river.")
    decoded = tok.decode(enc.input_ids[prompt_length(enc):], skip_special_tokens=True)
    assert decoded.strip() == "Varlo, on the Orin river." == encoder.decode(enc.input_ids[prompt_length(enc):])
