"""First-letter absorption, steps 1-2: the single-token alphabetic vocabulary, the in-context prompts and
the words' activations at the hookpoint."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from saelab.eval.absorption_config import AbsorptionConfig, AbsorptionError
from saelab.models.loading import LoadedModel, capture, forward_until

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------- vocabulary


@dataclass(frozen=True)
class Word:
    """A single-token word: its text as the tokenizer renders the token (leading space kept) and the token id."""

    text: str
    token_id: int

    @property
    def letter(self) -> str:
        return self.text.strip()[0].lower()


def build_vocab(tokenizer: Any) -> list[Word]:
    """Tokens that render as ASCII letters after at most one leading space, special tokens excluded, by id."""
    special = set(tokenizer.all_special_ids)
    words = []
    for token, token_id in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        if token_id in special:
            continue
        text = tokenizer.convert_tokens_to_string([token])
        if token.startswith("▁") and not text.startswith(" "):
            # SentencePiece tokenizers drop the marked leading space when rendering a lone token.
            text = " " + text
        body = text[1:] if text.startswith(" ") else text
        if body and body.isascii() and body.isalpha():
            words.append(Word(text, token_id))
    return words


def first_letter_prompt(word: str, examples: Sequence[str], template: str) -> str:
    """`\\n` + one `template + ' ' + LETTER` line per example + the query `template` for `word`."""
    lines = [f"{template.format(word=e)} {e.strip()[0].upper()}" for e in examples]
    return "\n" + "".join(line + "\n" for line in lines) + template.format(word=word)


@dataclass(frozen=True)
class PromptSet:
    """Tokenised prompts, each cut after its query word's token."""

    ids: list[list[int]]
    words: list[Word]
    n_dropped: int
    example: str


def build_prompts(
    tokenizer: Any, words: Sequence[Word], cfg: AbsorptionConfig, rng: np.random.Generator
) -> PromptSet:
    """One prompt per word with ICL examples from `words` (never the word itself); drops words whose token is not
    the last token of the prompt up to the word, or whose prefix tokenises differently inside the full prompt."""
    if len(words) <= cfg.icl_examples:
        raise AbsorptionError(
            f"a split holds {len(words)} words, too few for {cfg.icl_examples} ICL examples; raise "
            "absorption.vocab_size or lower absorption.icl_examples"
        )
    head, _, _ = cfg.prompt_template.partition("{word}")
    fulls, prefixes = [], []
    for i, w in enumerate(words):
        others = rng.choice(len(words) - 1, size=cfg.icl_examples, replace=False)
        examples = [words[j + (j >= i)].text for j in others]  # skip index i: no word among its own examples
        full = first_letter_prompt(w.text, examples, cfg.prompt_template)
        fulls.append(full)
        prefixes.append(full[: len(full) - len(cfg.prompt_template.format(word=w.text))] + head + w.text)
    bos = [] if tokenizer.bos_token_id is None else [int(tokenizer.bos_token_id)]
    enc_full = tokenizer(fulls, add_special_tokens=False)["input_ids"]
    enc_prefix = tokenizer(prefixes, add_special_tokens=False)["input_ids"]
    ids, kept, texts = [], [], []
    for w, text, full_ids, pre_ids in zip(words, prefixes, enc_full, enc_prefix):
        if pre_ids and pre_ids[-1] == w.token_id and full_ids[: len(pre_ids)] == pre_ids:
            ids.append(bos + list(pre_ids))
            kept.append(w)
            texts.append(text)
    return PromptSet(ids, kept, len(words) - len(kept), texts[0] if texts else "")


@torch.no_grad()
def word_activations(
    lm: LoadedModel, hookpoint: str, ids: Sequence[Sequence[int]], batch_size: int, desc: str
) -> torch.Tensor:
    """[N, D] activations at the last token of each prompt (right-padded batches, forward stopped at hookpoint)."""
    pad = lm.tokenizer.pad_token_id or 0
    out = []
    for start in tqdm(range(0, len(ids), batch_size), desc=desc, unit="batch", leave=False):
        batch = ids[start : start + batch_size]
        lens = torch.tensor([len(p) for p in batch])
        ids_BT = torch.full((len(batch), int(lens.max())), pad, dtype=torch.long)
        for b, p in enumerate(batch):
            ids_BT[b, : len(p)] = torch.tensor(p)
        mask_BT = (torch.arange(ids_BT.shape[1])[None] < lens[:, None]).long()
        with capture(lm.model, [hookpoint]) as store:
            forward_until(lm.model, ids_BT.to(lm.device), mask_BT.to(lm.device))
        a_BTD = store[hookpoint]
        out.append(a_BTD[torch.arange(len(batch)), (lens - 1).to(a_BTD.device)].float().cpu())
    return torch.cat(out)
