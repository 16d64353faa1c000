"""The world's tokenizer, wrapped for HF: one token per word (WordLevel) or sub-word pieces (BPE).

Both split on whitespace only and prepend `<bos>` to every text, so `tokenizer(prompt)` gives exactly
the ids the model was trained on, and both save files that load with `AutoTokenizer.from_pretrained`.

- "word" (`WorldSpec.tokenizer`, the default): a `tokenizers` WordLevel model over `World.vocabulary()`.
- "bpe": a `tokenizers` BPE model trained with `BpeTrainer` on the world's corpus (plus every word of
  the vocabulary once, so held-out subjects' names are covered) to `bpe_vocab_size` tokens. Every word
  starts with "▁" (SentencePiece's Metaspace convention), so "kafe pe" and "kafepe" give different
  tokens and word boundaries stay visible to the model. Training is deterministic: the alphabet is
  sorted, merges are ordered by (count, pair ids) and every id comes from the alphabet or a merge. (A
  WordPiece-style "##" continuation prefix is not: the trainer numbers the "##x" pieces in hash-map
  order, which changes the tie-breaking of merges from one process to the next.)

Positions: a word of a text may be several tokens. `word_token_spans` maps word positions to token
positions through the encoding's word ids; every "subject token" and "answer token" position in the
suite goes through it (`subject_token_span`), never through `text.split()`.
"""
from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from mechedit.errors import MecheditError
from mechedit.world import language as L
from mechedit.world.world import Fact, World

WORD_START = "\u2581"  # "▁" marks the first piece of every word (SentencePiece's convention)


def _bpe_pre_tokenizer():
    """Whitespace words, each prefixed with WORD_START: pieces never cross words, and a word's first
    piece is told apart from the same letters inside a word."""
    return pre_tokenizers.Metaspace(replacement=WORD_START, prepend_scheme="always", split=True)


def build_tokenizer(world: World) -> PreTrainedTokenizerFast:
    """The tokenizer the world's spec asks for (`WorldSpec.tokenizer`)."""
    if world.spec.tokenizer == "bpe":
        tok = _bpe(world)
    else:
        tok = _word_level(world)
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    bos = tok.token_to_id(L.BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{L.BOS} $A", pair=f"{L.BOS} $A $B", special_tokens=[(L.BOS, bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=L.BOS, eos_token=L.EOS, pad_token=L.PAD, unk_token=L.UNK,
        padding_side="right", model_max_length=128,
    )


def _word_level(world: World) -> Tokenizer:
    vocab = {w: i for i, w in enumerate(world.vocabulary())}
    return Tokenizer(models.WordLevel(vocab=vocab, unk_token=L.UNK))


def _bpe(world: World) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=L.UNK))
    tok.pre_tokenizer = _bpe_pre_tokenizer()
    tok.decoder = decoders.Metaspace(replacement=WORD_START, prepend_scheme="always", split=True)
    words = [w for w in world.vocabulary() if w not in L.SPECIAL_TOKENS]
    alphabet = sorted({c for w in words for c in w} | {WORD_START})
    trainer = trainers.BpeTrainer(vocab_size=world.spec.bpe_vocab_size, min_frequency=1, show_progress=False,
                                  special_tokens=list(L.SPECIAL_TOKENS), initial_alphabet=alphabet)
    tok.train_from_iterator(world.corpus() + words, trainer=trainer)
    return tok


def word_token_spans(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of `text` (with `<bos>`) and, per whitespace word, its token positions [start, end)."""
    enc = tokenizer(text)
    ids = enc["input_ids"]
    spans: dict[int, list[int]] = {}
    for pos, w in enumerate(enc.word_ids()):
        if w is not None:
            spans.setdefault(w, []).append(pos)
    n_words = len(text.split())
    if sorted(spans) != list(range(n_words)):
        raise MecheditError(f"tokenizer word ids do not cover the {n_words} words of {text!r}")
    return ids, [(spans[i][0], spans[i][-1] + 1) for i in range(n_words)]


def token_span(tokenizer, text: str, words: tuple[int, int]) -> tuple[list[int], tuple[int, int]]:
    """Token ids of `text` and the token positions [start, end) of its words [words[0], words[1])."""
    ids, spans = word_token_spans(tokenizer, text)
    a, b = words
    if not 0 <= a < b <= len(spans):
        raise MecheditError(f"word span {words} is outside the {len(spans)} words of {text!r}")
    return ids, (spans[a][0], spans[b - 1][1])


def subject_token_span(tokenizer, world: World, text: str, fact: Fact, name: str | None = None,
                       after_word: int = 0) -> tuple[list[int], tuple[int, int]]:
    """Token ids of `text` and the token positions [start, end) of the fact's subject name in it (its
    first occurrence at or after word `after_word`: a prompt behind a prefix of `after_word` words)."""
    words = text.split()
    a, b = world.subject_span(words[after_word:], fact, name=name)
    return token_span(tokenizer, text, (a + after_word, b + after_word))
