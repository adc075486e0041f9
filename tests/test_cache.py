"""Cached decoding equals the full forward, and logits never depend on later tokens."""

import pytest
import torch

from bibo_export.config import ExecutionOptions
from bibo_export.model import BiBoForCausalLM
from bibo_export.model.generate import greedy_generate
from helpers import tiny_config

TOL = 1e-4


def make_model(dispatch="index", **overrides):
    torch.manual_seed(0)
    model = BiBoForCausalLM(tiny_config(**overrides), ExecutionOptions(dispatch=dispatch)).eval()
    with torch.no_grad():  # a non-trivial bias so routing differs from plain top-k of softmax
        for moe in model.moe_layers:
            moe.expert_bias.normal_(std=0.3)
    return model


@pytest.mark.parametrize("overrides", [
    dict(),  # conv router, K=3
    dict(router_type="mlp", num_routed_experts=6, num_experts_per_tok=2, kernel_size=4),
    dict(kernel_size=1, dispatch="einsum"),
])
def test_prefill_then_decode_equals_full_forward(overrides):
    model = make_model(**overrides)
    seq = torch.randint(0, 64, (2, 24))
    prompt_len = 8
    with torch.no_grad():
        full = model(seq).logits
        out = model(seq[:, :prompt_len], cache=model.new_cache(2, 24), start_pos=0)
        pieces = [out.logits]
        for t in range(prompt_len, 24):  # 16 decoded tokens
            out = model(seq[:, t:t + 1], cache=out.cache, start_pos=torch.tensor(t))
            pieces.append(out.logits)
    assert (torch.cat(pieces, dim=1) - full).abs().max() <= TOL


def test_greedy_generation_matches_full_forward_argmax():
    model = make_model()
    prompt = torch.randint(0, 64, (3, 5))
    tokens = greedy_generate(model, prompt, max_new_tokens=16)
    assert tokens.shape == (3, 21)
    assert torch.equal(tokens[:, :5], prompt)
    with torch.no_grad():
        full = model(tokens[:, :-1]).logits
    assert torch.equal(full[:, 4:].argmax(-1), tokens[:, 5:])


def test_logits_do_not_depend_on_later_tokens():
    model = make_model()
    seq = torch.randint(0, 64, (2, 20))
    changed = seq.clone()
    changed[:, 12:] = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        a, b = model(seq).logits, model(changed).logits
    assert (a[:, :12] - b[:, :12]).abs().max() <= 1e-6
    assert (a[:, 12:] - b[:, 12:]).abs().max() > 1e-3  # the change is visible afterwards


def test_cache_longer_than_max_positions_is_rejected():
    model = make_model()
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.new_cache(1, 129)


@pytest.mark.parametrize("overrides", [dict(), dict(router_type="mlp", kernel_size=4)])
def test_left_padded_rows_compute_what_each_prompt_computes_alone(overrides):
    """Prompts of lengths 1, 7 and 16 in one left-padded batch: every real position's logits,
    through prefill and 6 cached decode steps, equal each prompt run by itself."""
    model = make_model(**overrides)
    lengths = [1, 7, 16]
    prompts = [torch.randint(0, 64, (n,)) for n in lengths]
    width = max(lengths)
    pad = torch.tensor([width - n for n in lengths])
    ids = torch.stack([torch.cat([torch.zeros(width - len(p), dtype=torch.long), p])
                       for p in prompts])
    steps = 6
    with torch.no_grad():
        out = model(ids, cache=model.new_cache(3, width + steps), start_pos=0, pad=pad)
        batch_logits = [out.logits]
        tokens = out.logits[:, -1].argmax(-1, keepdim=True)
        generated = [tokens]
        for step in range(steps - 1):
            out = model(tokens, cache=out.cache, start_pos=width + step, pad=pad)
            batch_logits.append(out.logits)
            tokens = out.logits[:, -1].argmax(-1, keepdim=True)
            generated.append(tokens)
        batch_logits = torch.cat(batch_logits, dim=1)
        generated = torch.cat(generated, dim=1)
        for row, prompt in enumerate(prompts):
            alone = model(torch.cat([prompt, generated[row, :-1]])[None]).logits[0]
            got = batch_logits[row, pad[row]:]
            assert (got - alone).abs().max() <= TOL, row
            assert torch.equal(alone[len(prompt) - 1:].argmax(-1), generated[row])
