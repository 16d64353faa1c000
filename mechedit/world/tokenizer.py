"""The world's tokenizer: a `tokenizers` WordLevel model (one token per word) wrapped for HF.

It splits on whitespace only and prepends `<bos>` to every text, so `tokenizer(prompt)` gives
exactly the ids the model was trained on. Saved files load with `AutoTokenizer.from_pretrained`.
"""
from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from mechedit.world import language as L
from mechedit.world.world import World


def build_tokenizer(world: World) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(world.vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=L.UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{L.BOS} $A", pair=f"{L.BOS} $A $B", special_tokens=[(L.BOS, vocab[L.BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=L.BOS, eos_token=L.EOS, pad_token=L.PAD, unk_token=L.UNK,
        padding_side="right", model_max_length=128,
    )
