"""HybridLM against transformers.JambaForCausalLM holding the same weights.

transformers' own multi-token append onto its cache restarts the SSM state (see
env-notes), so chunked appends are compared with full passes, never with its cache.
"""

import pytest
import torch

from model.convert import from_jamba_state_dict, to_jamba_state_dict

CONFIGS = {
    "1 layer, mamba": dict(layers=1),
    "1 layer, attention": dict(layers=1, attn_period=1, attn_offset=0),
    "2 layers, moe": dict(layers=2, experts=4, attn_period=2, attn_offset=1),
    "9 layers, dense": dict(layers=9),
    "9 layers, moe 4 top-2": dict(layers=9, experts=4),
    "16 layers, moe 3 top-2": dict(layers=16, experts=3),
}


@pytest.mark.parametrize("kw", CONFIGS.values(), ids=CONFIGS.keys())
def test_full_pass_and_chunked_appends_match_transformers(make_pair, kw):
    ref, mine = make_pair(**kw)
    ids = torch.randint(0, 512, (41,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = ref(ids[None], use_cache=False).logits[0]
        assert (mine(ids) - expected).abs().max() < 1e-4
        for cuts in ([0, 41], [0, 1, 2, 3, 41], [0, 17, 18, 40, 41], [0, 5, 12, 30, 41]):
            state = mine.new_state()
            got = torch.cat([mine.prefill(state, mine.embed_tokens(ids[s:e]), logits="all") for s, e in zip(cuts, cuts[1:])])
            assert (got - expected).abs().max() < 1e-4, cuts
            assert state.length == 41


def test_last_logits_and_decode_match_full_pass(make_pair):
    ref, mine = make_pair(layers=9, experts=4)
    ids = torch.randint(0, 512, (30,), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = ref(ids[None], use_cache=False).logits[0]
        state = mine.new_state()
        last = mine.prefill(state, mine.embed_tokens(ids[:20]))
        assert (last - expected[19]).abs().max() < 1e-4
        for t in range(20, 30):  # one-token steps take the decode kernels
            assert (mine.prefill(state, mine.embed_tokens(ids[t : t + 1])) - expected[t]).abs().max() < 1e-4


def test_weight_conversion_round_trips(make_pair):
    ref, mine = make_pair(layers=9, experts=4)
    there = to_jamba_state_dict(mine.state_dict())
    assert there.keys() == ref.state_dict().keys()
    for k, v in ref.state_dict().items():
        assert torch.equal(there[k], v), k
    back = from_jamba_state_dict(there)
    assert back.keys() == mine.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in mine.state_dict().items())
