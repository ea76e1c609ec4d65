"""HybridLM against transformers.JambaForCausalLM holding the same weights.

transformers' own multi-token append onto its cache restarts the SSM state (see
env-notes), so chunked appends are compared with full passes, never with its cache.
"""

import pytest
import torch

from model import ops
from model.convert import from_jamba_state_dict, to_jamba_state_dict
from model.state import DecodeBatch

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


def test_batched_decode_matches_each_session_decoding_alone(make_pair):
    """Sessions at different history lengths decode together in one forward per token."""
    _, mine = make_pair(layers=9, experts=4)
    ids = torch.randint(0, 512, (40,), generator=torch.Generator().manual_seed(5))
    lengths = [3, 17, 31]
    with torch.no_grad():
        alone, together = [], []
        for n in lengths:
            state = mine.new_state()
            mine.prefill(state, mine.embed_tokens(ids[:n]))
            alone.append(state.fork())
            together.append(state)
        with DecodeBatch(together) as batch:
            for t in range(5):
                step = torch.stack([ids[n + t] for n in lengths])
                got = mine.decode(batch, mine.embed_tokens(step))
                for j, (n, state) in enumerate(zip(lengths, alone)):
                    expected = mine.prefill(state, mine.embed_tokens(ids[n + t : n + t + 1]))
                    assert (got[j] - expected).abs().max() < 1e-5, (t, j)
        assert [s.length for s in together] == [n + 5 for n in lengths]
        # after the batch closes each session owns its state again and goes on alone
        for s, a in zip(together, alone):
            assert all(m.ssm.data_ptr() != o.ssm.data_ptr() for m, o in zip(s.mamba.values(), a.mamba.values()))
            nxt = mine.embed_tokens(ids[:1])
            assert (mine.prefill(s, nxt) - mine.prefill(a, nxt)).abs().max() < 1e-5


def test_decode_batch_rejects_bad_input(make_pair):
    _, mine = make_pair(layers=2, attn_period=2, attn_offset=1)
    s = mine.new_state()
    with pytest.raises(ValueError, match="twice"):
        DecodeBatch([s, s])
    with pytest.raises(ValueError, match="at least one"):
        DecodeBatch([])
    with DecodeBatch([s, mine.new_state()]) as batch, pytest.raises(ValueError, match=r"shape \[2, 64\]"):
        mine.decode(batch, torch.zeros(3, 64))
    # while a batch is open its sessions take no append, rollback or second batch
    with DecodeBatch([s]):
        with pytest.raises(RuntimeError, match="open DecodeBatch"):
            mine.prefill(s, torch.zeros(2, 64))
        with pytest.raises(RuntimeError, match="open DecodeBatch"):
            s.rollback(0)
        with pytest.raises(RuntimeError, match="open DecodeBatch"):
            DecodeBatch([s])
    assert mine.prefill(s, torch.zeros(2, 64)) is not None  # closed: usable again


def test_model_on_triton_kernels_matches_reference(make_pair):
    """The whole model with the Mamba ops on Triton (compiled on a GPU, else the
    interpreter): a chunked prefill and a batched decode give the reference's logits."""
    ref, mine = make_pair(layers=3, experts=2, attn_period=3, attn_offset=1)  # small: the interpreter is slow
    device = "cuda" if torch.cuda.is_available() else "cpu"
    mine = mine.to(device)
    ids = torch.randint(0, 512, (30,), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = ref(ids[None], use_cache=False).logits[0]
        ids = ids.to(device)
        with ops.use_kernels("triton"):
            assert ops.resolve(device) == "triton"
            states = [mine.new_state(), mine.new_state()]
            got = torch.cat([mine.prefill(states[0], mine.embed_tokens(ids[s:e]), logits="all") for s, e in ((0, 11), (11, 25))])
            mine.prefill(states[1], mine.embed_tokens(ids[:20]))
            with DecodeBatch(states) as batch:
                for t in range(3):
                    logits = mine.decode(batch, mine.embed_tokens(torch.stack([ids[25 + t], ids[20 + t]])))
                    got = torch.cat([got, logits[:1]])
                    assert (logits[1].cpu() - expected[20 + t]).abs().max() < 1e-4
        assert (got.cpu() - expected[:28]).abs().max() < 1e-4
