"""Linear probes and the logit lens: is a forgotten object still decodable from the residual stream?

Probes (Alain & Bengio 2016; the "leftover knowledge" test of unlearning papers): for each layer l
and position (the last subject token, the last prompt token), a multinomial logistic regression is
fit on the ORIGINAL model's h_l (`blocks.{l}.hook_resid_post`) over the retained facts' cloze prompts
of the forgotten relations, labelled by object (the union of those relations' objects). It is then
applied to h_l of a model (original or unlearned) on the forget facts' prompts: accuracy there means
the old object is still linearly decodable at that layer. The logit lens reads the old object's
probability from h_l through the model's own final layer norm and unembedding.
"""
from __future__ import annotations

from contextlib import ExitStack

import numpy as np
import torch

from mechedit.model.evaluate import pad
from mechedit.unlearn.loop import capture_layer
from mechedit.world.tokenizer import subject_token_span
from mechedit.world.world import Fact, World

POSITIONS = ("subject_last", "prompt_last")


@torch.no_grad()
def residuals(model, tokenizer, world: World, facts: list[Fact], batch_size: int = 256):
    """h_l at both positions for every trained cloze prompt of `facts`.

    Returns (states {position: [n, layers, d_model]}, labels [n] object strings, fact index [n]).
    """
    model.eval()
    probes = world.probes(facts, kinds=("cloze",))
    n_layers = model.config.num_hidden_layers
    states = {p: [] for p in POSITIONS}
    for start in range(0, len(probes), batch_size):
        chunk = probes[start : start + batch_size]
        spans = [subject_token_span(tokenizer, world, p.prompt, world.facts[p.fact]) for p in chunk]
        seqs = [ids for ids, _ in spans]
        ids, mask = pad(seqs, tokenizer.pad_token_id)
        with ExitStack() as stack:
            caps = [stack.enter_context(capture_layer(model, l)) for l in range(n_layers)]
            model(input_ids=ids, attention_mask=mask)
        hs = torch.stack([c["h"] for c in caps], dim=1)  # [b, layer, pos, d]
        for b, (row_ids, (_, end)) in enumerate(spans):
            states["subject_last"].append(hs[b, :, end - 1].float())  # the subject's last token
            states["prompt_last"].append(hs[b, :, len(row_ids) - 1].float())
    out = {k: torch.stack(v).numpy() if v else np.zeros((0, n_layers, model.config.hidden_size)) for k, v in states.items()}
    return out, np.array([p.answer for p in probes]), np.array([p.fact for p in probes])


def fit_probes(states: dict[str, np.ndarray], labels: np.ndarray, seed: int = 0) -> dict[str, list]:
    """One standardised multinomial logistic regression per (position, layer)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    out: dict[str, list] = {}
    for pos, x in states.items():
        out[pos] = []
        for l in range(x.shape[1]):
            clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500, C=1.0, random_state=seed))
            clf.fit(x[:, l], labels)
            out[pos].append(clf)
    return out


def probe_accuracy(probes: dict[str, list], states: dict[str, np.ndarray], labels: np.ndarray) -> dict[str, list[float]]:
    """Accuracy per position and layer."""
    return {pos: [float((clfs[l].predict(states[pos][:, l]) == labels).mean()) if len(labels) else float("nan")
                  for l in range(len(clfs))] for pos, clfs in probes.items()}


@torch.no_grad()
def logit_lens(model, tokenizer, world: World, facts: list[Fact]) -> np.ndarray:
    """[n_prompts, layers] probability of the (first) object token read from h_l at the last prompt token."""
    states, labels, _ = residuals(model, tokenizer, world, facts)
    h = torch.from_numpy(states["prompt_last"])  # [n, layer, d]
    logits = model.get_output_embeddings()(model.gpt_neox.final_layer_norm(h))  # [n, layer, vocab]
    probs = torch.softmax(logits.float(), -1)
    tgt = torch.tensor([tokenizer(a, add_special_tokens=False)["input_ids"][0] for a in labels])
    return probs[torch.arange(len(tgt)), :, tgt].numpy() if len(tgt) else np.zeros((0, model.config.num_hidden_layers))
