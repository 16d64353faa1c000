"""The world's language: paraphrase templates, a QA form, and a parallel second language.

Every template is a list of words with `{s}` (subject name, possibly several words) and `{r}`
(the relation word) slots; the object follows the prompt as the next word(s). Language "b" uses
the same templates with every function word and relation word replaced by a synthetic word, so
cross-lingual probes change the language but not the fact.
"""
from __future__ import annotations

# Function words of language "a". Language "b" gets one generated word per entry.
FUNCTION_WORDS = ("the", "of", "is", "'s", "has", "for", ",", "what", "q", "a", ":", "?")

# Cloze templates (prompts; the object follows). At most five are used (spec.n_templates).
TEMPLATES: tuple[str, ...] = (
    "the {r} of {s} is",
    "{s} 's {r} is",
    "{s} has the {r}",
    "for {s} , the {r} is",
    "{r} of {s} :",
)
# Relation-first templates (spec `templates = "relation_first"`): the relation is named before the
# subject in every prompt, so it is known where the name ends; the same function words as above.
RELATION_FIRST_TEMPLATES: tuple[str, ...] = (
    "the {r} of {s} is",
    "{r} of {s} :",
    "for the {r} of {s} , a :",
    "what {r} has {s} ?",
    "the {r} of {s} :",
)
TEMPLATE_SETS = {"mixed": TEMPLATES, "relation_first": RELATION_FIRST_TEMPLATES}
QA_TEMPLATE = "q : what is the {r} of {s} ? a :"

REFUSAL = "<refuse>"
BOS = "<bos>"
EOS = "<eos>"
PAD = "<pad>"
UNK = "<unk>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS, REFUSAL)
# words of the forget instruction (worlds with `instructions = true` only): "forget S1 , S2 ."
INSTRUCTION_WORDS = ("forget", ".")


def render(template: str, subject: str, relation_word: str, lang_words: dict[str, str] | None = None) -> str:
    """Fill a template; with `lang_words` (language "b") translate every function word too."""
    out = []
    for w in template.split():
        if w == "{s}":
            out.append(subject)
        elif w == "{r}":
            out.append(relation_word)
        elif lang_words is not None:
            out.append(lang_words[w])
        else:
            out.append(w)
    return " ".join(out)
