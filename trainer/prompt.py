"""The Mistral-instruct prompt: the one module that renders Dolly records for both training and evaluation.

Token layout (Mistral v3 tokenizer, same as mistral_common's `encode_instruct` for one user turn and one
assistant turn):

    <s> [INST] ▁user ... [/INST] ▁response ... </s>
    |------------- prompt ----------|--- answer ---------|
    labels: -100 ...           -100 | response ids + </s>

Each text is SentencePiece-encoded on its own (with SentencePiece's leading '▁'), which is what
mistral_common does and what `transformers`' tokenizer does *not* do for a text encoded on its own; so the
ids are built here from the SentencePiece model directly. The evaluator imports `PromptEncoder` and hands
vLLM the very prompt ids training used.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import sentencepiece as spm

IGNORE_INDEX = -100
# Mistral-7B-Instruct-v0.3 ships the same SentencePiece model under both names.
TOKENIZER_FILES = ("tokenizer.model.v3", "tokenizer.model")


def user_message(instruction: str, context: str | None) -> str:
    """The user turn: the instruction, then a blank line and the context passage when there is one."""
    instruction = instruction.strip()
    context = (context or "").strip()
    return f"{instruction}\n\n{context}" if context else instruction


def prompt_text(instruction: str, context: str | None) -> str:
    """Human-readable form of the prompt (reports only; ids come from `PromptEncoder`)."""
    return f"[INST] {user_message(instruction, context)} [/INST]"


def find_tokenizer_model(tokenizer_dir: str | Path) -> Path:
    d = Path(tokenizer_dir)
    for name in TOKENIZER_FILES:
        if (d / name).is_file():
            return d / name
    raise FileNotFoundError(
        f"{d}: no Mistral SentencePiece model ({' or '.join(TOKENIZER_FILES)}); "
        "pass a Hugging Face folder of a Mistral v3 model, e.g. one written by `dolly-train init-tiny-model`"
    )


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]


class PromptEncoder:
    """Turns (instruction, context, response) into Mistral-instruct token ids and response-only labels."""

    def __init__(self, tokenizer_dir: str | Path):
        self.model_file = find_tokenizer_model(tokenizer_dir)
        self.sp = spm.SentencePieceProcessor(model_file=str(self.model_file))
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.inst_id = self.sp.piece_to_id("[INST]")
        self.end_inst_id = self.sp.piece_to_id("[/INST]")
        if self.inst_id == self.sp.unk_id() or self.end_inst_id == self.sp.unk_id():
            raise ValueError(f"{self.model_file}: not a Mistral v3 tokenizer ([INST]/[/INST] control tokens missing)")
        self.vocab_size = self.sp.get_piece_size()

    def _wrap_prompt(self, user_ids: Sequence[int]) -> list[int]:
        return [self.bos_id, self.inst_id, *user_ids, self.end_inst_id]

    def encode_prompt(self, instruction: str, context: str | None) -> list[int]:
        """Prompt ids for generation: `<s>[INST] user [/INST]`."""
        return self._wrap_prompt(self.sp.encode(user_message(instruction, context)))

    def encode_prompts(self, records: Iterable[dict]) -> list[list[int]]:
        users = [user_message(r["instruction"], r.get("context")) for r in records]
        return [self._wrap_prompt(ids) for ids in self.sp.encode(users)]

    def encode_examples(self, records: Sequence[dict]) -> list[Encoded]:
        """Batch encoding (SentencePiece encodes a list in one call, which is what makes 15k records fast)."""
        users = self.sp.encode([user_message(r["instruction"], r.get("context")) for r in records])
        answers = self.sp.encode([r["response"].strip() for r in records])
        out = []
        for user_ids, answer_ids in zip(users, answers):
            prompt = self._wrap_prompt(user_ids)
            answer = [*answer_ids, self.eos_id]
            out.append(Encoded(prompt + answer, [IGNORE_INDEX] * len(prompt) + answer))
        return out

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([i for i in ids if i not in (self.bos_id, self.eos_id)])
