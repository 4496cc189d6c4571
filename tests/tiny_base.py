"""A tiny pretrained base made inside the tests: random BERT weights, a word-level tokenizer, saved as Hugging Face does.

Nothing is downloaded: the tokenizer's vocabulary is the words :func:`text_table`
writes, and the weights are random (seeded), saved with ``save_pretrained`` as
safetensors.  Two seeds give two bases with different weights' digests and the
same tokenizer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

TOPICS = {
    "billing": ["invoice", "refund", "charge", "payment", "card", "price"],
    "outage": ["down", "error", "crash", "timeout", "server", "offline"],
    "access": ["password", "login", "account", "locked", "reset", "token"],
}
FILLER = ["the", "my", "is", "not", "please", "help", "today", "again", "since", "with", "a", "we", "it"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def vocabulary() -> list[str]:
    return SPECIAL + FILLER + sorted(w for words in TOPICS.values() for w in words)


def make_tiny_base(folder: Path, seed: int = 0, hidden: int = 32, layers: int = 2) -> Path:
    """Save a random BERT (``hidden`` wide) and its tokenizer to ``folder``; returns it."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {word: i for i, word in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")
    fast.save_pretrained(folder)
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=2 * hidden, max_position_embeddings=64, pad_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        BertModel(config).save_pretrained(folder, safe_serialization=True)
    return folder


def text_table(path: Path, rows: int, seed: int = 0, noise: float = 0.2) -> Path:
    """A CSV of support tickets (``text``, ``topic``): a topic's words, fillers, and a share of other topics' words."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    names = sorted(TOPICS)
    texts, labels = [], []
    for _ in range(rows):
        topic = names[int(rng.integers(len(names)))]
        words = []
        for _ in range(int(rng.integers(4, 9))):
            pool = TOPICS[names[int(rng.integers(len(names)))]] if rng.random() < noise else TOPICS[topic]
            words.append(pool[int(rng.integers(len(pool)))] if rng.random() < 0.6 else FILLER[int(rng.integers(len(FILLER)))])
        texts.append(" ".join(words))
        labels.append(topic)
    pd.DataFrame({"text": texts, "topic": labels}).to_csv(path, index=False)
    return path
