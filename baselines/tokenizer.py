"""An offline CLIP BPE tokenizer built from a caption vocabulary.

The result is a stock ``CLIPTokenizer`` (vocab + merges) that ``CLIPTokenizer.from_pretrained``
loads. All 256 byte symbols and their end-of-word forms are in the vocabulary, so text outside
the caption vocabulary is spelled out in bytes instead of collapsing to ``<|endoftext|>`` (which
would end CLIP's pooled sequence early).
"""

from __future__ import annotations

import itertools
import json

from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import CLIPTokenizer

from baselines import data

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
EXTRA_WORDS = ("shape", "image", "photo", "of", "with", "and", "the", "background", "sks", "picture")
_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def caption_corpus() -> list[str]:
    """Every shapes caption (each combination of named attributes) plus a few generic words."""
    names = [data.SHAPES, data.COLOURS, data.COLOURS, data.POSITIONS, data.SIZES]
    corpus = [
        data.caption(dict(zip(("shape", "colour", "background", "position", "size"), combo)))
        for combo in itertools.product(*names)
        if combo[1] != combo[2]
    ]
    return corpus + [" ".join(EXTRA_WORDS)] * 10


def build_clip_tokenizer(corpus: list[str] | None = None, model_max_length: int = 24) -> CLIPTokenizer:
    """Train byte-level BPE merges on ``corpus`` until every word is one token; wrap as CLIPTokenizer."""
    corpus = caption_corpus() if corpus is None else corpus
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    bpe.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=100_000,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
    )
    bpe.train_from_iterator(corpus, trainer)
    trained = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    # The trainer breaks ties between equally frequent pairs differently from process to process, so
    # ids follow a fixed order instead of the merge order: bytes, bytes</w>, BOS/EOS, the corpus's
    # whole words sorted, then the (build-dependent) intermediate pieces sorted. Every caption word,
    # byte and special token gets the same id in every build (and on every rank of a DDP run).
    words = {
        w + "</w>" for text in corpus for w, _ in bpe.pre_tokenizer.pre_tokenize_str(bpe.normalizer.normalize_str(text))
    }
    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    base = symbols + [s + "</w>" for s in symbols] + [BOS, EOS]
    merged = {"".join(m) for m in merges} - set(base)
    vocab_list = base + sorted(merged & words) + sorted(merged - words)
    vocab = {token: i for i, token in enumerate(vocab_list)}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
