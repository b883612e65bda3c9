"""Tests for lookaround.py. Run: python -m pytest -q test_lookaround.py

Real-text tests read LOOKAROUND_AG_NEWS (path to the AG News test.csv) and TIKTOKEN_CACHE_DIR (or network)
and skip with a reason where those are absent."""

import contextlib
import dataclasses
import importlib.util
import io
import json
import math
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import lookaround as L

HERE = os.path.dirname(os.path.abspath(__file__))
PREPARE = os.path.join(HERE, "data", "prepare_ag_news.py")
TINY = ["--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "32", "--batch_size", "8",
        "--warmup_iters", "2", "--eval_iters", "2", "--log_interval", "5", "--gen_seqs", "8",
        "--finetune_labels", "8,16", "--finetune_draws", "1", "--eval_samples", "8", "--elbo_draws", "4"]


def tiny_model(vocab_size=97, n_future=4, seed=0, **config):
    torch.manual_seed(seed)
    return L.GPT(L.GPTConfig(vocab_size=vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=64, n_future=n_future,
                             **config))


def random_ids(B=4, T=32, V=97, seed=0):
    return torch.randint(V, (B, T), generator=torch.Generator().manual_seed(seed))


def record(name, **values):
    """An objective's record with some of its settings' values overridden (the rest: defaults)."""
    o = L.OBJECTIVES[name]
    return dataclasses.replace(o, values={**o.values, **values})


def objective_loss(name, model, idx, **values):
    """An objective's loss, with its default settings but those given."""
    o = record(name, **values)
    return o.loss(model, idx, **o.values)


def window(name, T=32):
    """The training window of an objective at block_size T."""
    return T + L.OBJECTIVES[name].window_extra


VARLEN = L.OBJECTIVES["mlm_varlen"].values  # mlm_varlen's default settings


# ---------------------------------------------------------------------------------------------------
# Model and objectives


@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
@pytest.mark.parametrize("name", list(L.OBJECTIVES))
def test_loss_at_init_is_close_to_ln_vocab(name, pos_emb):
    torch.manual_seed(1)
    loss = objective_loss(name, tiny_model(pos_emb=pos_emb), random_ids(B=16, T=window(name))).item()
    assert abs(loss - math.log(97)) < 0.15, loss


def test_forward_shapes_and_mask_row():
    model = tiny_model()
    idx = random_ids()
    assert model(idx).shape == (4, 32, 97)  # the [MASK] id is never predicted
    assert model.wte.weight.shape[0] == 98
    assert model(idx, attention="bidirectional", rows=torch.zeros(5, dtype=torch.long)).shape == (5, 97)
    assert model(idx, future_offsets=3).shape == (4, 32, 3, 97)  # ar_diverse: every position, offsets 1..3
    # rows index the flattened B*T positions: flat_rows turns per-row positions into them
    positions = torch.tensor([[0, 5], [1, 2], [31, 0], [7, 7]])
    rows = L.flat_rows(positions, 32)
    assert rows.tolist() == [0, 5, 33, 34, 95, 64, 103, 103]
    every = model(idx).gather(1, positions[..., None].expand(-1, -1, 97))
    assert torch.allclose(model(idx, rows=rows).view(4, 2, 97), every, atol=1e-5)


@pytest.mark.parametrize("future_offsets", [1, 4])
@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
def test_causal_attention_does_not_leak_the_future(future_offsets, pos_emb):
    model = tiny_model(pos_emb=pos_emb).eval()
    with torch.no_grad():  # non-zero offset heads, so the per-offset path is exercised too
        model.future_heads.weight.normal_(std=0.1)
    idx = random_ids(B=2)
    t = 12
    changed = idx.clone()
    changed[:, t + 1:] = (changed[:, t + 1:] + 1) % 97
    rows = L.flat_rows(torch.arange(t + 1).expand(2, -1), 32)
    a = model(idx, attention="causal", rows=rows, future_offsets=future_offsets)
    b = model(changed, attention="causal", rows=rows, future_offsets=future_offsets)
    assert torch.allclose(a, b, atol=1e-6)
    # and the test can fail: bidirectional attention does see the change
    seen = [model(x, attention="bidirectional")[:, :t + 1] for x in (idx, changed)]
    assert not torch.allclose(*seen, atol=1e-4)


def capture_hiding(monkeypatch):
    """Record every hide_tokens call an objective makes: its arguments and the corruption it returned."""
    calls = []
    real = L.hide_tokens

    def recording(idx, n_hidden, n_slots, vocab_size, bert_corruption):
        out = real(idx, n_hidden, n_slots, vocab_size, bert_corruption)
        calls.append({"idx": idx, "n_hidden": n_hidden, "n_slots": n_slots, "out": out})
        return out
    monkeypatch.setattr(L, "hide_tokens", recording)
    return calls


def test_mlm_varlen_packed_targets_never_reach_the_input(monkeypatch):
    calls = capture_hiding(monkeypatch)
    rows_seen = []
    model = tiny_model()
    real_forward = model.forward
    model.forward = lambda idx, attention, rows: rows_seen.append(rows) or real_forward(idx, attention, rows)
    torch.manual_seed(0)
    idx = random_ids(B=64)
    objective_loss("mlm_varlen", model, idx)
    (call,), (rows,) = calls, rows_seen
    inputs, positions, targets = call["out"]
    B, T = idx.shape
    hidden = torch.zeros(B * T, dtype=torch.bool)
    hidden[(positions + T * torch.arange(B)[:, None])[targets >= 0]] = True
    assert hidden.view(B, T).sum(1).tolist() == call["n_hidden"].tolist()
    assert (inputs.flatten()[hidden] == 97).all()  # every hidden position shows [MASK]: no target id reaches the input
    assert (inputs.flatten()[~hidden] == idx.flatten()[~hidden]).all()  # everything else is untouched
    # the packed readout: every hidden position exactly once, first; the rest of the fixed-size rows unscored
    n_total = int(hidden.sum())
    assert rows.dim() == 1 and len(rows) >= n_total
    assert sorted(rows[:n_total].tolist()) == hidden.nonzero().flatten().tolist()
    assert not hidden[rows[n_total:]].any()
    visible = (inputs != 97).sum(1).float() / T
    assert visible.min() < 0.2 and visible.max() > 0.8  # the visible length really varies


def test_mlm_varlen_bert_corruption_hides_as_mlm_does(monkeypatch):
    calls = capture_hiding(monkeypatch)
    torch.manual_seed(0)
    idx = random_ids(B=64)
    for corruption in ("mask", "bert"):
        objective_loss("mlm_varlen", tiny_model(), idx, varlen_corruption=corruption)
    shown = {}
    for corruption, call in zip(("mask", "bert"), calls):
        inputs, positions, targets = call["out"]
        hidden_inputs = inputs.gather(1, positions)[targets >= 0]
        shown[corruption] = ((hidden_inputs == 97).float().mean().item(),
                             (hidden_inputs == targets[targets >= 0]).float().mean().item())
    assert shown["mask"] == (1.0, 0.0)  # the default: every hidden position shows [MASK]
    masked, unchanged = shown["bert"]  # of about 2,000 hidden positions: 80% [MASK], 10% kept (+ random hits)
    assert 0.75 < masked < 0.85 and 0.06 < unchanged < 0.15


def test_varlen_ratios_are_uniform_per_row_and_stratified_per_batch():
    from scipy.stats import kstest
    lo, hi = VARLEN["varlen_min"], VARLEN["varlen_max"]
    torch.manual_seed(0)
    B = 8
    draws = torch.stack([L.varlen_mask_ratios(torch.randperm(B), torch.rand(()), lo, hi) for _ in range(2000)])
    uniform = (lo, hi - lo)
    for row in (0, B - 1):  # each row on its own is U[varlen_min, varlen_max]
        assert kstest(draws[:, row].numpy(), "uniform", args=uniform).pvalue > 0.01
    # each batch has one ratio in each of the B strata
    strata = ((draws - lo) / (hi - lo) * B).floor().long()
    assert (strata.sort(1).values == torch.arange(B)).all()
    # and the test can fail: without the permutation, row 0 always sits in the lowest stratum
    unshuffled = torch.stack([L.varlen_mask_ratios(torch.arange(B), torch.rand(()), lo, hi) for _ in range(2000)])
    assert kstest(unshuffled[:, 0].numpy(), "uniform", args=uniform).pvalue < 1e-6
    # and mlm_varlen's draw shuffles the strata: its row 0 hides 32 of 64 on average (unshuffled: at most 10),
    # anywhere up to 61
    first = torch.stack([L.varlen_hidden(B, 64, lo, hi) for _ in range(2000)])[:, 0].float()
    assert abs(first.mean() - 32) < 2 and first.max() > 48


def test_mlm_varlen_batch_total_stays_within_its_bound(monkeypatch):
    calls = capture_hiding(monkeypatch)
    model = tiny_model()
    idx = random_ids(B=16)
    torch.manual_seed(1)
    with torch.no_grad():
        for _ in range(300):
            objective_loss("mlm_varlen", model, idx)
    (lo, hi), (B, T) = (VARLEN["varlen_min"], VARLEN["varlen_max"]), idx.shape
    lowest = L.hidden_counts(L.varlen_mask_ratios(torch.arange(B), torch.zeros(()), lo, hi), T).sum().item()
    highest = L.hidden_counts(L.varlen_mask_ratios(torch.arange(B), torch.ones(()), lo, hi), T).sum().item()
    totals = torch.tensor([call["n_hidden"].sum().item() for call in calls])
    assert lowest <= totals.min() and totals.max() <= highest
    assert highest - lowest <= (hi - lo) * T + B  # a band of one row's range, not B rows'
    # i.i.d. ratios would spread the total about sqrt(B) times wider than this stratified band allows
    iid = L.hidden_counts(torch.empty(300, B).uniform_(lo, hi), T).sum(1)
    assert iid.max() - iid.min() > 2 * (highest - lowest)


def test_mlm_bert_corruption_keeps_targets_out_of_the_input_except_the_keep_case():
    torch.manual_seed(0)
    V = 1000  # large, so a random replacement rarely equals the original by chance
    idx = torch.randint(V, (256, 64))
    n = round(0.15 * 64)
    inputs, positions, targets = L.hide_tokens(idx, torch.full((256,), n), n, V, bert_corruption=True)
    assert (targets >= 0).all() and targets.shape == (256, n)
    shown = inputs.gather(1, positions)
    frac_mask = (shown == V).float().mean().item()
    frac_same = (shown == targets).float().mean().item()
    assert abs(frac_mask - 0.8) < 0.02 and abs(frac_same - 0.1) < 0.02, (frac_mask, frac_same)
    unhidden = torch.ones_like(idx, dtype=torch.bool).scatter(1, positions, False)
    assert (inputs[unhidden] == idx[unhidden]).all()
    # the hidden positions are drawn per row, uniformly: rows differ, and each of the 64 positions is hidden
    # about 256 * 10 / 64 = 40 times (within 4 standard deviations)
    assert (positions != positions[:1]).any(1).float().mean() > 0.9
    hits = torch.bincount(positions.flatten(), minlength=64).float()
    assert ((hits - 40).abs() < 4 * 40 ** 0.5).all()


@pytest.mark.parametrize("name", ["mlm", "mlm_varlen"])
def test_fast_masked_loss_equals_full_logits_reference(name, monkeypatch):
    calls = capture_hiding(monkeypatch)
    model = tiny_model()
    idx = random_ids(B=8)
    fast = objective_loss(name, model, idx)
    # reference: the same corruption, logits at every position, the mean loss over the hidden positions
    (call,) = calls
    inputs, positions, targets = call["out"]
    full_targets = torch.full_like(idx, -1).scatter(1, positions, targets)
    assert (full_targets >= 0).sum(1).tolist() == call["n_hidden"].tolist()
    logits = model(inputs, attention="bidirectional")
    reference = F.cross_entropy(logits.flatten(0, 1), full_targets.flatten(), ignore_index=-1)
    assert torch.allclose(fast, reference, atol=1e-5), (fast, reference)


def test_ar_diverse_batched_heads_equal_a_per_offset_per_position_reference():
    model = tiny_model(n_future=3)
    with torch.no_grad():
        model.future_heads.weight.normal_(std=0.1)
    idx = random_ids(B=4, T=33)  # a causal window: block_size + 1 tokens
    fast = L.ar_diverse(model, idx, n_future=3)
    assert torch.equal(fast, L.ar_diverse(model, idx, n_future=3))  # no random split: same batch, same loss
    # reference: a plain loop over offsets and positions, as a reader would write it
    h = model.features(idx[:, :-1], attention="causal")
    W = model.wte.weight[:97]
    per_offset = []
    for d in range(1, 4):
        losses = []
        for t in range(32):
            if t + d > 32:  # the target x[t + d] lies past the window
                continue
            state = h[:, t] if d == 1 else h[:, t] + h[:, t] @ model.future_heads.weight[d - 2]
            losses.append(F.cross_entropy(state @ W.T, idx[:, t + d], reduction="none"))
        assert len(losses) == 33 - d  # every position that has its target is scored
        per_offset.append(torch.cat(losses).mean())
    assert torch.allclose(fast, torch.stack(per_offset).mean(), atol=1e-5), (fast, per_offset)
    assert not torch.allclose(fast, per_offset[0], atol=1e-3)  # and the next-token loss alone would differ
    # the heads, at the level of the logits: offset d reads h + h @ future_heads[d - 2] (offset 1: h itself)
    logits = model(idx[:, :-1], attention="causal", future_offsets=3)
    assert torch.allclose(logits[:, :, 0], h @ W.T, atol=1e-5)
    for d in (2, 3):
        assert torch.allclose(logits[:, :, d - 1], (h + h @ model.future_heads.weight[d - 2]) @ W.T, atol=1e-5)
    assert not torch.allclose(logits[:, :, 1], logits[:, :, 2], atol=1e-3)  # the heads really differ


@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
@pytest.mark.parametrize("name", list(L.OBJECTIVES))
def test_forward_compiles_without_graph_breaks(name, pos_emb):
    # torch.compile compiles GPT.forward; each objective calls it with fixed-shape positions
    model = tiny_model(pos_emb=pos_emb)
    calls = []
    real_forward = model.forward
    model.forward = lambda *a, **k: calls.append((a, k)) or real_forward(*a, **k)
    objective_loss(name, model, random_ids(T=window(name)))
    (args, kwargs), = calls
    explanation = torch._dynamo.explain(real_forward)(*args, **kwargs)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


def test_compiled_mlm_varlen_training_never_recompiles(tmp_path, monkeypatch):
    # dynamo's guards decide whether a step recompiles, whatever the backend; aot_eager traces forward and
    # backward like the default backend but skips inductor's code generation (half a minute on 2 cores)
    import functools
    from torch._dynamo.utils import counters
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    counters.clear()
    assert L.main(TINY + ["--objective", "mlm_varlen", "--compile", "--max_iters", "8", "--eval_interval", "8",
                          "--no-eval_cluster", "--no-eval_gen", "--out_dir", str(tmp_path / "run")]) == 0
    assert counters["frames"]["total"] == 1 and counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    # and the counters do see a recompile: a readout whose size followed the data would cause one
    torch._dynamo.reset()
    counters.clear()
    model = torch.compile(tiny_model())
    for n_rows in (100, 90):
        model(random_ids(B=8), attention="bidirectional", rows=torch.arange(n_rows))
    assert counters["frames"]["total"] == 2


def test_plateau_exit_is_the_first_evaluation_a_quarter_nat_below_the_unigram_entropy():
    curve = [{"iter": 0, "val_loss": 5.0}, {"iter": 50, "val_loss": 4.2}, {"iter": 100, "val_loss": 3.96},
             {"iter": 150, "val_loss": 3.94}, {"iter": 200, "val_loss": 4.1}, {"iter": 250, "val_loss": 3.0}]
    assert L.plateau_exit_iter(curve, 4.2) == 150  # 3.96 is 0.24 below: still on the plateau; 3.94 is not
    assert L.plateau_exit_iter(curve, 3.25) == 250  # exactly 0.25 below counts
    assert L.plateau_exit_iter(curve, 4.2, margin=0.3) == 250  # a dip back up (4.1) does not count
    assert L.plateau_exit_iter(curve, 3.2) is None and L.plateau_exit_iter([], 4.2) is None


@pytest.mark.parametrize("name", ["ar", "ar_diverse"])
def test_every_position_the_readouts_read_is_trained(name):
    # the clean readout averages every position of a block: each must be a position some target trains. A causal
    # window of block_size + 1 tokens gives the last position a target too (with block_size tokens it had none).
    # (A masked model's every position reaches its targets through attention, so this cannot fail for it; that
    # every position is hidden alike is the BERT-corruption test's.)
    corpus = L.make_synthetic(n_train_docs=50, n_val_docs=2, n_eval_docs=4, block_size=32)
    model = tiny_model(vocab_size=corpus.vocab_size, pos_emb="learned")  # a position table: one row per position
    idx = L.get_batch(corpus.train, np.random.default_rng(0), 16, window(name), torch.device("cpu"))
    objective_loss(name, model, idx).backward()
    assert (model.wpe.weight.grad.abs().sum(1) > 0).all()
    if L.OBJECTIVES[name].window_extra:
        model.zero_grad()
        objective_loss(name, model, idx[:, :-1]).backward()  # and the test can fail: one token shorter
        assert (model.wpe.weight.grad[-1] == 0).all()


def test_rope_attention_scores_depend_only_on_relative_offsets():
    model = tiny_model(pos_emb="rope")
    assert model.wpe is None and not any("rope" in name for name in model.state_dict())  # no learned table
    cos, sin = model.rope_cos, model.rope_sin  # (block_size, head_size / 2)
    q, k = torch.randn(2, 32)  # one head of size 32

    def score(a, b):  # query at position a, key at position b
        return (L.rotate(q, cos[a], sin[a]) * L.rotate(k, cos[b], sin[b])).sum()
    for shift in (1, 5, 20):
        assert torch.allclose(score(3, 7), score(3 + shift, 7 + shift), atol=1e-5)
        assert torch.allclose(score(9, 2), score(9 + shift, 2 + shift), atol=1e-5)
    assert not torch.allclose(score(3, 7), score(3, 8), atol=1e-3)  # and the offset does matter
    assert torch.allclose(L.rotate(q, cos[0], sin[0]), q)  # position 0 is not rotated
    assert torch.allclose(L.rotate(q, cos[11], sin[11]).norm(), q.norm())  # a rotation keeps lengths


@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
def test_rope_attention_equals_a_per_position_rotation_reference(attention):
    """The layer's fast path (q and k rotated together, cos and sin cast once per forward) against
    attention written out: each query and key rotated pair by pair at its own position's angle."""
    model = tiny_model(pos_emb="rope")
    attn, x = model.blocks[0].attn, torch.randn(3, 32, model.config.n_embd)
    T, C, H = 32, model.config.n_embd, model.config.n_head
    D = C // H
    rope = tuple(r[:T, None, None] for r in (model.rope_cos, model.rope_sin))
    fast = attn(x, attention, rope)
    q, k, v = attn.c_attn(x).split(C, dim=2)
    q, k, v = (t.view(3, T, H, D) for t in (q, k, v))

    def rotated(t):  # pair (i, i + D/2) at position p turned by p * 10000^(-2i/D)
        out = t.clone()
        for p in range(T):
            for i in range(D // 2):
                a = p * 10000.0 ** (-2 * i / D)
                c, s = math.cos(a), math.sin(a)
                out[:, p, :, i] = t[:, p, :, i] * c - t[:, p, :, i + D // 2] * s
                out[:, p, :, i + D // 2] = t[:, p, :, i] * s + t[:, p, :, i + D // 2] * c
        return out.transpose(1, 2)
    scores = rotated(q) @ rotated(k).transpose(-1, -2) / math.sqrt(D)
    if attention == "causal":
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    y = (scores.softmax(-1) @ v.transpose(1, 2)).transpose(1, 2).reshape(3, T, C)
    assert torch.allclose(fast, attn.c_proj(y), atol=1e-5)


@pytest.mark.parametrize("name", ["mlm", "mlm_varlen"])
@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
def test_masked_outputs_never_depend_on_the_hidden_tokens(name, pos_emb, monkeypatch):
    calls = capture_hiding(monkeypatch)
    model = tiny_model(pos_emb=pos_emb)
    outputs = []
    real_forward = model.forward
    model.forward = lambda *a, **k: outputs.append(real_forward(*a, **k)) or outputs[-1]
    idx = random_ids(B=16)
    torch.manual_seed(3)
    settings = {"mask_ratio": 0.3} if name == "mlm" else {}
    objective_loss(name, model, idx, **settings)
    inputs, positions, targets = calls[0]["out"]
    hidden = torch.zeros_like(idx, dtype=torch.bool).scatter(1, positions, targets >= 0)
    if name == "mlm":  # BERT keeps 10% of hidden tokens as they are: leave those out of this test
        hidden &= inputs != idx
    changed = torch.where(hidden, (idx + 1) % 97, idx)
    torch.manual_seed(3)  # the same hiding: the draw never looks at the token values
    objective_loss(name, model, changed, **settings)
    assert calls[1]["out"][1].equal(positions)
    assert torch.equal(outputs[0], outputs[1])
    # and the test can fail: a change at a visible position does reach the outputs
    torch.manual_seed(3)
    objective_loss(name, model, torch.where(~hidden, (idx + 1) % 97, idx), **settings)
    assert not torch.allclose(outputs[0], outputs[2])


@pytest.mark.parametrize("weight", ["token", "sequence"])
def test_mlm_varlen_weighting_equals_a_per_sequence_loop_reference(weight, monkeypatch):
    calls = capture_hiding(monkeypatch)
    model = tiny_model()
    idx = random_ids(B=8)
    torch.manual_seed(2)
    fast = objective_loss("mlm_varlen", model, idx, varlen_weight=weight)
    (call,) = calls
    inputs, positions, targets = call["out"]
    logits = model(inputs, attention="bidirectional")
    per_sequence, per_token = [], []
    for b in range(8):  # a plain loop: each sequence's hidden positions, one at a time
        losses = [F.cross_entropy(logits[b, p], idx[b, p]) for p, t in zip(positions[b], targets[b]) if t >= 0]
        assert len(losses) == call["n_hidden"][b]
        per_sequence.append(torch.stack(losses).mean())
        per_token += losses
    by_sequence, by_token = torch.stack(per_sequence).mean(), torch.stack(per_token).mean()
    assert torch.allclose(fast, by_sequence if weight == "sequence" else by_token, atol=1e-5)
    assert not torch.allclose(by_sequence, by_token, atol=1e-3)  # the two weightings really differ here
    torch.manual_seed(2)  # the val loss overrides the weighting with "token", as the record says
    val = record("mlm_varlen", varlen_weight=weight)
    val_loss = val.loss(model, idx, **{**val.values, **val.val_values})
    assert torch.allclose(val_loss, by_token, atol=1e-5)


def test_ar_loss_is_next_token_cross_entropy():
    model = tiny_model()
    idx = random_ids(T=33)  # block_size + 1 tokens: every one of the 32 positions has a target
    # the reference: at each t, the model run on the prefix x[..t] alone, its last logits scored against x[t+1]
    alone = torch.stack([F.cross_entropy(model(idx[:, :t + 1], attention="causal")[:, -1], idx[:, t + 1],
                                         reduction="none") for t in range(32)], 1)
    assert torch.allclose(L.ar(model, idx), alone.mean(), atol=1e-5)


@pytest.mark.parametrize("name", list(L.OBJECTIVES))
def test_each_objective_loss_falls_on_a_fixed_batch(name):
    corpus = L.make_synthetic(n_train_docs=50, n_val_docs=2, n_eval_docs=4, block_size=32)
    model = tiny_model(vocab_size=corpus.vocab_size)
    idx = L.get_batch(corpus.train, np.random.default_rng(0), 16, window(name), torch.device("cpu"))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        value = objective_loss(name, model, idx)
        opt.zero_grad()
        value.backward()
        opt.step()
        losses.append(value.item())
    assert np.mean(losses[-5:]) < np.mean(losses[:3]) - 0.75, losses  # nats


# ---------------------------------------------------------------------------------------------------
# The built-in corpus


def test_synthetic_corpus_is_deterministic_labelled_and_readable():
    a = L.make_synthetic(n_train_docs=40, n_val_docs=8, n_eval_docs=40, block_size=48, seed=3)
    b = L.make_synthetic(n_train_docs=40, n_val_docs=8, n_eval_docs=40, block_size=48, seed=3)
    c = L.make_synthetic(n_train_docs=40, n_val_docs=8, n_eval_docs=40, block_size=48, seed=4)
    assert np.array_equal(a.train, b.train) and not np.array_equal(a.train, c.train)
    assert all(len(d) == 48 for d in a.eval_docs)  # documents fill the block
    assert sorted(np.bincount(a.eval_labels)) == [10, 10, 10, 10]
    assert a.train.max() < a.vocab_size
    text = a.decode(a.eval_docs[0])
    assert all(w.strip(".,") in a.itos for w in text.split())


def test_synthetic_topics_are_partly_lexical_partly_structural():
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score
    c = L.make_synthetic(n_train_docs=0, n_val_docs=0, n_eval_docs=800, seed=1)
    topic_words = {w for ws in L.SYN_TOPIC_WORDS.values() for w in ws}
    stripped = [" ".join(w for w in t.split() if w not in topic_words) for t in c.eval_texts]

    def probe(texts, ngrams):
        X = CountVectorizer(token_pattern=r"\S+", ngram_range=ngrams).fit_transform(texts)
        return cross_val_score(LogisticRegression(max_iter=3000), X, c.eval_labels, cv=4).mean()

    bag_of_words = probe(c.eval_texts, (1, 1))
    assert bag_of_words < 0.97  # a bag of words cannot separate the topics perfectly
    assert probe(stripped, (2, 2)) > probe(stripped, (1, 1)) + 0.03  # word order carries topic evidence


# ---------------------------------------------------------------------------------------------------
# Evaluation


def test_cluster_metrics_on_known_clusters():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 50)
    separated = np.eye(4)[labels] * 10 + rng.normal(scale=0.1, size=(200, 4))
    perfect = L.cluster_scores(separated, labels, seed=0)
    assert perfect["nmi"] > 0.999 and perfect["ari"] > 0.999 and perfect["acc"] == 1.0
    assert L.probe_accuracy(separated, labels, seed=0) == 1.0
    shuffled = L.cluster_scores(separated, rng.permutation(labels), seed=0)
    assert shuffled["nmi"] < 0.1 and abs(shuffled["ari"]) < 0.1
    assert L.cluster_accuracy(np.array([0, 0, 1, 1]), np.array([1, 1, 0, 0])) == 1.0


def test_embeddings_ignore_nothing_and_pad_nothing():
    model = tiny_model()
    docs = [np.arange(10), np.arange(20), np.arange(5, 15)]
    for objective in ("ar", "mlm"):  # every document embedded exactly as on its own (0 and 2 share a batch)
        feats = L.embed_documents(model, docs, L.OBJECTIVES[objective], torch.device("cpu"))
        for i, doc in enumerate(docs):
            alone = model.features(torch.tensor(doc)[None], L.OBJECTIVES[objective].attention)[0].detach()
            assert np.allclose(feats["clean"][i], alone.mean(0).numpy(), atol=1e-5)
    # the causal trained readout: the positions that predict a next token, i.e. all but the last
    alone = model.features(torch.arange(20)[None], attention="causal")[0].detach()
    trained = L.embed_documents(model, docs, L.OBJECTIVES["ar"], torch.device("cpu"))["trained"][1]
    assert np.allclose(trained, alone[:19].mean(0).numpy(), atol=1e-5)
    assert not np.allclose(trained, alone.mean(0).numpy())


def noisy_where_visible(model):
    """Wrap model.features: the final states at visible (non-[MASK]) positions become noise (from a stream of its
    own, so the readout's random hidings stay the same)."""
    real, noise = model.features, torch.Generator().manual_seed(123)

    def features(idx, attention="causal"):
        h = real(idx, attention)
        visible = (idx != model.config.vocab_size)[..., None]
        return torch.where(visible, 100 * torch.randn(h.shape, generator=noise), h)
    return features


@pytest.mark.parametrize("objective", ["mlm", "mlm_varlen"])
def test_masked_trained_readout_reads_only_hidden_positions(objective, monkeypatch):
    model = tiny_model()
    docs = [np.arange(i, i + 24) % 97 for i in range(12)] + [np.arange(10)]
    before = L.embed_documents(model, docs, L.OBJECTIVES[objective], torch.device("cpu"), views=4, seed=3)
    again = L.embed_documents(model, docs, L.OBJECTIVES[objective], torch.device("cpu"), views=4, seed=3)
    assert np.array_equal(before["trained"], again["trained"])  # the hidings come from the seed: repeatable
    monkeypatch.setattr(model, "features", noisy_where_visible(model))
    after = L.embed_documents(model, docs, L.OBJECTIVES[objective], torch.device("cpu"), views=4, seed=3)
    assert np.allclose(before["trained"], after["trained"], atol=1e-5)
    assert not np.allclose(before["clean"], after["clean"])  # and the test can fail: the clean readout does change


@pytest.mark.parametrize("objective", ["mlm", "mlm_varlen"])
def test_masked_trained_readout_is_the_mean_state_at_the_hidden_positions(objective, monkeypatch):
    model, x, hidings = tiny_model(), random_ids(B=6), []
    real = L.hide_tokens
    monkeypatch.setattr(L, "hide_tokens", lambda *a, **k: hidings.append(real(*a, **k)) or hidings[-1])
    torch.manual_seed(0)
    with torch.no_grad():
        got = L.hidden_state_mean(model, x, L.OBJECTIVES[objective], torch.device("cpu"))
        inputs, positions, targets = hidings[0]
        h = model.features(inputs, "bidirectional")
    assert (inputs.gather(1, positions)[targets >= 0] == model.config.vocab_size).all()  # all [MASK]
    for b in range(6):  # row by row: the mean of its final states where it was hidden
        assert torch.allclose(got[b], h[b, positions[b][targets[b] >= 0]].mean(0), atol=1e-5)
    # and the trained readout averages --readout_views such hidings, drawn from its seed
    feats = L.embed_documents(model, list(x.numpy()), L.OBJECTIVES[objective], torch.device("cpu"), views=3, seed=4)
    torch.manual_seed(4)
    with torch.no_grad():
        views = [L.hidden_state_mean(model, x, L.OBJECTIVES[objective], torch.device("cpu")) for _ in range(3)]
    assert np.allclose(feats["trained"], torch.stack(views).mean(0).numpy(), atol=1e-5)
    assert not np.allclose(feats["trained"], views[0].numpy(), atol=1e-3)  # three hidings, not one


@pytest.mark.parametrize("objective", ["mlm", "mlm_varlen"])
def test_masked_trained_readout_hides_as_the_objective_does(objective, monkeypatch):
    calls = capture_hiding(monkeypatch)
    model = tiny_model()
    T = 32
    docs = [np.arange(i, i + T) % 97 for i in range(64)]
    L.embed_documents(model, docs, L.OBJECTIVES[objective], torch.device("cpu"), views=8)
    assert len(calls) == 8  # one hiding per view of the batch of 64 documents
    counts = torch.cat([call["n_hidden"] for call in calls]).float()
    hidden_shown = torch.cat([(call["out"][0] == 97).sum(1) for call in calls]).float()
    assert torch.equal(counts, hidden_shown)  # every hidden position shows [MASK] (no 80/10/10 in a readout)
    if objective == "mlm":
        assert (counts == round(0.15 * T)).all()
    else:  # ratios spread over U[0.05, 0.95]: counts from 2 to 30 of 32, mean near half
        assert counts.min() <= 3 and counts.max() >= 29 and abs(counts.mean() - 0.5 * T) < 1.5


@pytest.mark.parametrize("name", ["ar", "mlm"])
def test_batched_generation_scoring_equals_one_position_at_a_time(name):
    model = tiny_model().eval()
    seqs = random_ids(B=3)
    positions = [p for ps in L.scored_positions(32).values() for p in ps]
    fast = L.next_token_nll(model, seqs, positions, L.OBJECTIVES[name], batch_size=2)  # several batches
    V = 97
    for n in range(3):
        for j, p in enumerate(positions):
            if name == "ar":  # only the true prefix, nothing after it
                logits = model(seqs[n:n + 1, :p], attention="causal")[0, -1]
            else:  # the true prefix, then [MASK] at p and everything after it
                x = seqs[n:n + 1].clone()
                x[0, p:] = V
                logits = model(x, attention="bidirectional")[0, p]
            ref = -F.log_softmax(logits, -1)[seqs[n, p]]
            assert abs(fast[n, j].item() - ref.item()) < 1e-4


def test_paired_t_intervals_on_hand_made_differences():
    mean, ci, p = L.paired_t([1.0, 2.0, 3.0])  # mean 2, sd 1: half-width t(0.975, 2)/sqrt(3) = 2.484
    assert mean == 2.0 and ci == pytest.approx([2 - 2.4841, 2 + 2.4841], abs=1e-4)
    assert p == pytest.approx(0.0742, abs=1e-4)  # t = 2 / (1 / sqrt 3) = 3.464 on 2 degrees of freedom, two-sided
    words = {d: L.interval_words(L.paired_t(d)[1]) for d in [(0.10, 0.12, 0.11, 0.09, 0.13),
                                                             (-0.10, -0.12, -0.11, -0.09, -0.13),
                                                             (0.2, -0.1, 0.15, -0.2, 0.05)]}
    assert list(words.values()) == ["interval above 0", "interval below 0", "interval spans 0"]
    assert L.paired_t([0.3]) == (0.3, None, None)  # one seed: a difference, no interval, no p


def test_holm_adjustment_on_a_textbook_example():
    # m = 4: sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> monotone: 0.06 for the last
    assert L.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert L.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert L.holm([0.02]) == [0.02] and L.holm([]) == []


def test_the_seven_primary_rows_fixed_in_advance():
    rows = L.claim_rows([32, 128, 512])
    claims = {row.claim for row in rows}
    assert len(claims) == 4
    primary = [(row.metric, row.a, row.b) for row in rows if row.primary]
    assert primary == [("fine-tuned acc n=128 mlm - ar", "mlm", "ar"),
                       ("fine-tuned acc n=128 ar_diverse - ar", "ar_diverse", "ar"),
                       ("log ppl mlm - ar", "mlm", "ar"),
                       ("grammatical, left to right, ar - mlm", "ar", "mlm"),
                       ("log ppl, prefixes 1..T/4, mlm - mlm_varlen", "mlm", "mlm_varlen"),
                       ("log ppl, prefixes 1..T/4, mlm_half - varlen_bert", "mlm_half", "varlen_bert"),
                       ("grammatical, left to right, mlm_varlen - mlm", "mlm_varlen", "mlm")]
    assert len({(row.metric, row.readout) for row in rows}) == len(rows)  # no row twice
    for row in rows:  # each row names its two members, a before b
        assert re.search(rf"(?<!\w){re.escape(row.a)}(?!\w).* - .*(?<!\w){re.escape(row.b)}(?!\w)", row.metric)
    assert {row.metric for row in L.claim_rows([8])} >= {"fine-tuned acc n=8 mlm - ar", "fine-tuned acc n=128 mlm - ar"}


def hand_made_run(objective, seed, ppl, nmi=None, finetune=None):
    scores = {"nmi": nmi, "ari": 0.0, "acc": 0.5, "probe_acc": 0.5}
    readouts = dict({ro: dict(scores) for ro in L.POOLED_READOUTS}, per_position={"probe_acc": 0.5})
    cluster = None if nmi is None else dict(scores, readouts=readouts)
    return {"objective": objective, "seed": seed, "cluster": cluster,
            "finetune": None if finetune is None else {"128": {"acc": finetune, "acc_std": 0.0}},
            "gen": {"ppl": ppl, "ppl_by_prefix": {str(f): ppl for f in L.PREFIX_FRACTIONS}}}


def test_the_summary_says_where_a_cell_has_fewer_seeds_than_the_study(capsys):
    runs = [hand_made_run("ar", seed, 10.0 + seed) for seed in (1, 2)]
    for r, nll in zip(runs, (2.9, None)):  # seed 2's samples had no possible continuation: no NLL
        r["finetune"], r["gen"]["samples"] = None, {"left_to_right": {"grammatical": 0.8, "topic_kept": 0.5,
                                                                      "nll": nll, "kl": None}}
        r["bayes"] = {"ppl": 9.0, "ppl_by_prefix": {str(f): 9.0 for f in L.PREFIX_FRACTIONS}, "nll": 2.2, "acc": 1.0,
                      "samples": None}  # the language's limits: accuracy columns too, though no run measured them
    table = L.summarize(runs)
    assert table["ar"]["left_to_right nll"] == {"mean": 2.9, "n": 1, "std": 0.0}
    out = capsys.readouterr().out
    assert "2.900 (n=1)" in out and "0.800±0.000" in out and "11.50±0.71" in out  # ppl 11 and 12
    assert "clustering" not in out and "classification" not in out  # no block of the language's row alone
    assert "the language itself" in out


def test_claims_are_paired_by_seed(capsys):
    # seeds differ a lot from each other, but within every seed mlm's perplexity is 10% above ar's: pairing
    # sees a clear result where comparing the two means over seeds could not
    gap = {"ar": (1.0, 0.0), "mlm": (1.1, 0.01)}  # mlm: perplexity x 1.1, NMI + 0.01, in every seed
    runs = [hand_made_run(obj, seed, 10.0 * seed ** 2 * gap[obj][0], nmi=0.1 * seed + gap[obj][1])
            for seed in range(1, 11) for obj in ("ar", "mlm")]
    claims = {(c["metric"], c["readout"]): c for c in L.claims_table(runs)}
    gen = claims["log ppl mlm - ar", None]
    assert gen["mean_diff"] == pytest.approx(math.log(1.1)) and gen["verdict"] == "reproduced"
    # Holm over the seven primary rows, the six that did not run counted as p = 1: 7 x 2/1024
    assert gen["n_expected_sign"] == 10 and gen["primary"] and gen["p_value"] == 2 / 1024
    assert gen["p_holm"] == pytest.approx(7 * 2 / 1024)
    assert gen["p_t"] == 0.0 and gen["detectable"] == pytest.approx(0.0, abs=1e-9)  # no spread at all
    nmi = claims["NMI mlm - ar", "trained"]
    assert nmi["verdict"] == "interval above 0" and not nmi["primary"] and nmi["p_holm"] is None
    assert len(claims) == 6  # only the rows whose two objectives ran: mlm - ar, on five cluster metrics and one ppl
    out = capsys.readouterr().out
    assert "reproduced" in out and "too small" not in out  # 10 seeds can reach Holm p < 0.05
    one_seed = L.claims_table([r for r in runs if r["seed"] == 1])
    assert all(c["verdict"] is None and c["ci95"] is None and c["p_value"] is None for c in one_seed)
    assert "no verdict is possible" in capsys.readouterr().out
    few = {c["metric"]: c for c in L.claims_table([r for r in runs if r["seed"] <= 4])}["log ppl mlm - ar"]
    assert few["p_value"] == 2 / 16 and few["verdict"] == "inconclusive" and few["detectable"] is None  # 4 seeds
    assert "with 4 seeds no primary row can reach a Holm p under 0.05 (the smallest is 7 x 2/2^4)" in \
        capsys.readouterr().out
    L.claims_table([r for r in runs if r["seed"] <= 9])  # 9 seeds: 7 x 2/512 < 0.05, a verdict is possible
    assert "too small" not in capsys.readouterr().out


def test_primary_verdicts_follow_holm_adjusted_sign_flip_p_values():
    # two primary rows over 10 seeds, each with 8 clear wins and 2 small losses: each sign-flip p is 8/1024 (only
    # flipping the two losses' signs, and the mirror images, reach the observed sum), under 0.05 alone; Holm over
    # the seven primary rows (the five that did not run count as p = 1) multiplies the smaller by 7 and keeps the
    # larger at least as high, so both are inconclusive
    runs = []
    losses = {9: -0.004, 10: -0.005}
    for seed in range(1, 11):
        e = losses.get(seed, 0.02 + 0.001 * seed)
        runs += [hand_made_run("ar", seed, 10.0, finetune=0.6),
                 hand_made_run("mlm", seed, 10.0 * math.exp(e), finetune=0.6 + e)]
    claims = {c["metric"]: c for c in L.claims_table(runs)}
    ft, gen = claims["fine-tuned acc n=128 mlm - ar"], claims["log ppl mlm - ar"]
    assert ft["p_value"] == pytest.approx(8 / 1024) and gen["p_value"] == pytest.approx(8 / 1024)
    assert ft["p_holm"] == gen["p_holm"] == pytest.approx(7 * 8 / 1024) and ft["ci95"][0] > 0
    assert ft["verdict"] == gen["verdict"] == "inconclusive" and ft["p_t"] < 0.05
    # with all 10 generation differences positive its p, 2/1024, is the smaller: times 7 it stays below 0.05, and
    # the fine-tuning row's p times 6 does too: both reproduced
    runs = [dict(r, gen={"ppl": 13.0 if r["objective"] == "mlm" else 10.0, "ppl_by_prefix": r["gen"]["ppl_by_prefix"]})
            for r in runs]
    claims = {c["metric"]: c for c in L.claims_table(runs)}
    assert claims["log ppl mlm - ar"]["p_holm"] == pytest.approx(7 * 2 / 1024)
    assert claims["fine-tuned acc n=128 mlm - ar"]["p_holm"] == pytest.approx(6 * 8 / 1024)
    assert claims["log ppl mlm - ar"]["verdict"] == claims["fine-tuned acc n=128 mlm - ar"]["verdict"] == "reproduced"


def test_sign_flip_p_against_every_pattern_and_the_detectable_difference_by_hand():
    import itertools
    from scipy import stats
    assert L.sign_flip_p([0.1] * 8) == 2 / 256 and L.sign_flip_p([1.0, 2.0, 3.0]) == 2 / 8
    rng = np.random.default_rng(0)
    for n in (5, 9, 12):
        d = rng.normal(0.3, 1.0, n)
        slow = np.mean([abs(np.dot(s, d)) >= abs(d.sum()) * (1 - 1e-9)
                        for s in itertools.product([-1, 1], repeat=n)])
        assert L.sign_flip_p(d) == pytest.approx(slow)
    # sd 1 over 16 seeds at alpha 0.05: (t(0.975, 15) + t(0.8, 15)) / 4 = (2.1314 + 0.8662) / 4
    assert L.detectable_difference(1.0, 16, 0.05) == pytest.approx((2.1314 + 0.8662) / 4, abs=1e-3)
    assert L.detectable_difference(2.0, 16, 0.01) == pytest.approx(
        2 * (stats.t.ppf(0.995, 15) + stats.t.ppf(0.8, 15)) / 4)
    assert L.detectable_difference(1.0, 4, 0.05) is None  # 4 seeds: the smallest sign-flip p is 2/16 = 0.125
    assert L.interval_words([0.1, 0.2]) == "interval above 0" and L.interval_words([-0.1, 0.2]) == "interval spans 0"


def test_a_row_whose_model_does_not_beat_its_untrained_network_is_flagged():
    runs = []
    for seed in range(1, 5):
        for obj, acc in (("ar", 0.7), ("mlm", 0.6)):
            r = hand_made_run(obj, seed, 10.0, finetune=acc + 0.01 * seed)
            r["finetune"]["baselines"] = {"random_init": {"128": {"acc": 0.65 + 0.01 * seed, "acc_std": 0.0}}}
            runs.append(r)
    claims = {c["metric"]: c for c in L.claims_table(runs)}
    assert claims["fine-tuned acc n=128 mlm - ar"]["flag"] == \
        "does not measure pretraining: mlm does not beat its untrained network"
    gain = claims["fine-tuned gain over untrained n=128 mlm - ar"]
    assert gain["mean_diff"] == pytest.approx(-0.1) and gain["flag"] is None and not gain["primary"]
    for r in runs:  # raise every untrained network above ar too: the flag names both
        r["finetune"]["baselines"]["random_init"]["128"]["acc"] += 0.1
    assert {c["metric"]: c for c in L.claims_table(runs, verbose=False)}["fine-tuned acc n=128 mlm - ar"]["flag"] \
        == "does not measure pretraining: mlm and ar do not beat their untrained networks"


def labelled_corpus(kind, n_train=64, n_eval=40, T=16, V=20, seed=0):
    """A hand-made labelled task for fine-tuning: "separable" (class k writes only token k) or "noise" (random
    tokens, random labels: nothing to learn)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(4, size=n_train + n_eval)
    docs = [np.full(T, k) if kind == "separable" else rng.integers(V, size=T) for k in labels]
    return L.Corpus(name=kind, vocab_size=V, train=None, val=None, held=None, held_starts=None,
                    eval_docs=docs[n_train:], eval_texts=None, eval_labels=labels[n_train:],
                    label_names=list("abcd"), train_docs=docs[:n_train], train_labels=labels[:n_train])


def small_net(V=20, seed=0):
    torch.manual_seed(seed)
    return L.GPT(L.GPTConfig(vocab_size=V, block_size=16, n_layer=1, n_head=2, n_embd=32))


OBJ = L.OBJECTIVES


def finetuned(net, objective, corpus, n, draw):
    """finetune_predictions by the default recipe."""
    return L.finetune_predictions(net, OBJ[objective], corpus, n, draw, 1, torch.device("cpu"), L.FINETUNE_RECIPE)


@pytest.mark.parametrize("objective", ["ar", "mlm"])
def test_finetuning_learns_what_can_be_learned_and_nothing_else(objective):
    separable = labelled_corpus("separable")
    acc = (finetuned(small_net(), objective, separable, 32, 0) == separable.eval_labels).mean()
    assert acc > 0.95, acc
    noise = labelled_corpus("noise", n_eval=400)
    acc = (finetuned(small_net(), objective, noise, 32, 0) == noise.eval_labels).mean()
    assert abs(acc - 0.25) < 0.1, acc  # chance for 4 classes


def test_finetuning_never_reads_held_out_labels_and_is_reproducible():
    corpus = labelled_corpus("noise", n_train=200)
    net = small_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    first = finetuned(net, "mlm", corpus, 16, 0)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # a copy is fine-tuned
    assert np.array_equal(first, finetuned(net, "mlm", corpus, 16, 0))  # reproducible
    corpus.eval_labels = (corpus.eval_labels + 1) % 4  # poisoned held-out labels
    assert np.array_equal(first, finetuned(net, "mlm", corpus, 16, 0))
    assert not np.array_equal(first, finetuned(net, "mlm", corpus, 16, 1))  # another draw
    picks = L.balanced_draw(corpus.train_labels, 16, np.random.default_rng(0))
    assert len(set(picks.tolist())) == 16 and np.bincount(corpus.train_labels[picks]).tolist() == [4, 4, 4, 4]
    few = np.array([0] * 3 + [1] * 40)  # a class with too few documents: take them all, fill from the others
    assert np.bincount(few[L.balanced_draw(few, 10, np.random.default_rng(0))]).tolist() == [3, 7]


def test_finetuning_baseline_starts_from_the_runs_initial_weights(monkeypatch):
    seen = []
    monkeypatch.setattr(L, "finetune_predictions", lambda net, *a: seen.append(net.state_dict()) or np.zeros(40, int))
    corpus = labelled_corpus("noise")
    trained = small_net(seed=5)
    with torch.no_grad():
        trained.wte.weight.add_(1.0)  # as if trained
    out = L.evaluate_finetune(trained, corpus, OBJ["ar"], 7, torch.device("cpu"), [8, 16], 2)
    assert set(out) == {"8", "16", "baselines", "seconds"} and set(out["baselines"]["random_init"]) == {"8", "16"}
    assert len(seen) == 8 and all(torch.equal(s["wte.weight"], trained.wte.weight) for s in seen[:4])
    torch.manual_seed(7)  # the run's seed: train() builds its initial model exactly so
    initial = L.GPT(trained.config).state_dict()
    assert all(torch.equal(s[k], initial[k]) for s in seen[4:] for k in initial)


def test_per_position_readout_reads_each_position_with_it_alone_hidden(monkeypatch):
    model = tiny_model().eval()
    docs = [random_ids(B=1, T=32, seed=i)[0].numpy() for i in range(3)] + [random_ids(B=1, T=20, seed=9)[0].numpy()]
    inputs = []
    real = model.features
    monkeypatch.setattr(model, "features", lambda x, attention: inputs.append(x) or real(x, attention))
    f = L.per_position_features(model, docs, OBJ["mlm"], torch.device("cpu"))
    assert f.shape == (4, 32 * 64)
    for x in inputs:  # every pass hides exactly one position, [MASK], and copy j hides position j
        assert ((x == 97).sum(1) == 1).all()
        T = x.size(1)
        assert ((x == 97).int().argmax(1) == torch.arange(T).repeat(len(x) // T)).all()
    with torch.no_grad():  # the state read for position 5 of document 0: that position's, in the copy hiding it
        x = torch.as_tensor(docs[0]).clone()
        x[5] = 97
        assert np.allclose(f[0, 5 * 64:6 * 64], real(x[None], "bidirectional")[0, 5].numpy(), atol=1e-5)
    assert (f[3, 20 * 64:] == 0).all() and (f[3, :20 * 64] != 0).any()  # a shorter document: zeros past its end
    # noise at position q: masked, every position's state changes but q's own (q is hidden there); causal, only
    # the states at q and after it change
    q, noisy = 7, [d.copy() for d in docs[:1]]
    noisy[0][q] = (noisy[0][q] + 1) % 97
    blocks = lambda a: a.reshape(32, 64)
    g = L.per_position_features(model, noisy, OBJ["mlm"], torch.device("cpu"))
    changed = ~np.isclose(blocks(g[0]), blocks(f[0]), atol=1e-6).all(1)
    assert not changed[q] and changed[np.arange(32) != q].all()
    fc, gc = (L.per_position_features(model, d, OBJ["ar"], torch.device("cpu"))[0] for d in (docs[:1], noisy))
    changed = ~np.isclose(blocks(gc), blocks(fc), atol=1e-6).all(1)
    assert not changed[:q].any() and changed[q:31].all() and not changed[31]  # the last position is not read


@pytest.mark.parametrize("name", ["ar", "mlm"])
def test_per_position_readout_is_capped_in_tokens_per_pass_and_skipped_when_too_wide(name, monkeypatch):
    model = tiny_model().eval()
    docs = [random_ids(B=1, T=32, seed=i)[0].numpy() for i in range(5)]
    whole = L.per_position_features(model, docs, OBJ[name], torch.device("cpu"))
    monkeypatch.setattr(L, "READOUT_TOKENS_PER_PASS", 96)  # three rows of 32 tokens a pass
    sizes, real = [], model.features
    monkeypatch.setattr(model, "features", lambda x, attention: sizes.append(x.numel()) or real(x, attention))
    capped = L.per_position_features(model, docs, OBJ[name], torch.device("cpu"))
    assert max(sizes) <= 96 and sum(sizes) == 32 * len(docs) * (32 if name == "mlm" else 1)
    assert np.allclose(capped, whole, atol=1e-5)
    monkeypatch.setattr(L, "PER_POSITION_MAX_FEATURES", 32 * 64 - 1)  # one feature too many: not probed
    assert L.per_position_features(model, docs, OBJ[name], torch.device("cpu")) is None
    corpus = labelled_corpus("separable", T=32, V=97)
    c = L.evaluate_clustering(model, corpus, OBJ[name], 0, torch.device("cpu"), 1, untrained=None)
    assert c["readouts"]["per_position"] == {"probe_acc": None, "note": L.PER_POSITION_NOTE}


def test_scored_positions_follow_the_prefix_fractions():
    sp = L.scored_positions(64)
    assert sp[0.125] == list(range(8, 16)) and sp[0.75] == list(range(48, 56))


@pytest.mark.parametrize("name", ["ar", "mlm"])
def test_left_to_right_sampler_keeps_the_prefix_and_its_log_q_is_the_chain_rule(name):
    # the batched sampler's log q against a slow reference: each position's log-probability, read one
    # teacher-forced (ar) or one [MASK]-suffixed (mlm) block at a time from the finished samples
    model, o = tiny_model().eval(), L.OBJECTIVES[name]
    prefixes = random_ids(B=3, T=5, seed=2)
    blocks, log_q = L.generate(model, o, prefixes, ("left_to_right", None, None),
                               generator=torch.Generator().manual_seed(0))
    assert torch.equal(blocks[:, :5], prefixes) and blocks.shape == (3, 32) and int(blocks.max()) < 97
    reference = torch.zeros(3)
    with torch.no_grad():
        for p in range(5, 32):
            x = blocks.clone()
            x[:, p:] = 97  # [MASK] from p on (a causal model never reads it)
            logits = model(x, o.attention)[:, p if o.hiding else p - 1]
            reference += F.log_softmax(logits, -1).gather(1, blocks[:, p:p + 1]).squeeze(1)
    assert torch.allclose(log_q, reference, atol=1e-4)


def recording_logits(V, T, logits_at, seen):
    """A stand-in masked model for unmask_any_order: the logits at position p are logits_at[p] whatever
    the context; it records every block it is shown."""
    def logits_fn(x, rows):
        seen.append(x.clone())
        return logits_at.repeat(len(x), 1)[rows]
    return logits_fn


@pytest.mark.parametrize("steps", [27, 4])
def test_any_order_sampler_reveals_every_position_once_and_never_changes_one(steps):
    T, V, l, mask = 32, 5, 5, 5
    seen = []
    logits_fn = recording_logits(V, T, torch.randn(T, V, generator=torch.Generator().manual_seed(0)), seen)
    x = torch.full((3, T), mask)
    x[:, :l] = random_ids(B=3, T=l, V=V)
    out = L.unmask_any_order(logits_fn, x, l, steps, "random", mask, generator=torch.Generator().manual_seed(1))
    assert len(seen) == steps and not (out == mask).any() and torch.equal(out[:, :l], x[:, :l])
    shown = seen + [out]
    counts = [int((a == mask).sum(1)[0] - (b == mask).sum(1)[0]) for a, b in zip(shown, shown[1:])]
    assert sum(counts) == T - l and max(counts) - min(counts) <= 1  # spread evenly over the steps
    for a, b in zip(shown, shown[1:]):  # a token once shown stays as it is
        assert torch.equal(b[a != mask], a[a != mask]) and ((a != mask) <= (b != mask)).all()


def test_confidence_remasking_reveals_the_surest_positions_first():
    T, V, l, mask = 8, 2, 3, 2
    margin = torch.zeros(T)
    margin[l:] = torch.tensor([1.0, 4.0, 0.0, 3.0, 2.0])  # how sure the stand-in model is at each position
    seen = []
    logits_fn = recording_logits(V, T, torch.stack([margin, -margin], 1), seen)
    x = torch.full((1, T), mask)
    x[0, :l] = 0
    for remask in ("confidence", "random"):
        seen.clear()
        out = L.unmask_any_order(logits_fn, x, l, T - l, remask, mask, generator=torch.Generator().manual_seed(0))
        order = [int((a != b).nonzero()[0, 1]) for a, b in zip(seen, seen[1:] + [out])]
        if remask == "confidence":
            assert order == [4, 6, 7, 3, 5]  # by margin: 4, 3, 2, 1, 0
        else:
            assert sorted(order) == [3, 4, 5, 6, 7] and order != [4, 6, 7, 3, 5]


def test_draw_tokens_divides_by_the_temperature_and_keeps_the_top_k():
    p = torch.tensor([0.5, 0.3, 0.2])
    logits, g = p.log().expand(20000, 3), torch.Generator().manual_seed(0)
    for temperature, top_k, q in ((1.0, 2, torch.tensor([0.625, 0.375, 0.0])),  # renormalised over the top 2
                                  (2.0, None, p.sqrt() / p.sqrt().sum())):  # p^(1/T), renormalised
        tokens, log_q = L.draw_tokens(logits, temperature, top_k, g)
        assert torch.allclose(log_q, q[tokens].log(), atol=1e-6)  # each draw's log-probability under q
        share = torch.bincount(tokens, minlength=3) / len(tokens)
        assert torch.allclose(share, q, atol=0.015)  # 4 standard errors of a share near 0.5 over 20,000 draws


def test_the_val_loss_is_repeatable_weighs_tokens_alike_and_leaves_the_training_stream_alone():
    corpus = L.make_synthetic(n_train_docs=20, n_val_docs=20, n_eval_docs=4, block_size=32)
    model, cpu = tiny_model(vocab_size=corpus.vocab_size), torch.device("cpu")
    val = {}
    for weight in ("sequence", "token"):
        args = L.parse_args(TINY + ["--varlen_weight", weight])
        objective = L.member("mlm_varlen", args)
        torch.manual_seed(5)
        val[weight] = [L.estimate_val_loss(model, objective, corpus, args, cpu, seed=7) for _ in range(2)]
        after = torch.rand(1)
        torch.manual_seed(5)
        assert torch.equal(after, torch.rand(1))  # the training run's random stream is where it was
    assert val["sequence"][0] == val["sequence"][1]  # the same batches and the same masks every time
    assert val["sequence"] == val["token"]  # the val loss is the token mean under either training weighting


def test_accumulated_micro_batches_give_the_gradient_of_their_union():
    stream, cpu = np.random.default_rng(0).integers(97, size=2000), torch.device("cpu")
    grads = {}
    for steps, batch in ((2, 4), (1, 8)):  # two micro-batches of 4 windows, or the same 8 windows at once
        model = tiny_model()
        args = L.parse_args(["--gradient_accumulation_steps", str(steps), "--batch_size", str(batch)])
        losses = L.forward_backward(model, L.ar, stream, np.random.default_rng(1), 33, args, cpu,
                                    contextlib.nullcontext(), None, False)
        assert len(losses) == steps
        grads[steps] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    assert torch.allclose(grads[2], grads[1], atol=1e-6)


def test_learning_rate_warms_up_linearly_then_decays_by_cosine_to_a_tenth():
    args = L.parse_args(["--warmup_iters", "10", "--max_iters", "110"])
    lr = [L.learning_rate(it, args, 1.0) for it in (0, 9, 10, 60, 110, 500)]
    assert lr == pytest.approx([1 / 11, 10 / 11, 1.0, 0.1 + 0.9 * 0.5, 0.1, 0.1])  # halfway: cos(pi/2) = 0
    longer = L.parse_args(["--warmup_iters", "10", "--max_iters", "110", "--lr_decay_iters", "210"])
    assert L.learning_rate(110, longer, 1.0) == pytest.approx(0.55)  # decays to lr_decay_iters, not max_iters


def check_results_schema(r):
    assert set(r) == {"objective", "variant", "values", "seed", "data", "code", "settings", "train",
                      "cluster", "finetune", "gen", "best", "bayes", "finetune_search", "curve"}
    assert r["curve"] and r["curve"][-1]["iter"] == r["train"]["iters"]  # the curve's last point is the end
    best, lowest = r["best"], min(r["train"]["curve"], key=lambda p: p["val_loss"])  # the first of the lowest
    assert (best["iter"], best["val_loss"]) == (lowest["iter"], lowest["val_loss"])
    assert best["final"] == (best["iter"] == r["train"]["iters"])
    assert set(best) == {"iter", "val_loss", "final"} | (set() if best["final"] else {"cluster", "finetune", "gen"})
    assert set(r["settings"]) == set(L.run_settings(L.parse_args([])))  # every flag but those set aside
    assert isinstance(r["objective"], str) and isinstance(r["seed"], int) and isinstance(r["data"], str)
    t = r["train"]
    assert {"iters", "tokens_per_s", "final_val_loss", "seconds", "learning_rate", "curve",
            "plateau_exit_iter"} <= set(t)
    assert t["curve"] and all(set(p) == {"iter", "val_loss"} for p in t["curve"])
    assert t["curve"][-1] == {"iter": t["iters"], "val_loss": t["final_val_loss"]}  # the last point is the end
    assert [p["iter"] for p in t["curve"]] == sorted({p["iter"] for p in t["curve"]})  # each evaluation once
    assert t["plateau_exit_iter"] is None or t["plateau_exit_iter"] in [p["iter"] for p in t["curve"]]
    if r["cluster"] is not None:
        c = r["cluster"]
        metrics = ["nmi", "ari", "acc", "probe_acc"]
        assert set(c) == {*metrics, "baselines", "readouts"}
        assert set(c["readouts"]) == {"trained", "clean", "per_position"}
        for scores in (c, c["readouts"]["trained"], c["readouts"]["clean"]):
            assert set(metrics) <= set(scores) and all(0 <= scores[k] <= 1 for k in ("nmi", "acc"))
            assert set(metrics) <= set(scores["baselines"]["random_init"])
            assert {"nmi", "ari", "acc"} <= set(scores["baselines"]["tfidf"])
        assert {k: c[k] for k in metrics} == {k: c["readouts"]["clean"][k] for k in metrics}  # top level: clean
        pp = c["readouts"]["per_position"]
        assert set(pp) == {"probe_acc", "baselines"} and set(pp["baselines"]) == {"random_init"}
        assert 0 <= pp["probe_acc"] <= 1 and 0 <= pp["baselines"]["random_init"]["probe_acc"] <= 1
    if r["finetune"] is not None:
        f = r["finetune"]
        ns = [k for k in f if k not in ("baselines", "seconds")]
        assert ns and set(f["baselines"]) == {"random_init"} and set(f["baselines"]["random_init"]) == set(ns)
        for scores in [f[n] for n in ns] + [f["baselines"]["random_init"][n] for n in ns]:
            assert set(scores) == {"acc", "acc_std"} and 0 <= scores["acc"] <= 1 and scores["acc_std"] >= 0
        assert f["seconds"] >= 0
    hides = L.OBJECTIVES[(r["variant"] or {}).get("of", r["objective"])].hiding is not None
    if r["gen"] is not None:
        assert set(r["gen"]["ppl_by_prefix"]) == {"0.125", "0.25", "0.5", "0.75"}
        g = r["gen"]
        assert all(v > 1 for v in g["ppl_by_prefix"].values()) and g["ppl"] > 1 and g["seconds"] >= 0
        assert set(g) == {"ppl", "ppl_by_prefix", "ppl_by_length", "chain_nll", "ppl_short_input",
                          "ppl_short_by_length", "elbo", "samples", "seconds"}
        T = r["settings"]["block_size"]
        assert len(g["ppl_by_length"]) == T - 1 and g["ppl"] == pytest.approx(math.exp(g["chain_nll"]))
        assert (g["ppl_short_input"] is None) != hides and (g["ppl_short_by_length"] is None) != hides
        assert (g["elbo"] is None) != hides
        if g["elbo"]:
            assert set(g["elbo"]) == {"nll", "se", "draws"} and g["elbo"]["se"] > 0
        assert (g["samples"] is None) == (r["bayes"] is None)
    if r["bayes"] is not None:  # the built-in language: its limits beside every model's numbers
        b = r["bayes"]
        assert set(b) == {"ppl", "ppl_by_prefix", "ppl_by_length", "nll", "acc", "samples"} and 0 <= b["acc"] <= 1
        samplers = ["left_to_right"] + (["any/24/confidence", "any/4/confidence"]
                                        if hides else [])
        if r["gen"] is not None:
            assert list(r["gen"]["samples"]) == samplers and b["ppl"] < r["gen"]["ppl"]  # the limit is a limit
            assert b["nll"] < r["gen"]["chain_nll"]
        for s in list(((r["gen"] or {}).get("samples") or {}).values()) + [b["samples"]]:
            assert set(s) == {"grammatical", "sentences", "topic_kept", "possible", "nll", "kl"}
        assert b["samples"]["grammatical"] == b["samples"]["topic_kept"] == b["samples"]["possible"] == 1


def test_default_style_run_trains_reports_and_writes_results(tmp_path, capsys):
    out = tmp_path / "run"
    assert L.main(TINY + ["--objective", "mlm_varlen", "--max_iters", "30", "--eval_interval", "15",
                          "--sample", "1", "--out_dir", str(out)]) == 0
    r = json.load(open(out / "results.json"))
    check_results_schema(r)
    assert r["cluster"] is not None and r["gen"] is not None and r["train"]["iters"] == 30
    assert [p["iter"] for p in r["train"]["curve"]] == [0, 15, 30]
    assert r["train"]["learning_rate"] == L.OBJECTIVES["mlm_varlen"].learning_rate  # the objective's own peak...
    assert L.main(TINY + ["--objective", "mlm_varlen", "--max_iters", "2", "--eval_interval", "2", "--learning_rate",
                          "3e-4", "--no-eval_cluster", "--no-eval_gen", "--out_dir", str(out)]) == 0
    assert json.load(open(out / "results.json"))["train"]["learning_rate"] == 3e-4  # ...unless one is given
    text = capsys.readouterr().out
    assert "unigram entropy" in text and "NMI" in text and "perplexity" in text and "->" in text
    assert os.path.exists(out / "ckpt.pt")


def test_default_run_learns_below_unigram_entropy(tmp_path):
    # the default model for a short budget: the loss must beat what a context-free model can do
    out = tmp_path / "run"
    assert L.main(["--max_iters", "60", "--eval_interval", "60", "--no-eval_cluster", "--no-eval_gen",
                   "--no-eval_finetune", "--out_dir", str(out)]) == 0
    r = json.load(open(out / "results.json"))
    corpus = L.make_synthetic(seed=1)
    assert r["train"]["final_val_loss"] < L.unigram_entropy(corpus.train) - 0.5


def prefix_lm(model, idx):
    """A toy fifth objective, the README's worked example: a prefix LM. Bidirectional attention over a
    random-length prefix, causal after it; next-token targets after the prefix (position t predicts x[t+1] for
    t >= prefix - 1, whose context never holds x[t+1])."""
    assert idx.size(1) == model.config.block_size + 1  # its record's window_extra reached the training loop
    B, T = idx.size(0), idx.size(1) - 1
    prefix = torch.randint(1, T, (B, 1, 1, 1), device=idx.device)  # broadcasts over heads, queries and keys
    position = torch.arange(T, device=idx.device)
    # (B, 1, T, T), True: may attend
    attention = (position[None, :] <= position[:, None]) | (position[None, :] < prefix)
    logits = model(idx[:, :-1], attention=attention)
    targets = idx[:, 1:].masked_fill(position < prefix.view(B, 1) - 1, -1)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)


L_make_synthetic = L.make_synthetic
PREFIX_LM = L.Objective("prefix_lm", prefix_lm, attention="causal", learning_rate=7e-4, window_extra=1)


def test_prefix_lm_attention_mask_keeps_the_future_out_after_the_prefix():
    model = tiny_model().eval()
    idx = random_ids(B=1, T=33)
    torch.manual_seed(0)
    prefix = int(torch.randint(1, 32, (1, 1, 1, 1)))  # the draw prefix_lm makes first under this seed
    changed = idx.clone()
    changed[0, prefix + 5:] = (changed[0, prefix + 5:] + 1) % 97
    torch.manual_seed(0)
    a = prefix_lm(model, idx)
    torch.manual_seed(0)
    b = prefix_lm(model, changed)
    assert not torch.allclose(a, b)  # the loss sees the changed targets...
    query, key = torch.arange(32)[:, None], torch.arange(32)[None, :]
    mask = ((key <= query) | (key < prefix))[None, None]
    h_a, h_b = (model.features(x[:, :-1], mask) for x in (idx, changed))
    assert torch.allclose(h_a[:, :prefix + 5], h_b[:, :prefix + 5], atol=1e-6)  # ...no state before them does


def test_a_fifth_objective_is_one_function_and_one_record(tmp_path, monkeypatch, capsys):
    """The README's worked example: register a prefix LM, train it a few steps, run every evaluation on it. Each
    evaluation must read the record: its attention ("causal" when evaluated: an empty prefix), its learning rate,
    its window; its untrained row is named after it."""
    monkeypatch.setitem(L.OBJECTIVES, "prefix_lm", PREFIX_LM)
    monkeypatch.setattr(L, "make_synthetic", lambda **kw: L_make_synthetic(**dict(kw, n_train_docs=400,
                                                                                   n_eval_docs=80)))
    modes = []
    real = L.GPT.features
    monkeypatch.setattr(L.GPT, "features", lambda self, idx, attention="causal": modes.append(
        attention if isinstance(attention, str) else "mask") or real(self, idx, attention))
    out = tmp_path / "run"
    assert L.main(TINY + ["--objective", "prefix_lm", "--max_iters", "6", "--eval_interval", "3", "--sample", "1",
                          "--finetune_labels", "8", "--out_dir", str(out)]) == 0
    r = json.load(open(out / "results.json"))
    check_results_schema(r)
    assert r["objective"] == "prefix_lm" and r["train"]["learning_rate"] == 7e-4
    assert r["cluster"] and r["finetune"] and r["gen"] and r["cluster"]["readouts"]["per_position"]["probe_acc"] > 0
    text = capsys.readouterr().out
    assert "random init (as prefix_lm)" in text and "positions that predict" in text
    assert "samples (left to right" in text
    assert set(modes) == {"mask", "causal"}  # training's mask; every evaluation in the record's mode
    assert "prefix_lm" in L.make_parser().format_help()  # --objective's choices come from the registry
    # --theory refuses it by name, with no patterns; covers it, given some
    assert L.main(["--theory", "--theory_worlds", "1", "--out_dir", str(tmp_path / "t")]) == 2
    assert "prefix_lm has no training patterns" in capsys.readouterr().err and not (tmp_path / "t").exists()
    covered = dataclasses.replace(PREFIX_LM, patterns=lambda length, values: L.ar_patterns(length))
    monkeypatch.setitem(L.OBJECTIVES, "prefix_lm", covered)
    assert L.main(["--theory", "--theory_worlds", "1", "--theory_len", "4", "--n_future", "2",
                   "--out_dir", str(tmp_path / "t")]) == 0
    world = json.load(open(tmp_path / "t" / "theory.json"))["worlds"][0]["objectives"]
    assert world["prefix_lm"]["probe_acc"] == world["ar"]["probe_acc"]  # ar's patterns, ar's exact optimum
    assert "probe_rel_causal" in world["prefix_lm"]  # the causal ceiling, as its attention says


@pytest.mark.parametrize("name", list(L.OBJECTIVES))
def test_each_record_says_what_its_loss_does(name, monkeypatch):
    # the loss names its attention mode and draws its hiding; the record says the same for the evaluations
    o, modes = L.OBJECTIVES[name], []
    calls = capture_hiding(monkeypatch)
    model = tiny_model()
    real = model.features
    monkeypatch.setattr(model, "features", lambda idx, attention: modes.append(attention) or real(idx, attention))
    torch.manual_seed(5)
    objective_loss(name, model, random_ids(B=16, T=window(name)))
    assert modes == [o.attention]
    assert (o.hiding is None) == (not calls) == (o.window_extra == 1)  # hides nothing: next-token targets
    if calls:
        torch.manual_seed(5)  # the same stream: the record's hiding draws the loss's counts
        assert torch.equal(o.hiding(16, 32, o.values), calls[0]["n_hidden"])


def test_an_unknown_attention_mode_is_refused_by_the_record_and_the_model():
    with pytest.raises(ValueError, match="prefix"):
        L.Objective("bad", prefix_lm, attention="prefix", learning_rate=1e-3)
    with pytest.raises(ValueError, match="bidirectonal"):
        tiny_model().features(random_ids(), "bidirectonal")


STUDY = TINY + ["--objective", "all", "--seeds", "1,2", "--max_iters", "60", "--eval_interval", "30",
                "--curve_iters", "30"]


def small_synthetic(make_synthetic=L.make_synthetic, **kwargs):
    """The built-in corpus with fewer documents (evaluating 160 instead of 400): the study tests test mechanics."""
    return make_synthetic(**dict(kwargs, n_train_docs=1000, n_eval_docs=160))


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """One small study (four objectives, two seeds, a curve point at 30 of 60 iterations) on a smaller corpus, run
    once for the tests that read it: its output folder, its printed text and its wall time."""
    out = tmp_path_factory.mktemp("study") / "all"
    t0 = time.time()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(io.StringIO()) as text:
        patch.setattr(L, "make_synthetic", small_synthetic)
        assert L.main(STUDY + ["--out_dir", str(out)]) == 0
    return out, text.getvalue(), time.time() - t0


def test_objective_all_with_seeds_runs_end_to_end(study):
    out, text, _ = study
    for name in list(L.OBJECTIVES):
        for seed in (1, 2):
            check_results_schema(json.load(open(out / name / f"seed{seed}" / "results.json")))
    summary = json.load(open(out / "summary.json"))
    n = 2 * len(L.OBJECTIVES)  # every objective, two seeds
    assert len(summary["runs"]) == n
    assert set(summary["table"]) == set(L.OBJECTIVES) | {L.untrained_row(o) for o in L.OBJECTIVES} | {
        "tf-idf + k-means", L.LANGUAGE_ROW, L.DATA_ROW}
    # every member's untrained row is its own: ar's and ar_diverse's frozen readouts are the same network's,
    # but each fine-tunes by its own recipe, and the row holds that member's runs' own numbers
    clustering = text.split("summary over 2 seed(s)")[1].split("classification:")[0]  # the printed summary's rows:
    rows = [clustering.index(f"\n{name} ") for name in list(L.OBJECTIVES)  # members, then their untrained twins
            + [L.untrained_row(o) for o in L.OBJECTIVES] + ["tf-idf + k-means"]]
    assert rows == sorted(rows)
    twin = {o: summary["table"][L.untrained_row(o)] for o in ("ar", "ar_diverse")}
    assert twin["ar"]["clean_probe_acc"] == twin["ar_diverse"]["clean_probe_acc"]
    for o in ("ar", "ar_diverse"):
        own = [json.load(open(out / o / f"seed{s}" / "results.json"))["finetune"]["baselines"]["random_init"]
               for s in (1, 2)]
        assert twin[o]["finetune@16"]["mean"] == pytest.approx(np.mean([b["16"]["acc"] for b in own]))
    language, data = summary["table"][L.LANGUAGE_ROW], summary["table"][L.DATA_ROW]  # the limits, per seed
    assert language["finetune@16"] == language["clean_probe_acc"] and language["ppl"]["n"] == 2
    assert all(language["ppl"]["mean"] < summary["table"][o]["ppl"]["mean"] for o in L.OBJECTIVES)
    assert data["left_to_right grammatical"]["mean"] == 1 and "any/24/confidence kl" not in summary["table"]["mlm"]
    assert summary["table"]["mlm"]["elbo"]["n"] == 2 and "elbo" not in summary["table"]["ar"]
    assert "samples judged by the language" in text and "the language itself" in text
    assert summary["table"]["ar"]["trained_nmi"]["n"] == 2 and summary["table"]["mlm"]["clean_probe_acc"]["n"] == 2
    assert summary["table"]["ar"]["finetune@16"]["n"] == 2 and "per_position_probe_acc" in summary["table"]["mlm"]
    assert "finetune@8" in summary["table"]["random init (as mlm)"]
    # the verdict table: every claim row, paired over both seeds; the primary rows (fine-tuning at n = 128) did
    # not run here (--finetune_labels 8,16), so only the generation claims have theirs
    rows = {(c["claim"], c["metric"], c["readout"]) for c in summary["claims"]}
    # each clustering claim: 2 n's, 2 gains, 5 readouts; generation 7 rows, variable length 4 (no variants ran)
    assert len(rows) == len(summary["claims"]) == 2 * (2 + 2 + 4 + 1) + 7 + 4
    assert {c["readout"] for c in summary["claims"]} == {"trained", "clean", "per_position", None}
    assert [c["metric"] for c in summary["claims"] if c["primary"]] == [
        "log ppl mlm - ar", "grammatical, left to right, ar - mlm", "log ppl, prefixes 1..T/4, mlm - mlm_varlen",
        "grammatical, left to right, mlm_varlen - mlm"]
    for c in summary["claims"]:
        assert set(c) == {"claim", "metric", "readout", "primary", "mean_diff", "ci95", "p_value", "p_t", "p_holm",
                          "detectable", "n_seeds", "n_expected_sign", "verdict", "flag"}
        assert c["n_seeds"] == 2 and len(c["ci95"]) == 2
        assert c["verdict"] in (("reproduced", "contradicted", "inconclusive") if c["primary"] else
                                ("interval above 0", "interval below 0", "interval spans 0"))
        assert (c["p_holm"] is not None) == c["primary"] and (c["p_value"] in (0.5, 1.0)) == c["primary"]  # 2 seeds
    assert "±" in text and "95% t-interval" in text and "trained readout" in text and "clean readout" in text
    # where the study is: before each run, k of n and the time left; at the end, the total
    first, last = list(L.OBJECTIVES)[0], list(L.OBJECTIVES)[-1]
    assert f"study: {n} runs, 0 read back, {n} to train" in text
    assert f"run 1 of {n} ({first}, seed 1), time left not known" in text
    assert f"run {n} of {n} ({last}, seed 2), about 0:0" in text and f"study: {n} run(s) trained in 0:" in text


def test_a_study_computes_each_untrained_baseline_once_and_reads_it_back(study, monkeypatch):
    out, _, _ = study
    parts = sorted(f.name.split("-")[0] for f in (out / "untrained").iterdir())
    # per seed: the pooled readouts once for ar and ar_diverse (one trunk, one readout) and once per masked
    # objective (their trained readout hides as each does); per-position once per attention mode; fine-tuning once
    # per recipe and attention mode (ar's and ar_diverse's recipes differ, mlm's and mlm_varlen's are one)
    assert L.recipe_for(OBJ["ar"]) != L.recipe_for(OBJ["ar_diverse"])
    assert L.recipe_for(OBJ["mlm"]) == L.recipe_for(OBJ["mlm_varlen"])
    assert parts == ["finetune"] * 6 + ["per_position"] * 4 + ["pooled"] * 6
    monkeypatch.setattr(L, "make_synthetic", small_synthetic)
    args, cpu = L.parse_args(STUDY), torch.device("cpu")
    corpus = L.load_corpus(args, 2)
    for name in ("ar_diverse", "mlm_varlen"):  # each read back what was computed for it (mlm_varlen: by mlm's run)
        r = json.load(open(out / name / "seed2" / "results.json"))
        objective = L.with_values(OBJ[name], args)
        net = L.initial_model(L.config_from_args(args, objective, corpus.vocab_size), 2, cpu)
        fresh = L.evaluate_finetune(net, corpus, objective, 2, cpu, args.finetune_labels, 1, untrained=None)
        assert {n: fresh[n] for n in ("8", "16")} == r["finetune"]["baselines"]["random_init"]
        fresh = L.evaluate_clustering(net, corpus, objective, 2, cpu, args.readout_views, untrained=None)
        for ro in ("trained", "clean", "per_position"):
            assert fresh["readouts"][ro] == r["cluster"]["readouts"][ro]["baselines"]["random_init"]


def test_study_progress_by_hand():
    assert L.clock(3725) == "1:02:05" and L.clock(59.6) == "0:01:00"
    # two runs took 600 s and 1,200 s: the third of five and the two after it, about 900 s each
    assert L.study_progress(3, 5, "mlm", 2, [600, 1200]) == "run 3 of 5 (mlm, seed 2), about 0:45 (h:mm) left"
    assert L.study_progress(1, 5, "ar", 1, []) == "run 1 of 5 (ar, seed 1), time left not known yet"


def test_curve_points_are_the_requested_iterations_and_the_last_is_the_run_itself(study):
    out, text, _ = study
    r = json.load(open(out / "mlm" / "seed1" / "results.json"))
    assert [p["iter"] for p in r["curve"]] == [30, 60]
    first, last = r["curve"]
    val = {p["iter"]: p["val_loss"] for p in r["train"]["curve"]}
    assert first["val_loss"] == val[30] and last["val_loss"] == val[60] == r["train"]["final_val_loss"]
    for ro in ("trained", "clean", "per_position"):  # the last point is the run's final metrics, baselines aside
        assert last["cluster"]["readouts"][ro] == {k: v for k, v in r["cluster"]["readouts"][ro].items()
                                                   if k != "baselines"}
    assert last["gen"] == r["gen"] and {k: last["finetune"][k] for k in ("8", "16")} == {
        k: r["finetune"][k] for k in ("8", "16")}
    assert "baselines" not in json.dumps(r["curve"])  # the untrained baselines: once per run, at the end
    # the point before the end: every readout and generation; fine-tuning at one n (128 is absent: the first, 8)
    assert set(first["cluster"]["readouts"]) == {"trained", "clean", "per_position"}
    assert set(first["finetune"]) == {"8", "seconds"} and set(first["gen"]["ppl_by_prefix"]) == {
        "0.125", "0.25", "0.5", "0.75"}
    assert first["cluster"]["readouts"]["clean"] != last["cluster"]["readouts"]["clean"]  # the model did change
    # verdicts along the curve: the primary rows at every common point, the last as the final claims table
    summary = json.load(open(out / "summary.json"))
    assert list(summary["claims_by_iter"]) == ["30", "60"]
    assert summary["claims_by_iter"]["60"] == [c for c in summary["claims"] if c["primary"]]
    primary_at_30 = [c["metric"] for c in summary["claims_by_iter"]["30"]]
    assert primary_at_30 == [c["metric"] for c in summary["claims"] if c["primary"]]
    assert "verdicts by training budget" in text


def test_the_weights_of_the_lowest_val_loss_are_kept_and_evaluated(tmp_path, monkeypatch):
    # the val loss is scripted to dip at iteration 10 and rise after it: the run keeps the weights the estimate
    # saw there, in its checkpoint too, and evaluates them beside the final ones
    scripted, seen = [5.0, 4.0, 3.0, 3.5, 3.2], []

    def fake_val_loss(model, *a):
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        return scripted[len(seen) - 1]
    monkeypatch.setattr(L, "estimate_val_loss", fake_val_loss)
    flags = TINY + ["--objective", "mlm", "--max_iters", "20", "--eval_interval", "5", "--no-eval_cluster",
                    "--no-eval_finetune", "--out_dir", str(tmp_path / "run")]
    with contextlib.redirect_stdout(io.StringIO()) as text:
        assert L.main(flags) == 0
    r = json.load(open(tmp_path / "run" / "results.json"))
    check_results_schema(r)
    assert (r["best"]["iter"], r["best"]["val_loss"], r["best"]["final"]) == (10, 3.0, False)
    kept = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=False)["best"]
    assert kept["iter"] == 10 and all(torch.equal(kept["state"][k], v) for k, v in seen[2].items())
    assert not all(torch.equal(seen[2][k], v) for k, v in seen[4].items())  # the final weights are others
    args = L.parse_args(flags)
    objective, corpus = L.member("mlm", args), L.load_corpus(args, args.seed)
    model = L.initial_model(L.config_from_args(args, objective, corpus.vocab_size), args.seed, torch.device("cpu"))
    model.load_state_dict(seen[2])
    gen = L.evaluate_generation(model, corpus, objective, args, args.seed)
    assert r["best"]["gen"]["ppl_by_length"] == gen["ppl_by_length"] and r["best"]["gen"]["ppl"] != r["gen"]["ppl"]
    assert "lowest val loss at iter 10 (3.000)" in text.getvalue()


def test_claims_read_at_early_stopping_use_each_runs_best_weights():
    runs = []
    for seed in range(1, 11):
        ar, mlm = hand_made_run("ar", seed, 10.0), hand_made_run("mlm", seed, 12.0)
        ar["best"] = {"iter": 5, "val_loss": 1.0, "final": False, "cluster": None, "finetune": None,
                      "gen": dict(ar["gen"], ppl=15.0)}
        mlm["best"] = {"iter": 10, "val_loss": 1.0, "final": True}
        runs += [ar, mlm]
    final = {c["metric"]: c for c in L.claims_table(runs, verbose=False)}["log ppl mlm - ar"]
    best = {c["metric"]: c for c in L.claims_table([L.at_best(r) for r in runs], verbose=False)}["log ppl mlm - ar"]
    assert final["mean_diff"] == pytest.approx(math.log(1.2)) and best["mean_diff"] == pytest.approx(math.log(0.8))
    assert final["verdict"] == "reproduced" and best["verdict"] == "contradicted"
    assert L.at_best(runs[1]) is runs[1] and L.at_best({"objective": "ar", "best": None}) is None


def test_the_generation_rows_read_what_they_say():
    r = {"gen": {"ppl_by_length": [2.0, 8.0] + [100.0] * 5, "ppl": 5.0, "ppl_short_input": None, "chain_nll": 1.5,
                 "elbo": {"nll": 1.7}, "samples": {"left_to_right": {"grammatical": 0.5},
                                                   "any/48/confidence": {"grammatical": 0.9},
                                                   "any/4/confidence": {"grammatical": 0.1}}}}
    assert L.log_ppl_short_prefixes(r) == pytest.approx(math.log(4))  # T = 8: prefixes of 1 and 2 tokens
    assert L.judged("grammatical")(r) == 0.5 and L.judged("grammatical", "any")(r) == 0.9  # the most steps
    assert L.log_ppl_short_input(r) == pytest.approx(math.log(5)) and L.nll_bound(r) == 1.7
    causal = {"gen": {"samples": {"left_to_right": {"grammatical": 0.3}}, "elbo": None, "chain_nll": 1.2}}
    assert L.judged("grammatical", "any")(causal) == 0.3 and L.nll_bound(causal) == 1.2
    assert L.judged("grammatical")({"gen": None}) is None and L.log_ppl()({"gen": {}}) is None


def test_an_arm_is_compared_member_by_member_and_seed_by_seed():
    here = [hand_made_run(o, s, 10.0 * (1 + 0.1 * s) * (2 if o == "ar" else 1), finetune=0.5 + 0.01 * s)
            for s in (1, 2, 3) for o in ("ar", "mlm")]
    there = {(o, s): hand_made_run(o, s, 10.0 * (1 + 0.1 * s), finetune=0.6)
             for s in (1, 2, 3, 4) for o in ("ar", "mlm")}
    rows = {(r["member"], r["metric"]): r for r in L.arm_rows(here, there, lambda r: r, verbose=False)}
    assert set(rows) == {(o, m) for o in ("ar", "mlm") for m in ("log ppl", "fine-tuned acc n=128")}
    assert rows["ar", "log ppl"]["mean_diff"] == pytest.approx(math.log(2)) and rows["ar", "log ppl"]["n_seeds"] == 3
    assert rows["ar", "log ppl"]["words"] == "interval above 0"
    assert rows["mlm", "log ppl"]["words"] == "interval spans 0"
    ft = rows["mlm", "fine-tuned acc n=128"]  # -0.09, -0.08, -0.07: mean -0.08, sd 0.01
    assert ft["mean_diff"] == pytest.approx(-0.08) and ft["words"] == "interval below 0" and ft["n_positive"] == 0
    assert ft["ci95"] == pytest.approx([-0.08 - 4.3027 * 0.01 / math.sqrt(3), -0.08 + 4.3027 * 0.01 / math.sqrt(3)],
                                       abs=1e-4)


def test_an_arm_reads_back_a_studys_runs_and_compares_with_another_study(tmp_path, capsys):
    quick = TINY + ["--seeds", "1-2", "--max_iters", "4", "--eval_interval", "2", "--no-eval_cluster",
                    "--no-eval_finetune", "--eval_samples", "0"]
    main = tmp_path / "main"
    assert L.main(quick + ["--objective", "ar", "--variants", "mlm", "--out_dir", str(main)]) == 0
    summary = (main / "summary.json").read_text()
    # an arm over part of it (the dose-response): ar read back, ar_diverse2 trained beside it, its own summary
    assert L.main(quick + ["--objective", "ar", "--variants", "ar_diverse2", "--summary_name", "dose",
                           "--out_dir", str(main)]) == 0
    assert "study: 4 runs, 2 read back, 2 to train" in capsys.readouterr().out
    assert (main / "summary.json").read_text() == summary
    assert [r["objective"] for r in json.load(open(main / "dose.json"))["runs"]] == ["ar", "ar_diverse2"] * 2
    # the data-constrained arm against the main study: every member's change, paired by seed
    few = tmp_path / "few"
    assert L.main(quick + ["--objective", "ar", "--variants", "mlm", "--train_docs", "300", "--out_dir", str(few),
                           "--compare_to", str(main)]) == 0
    compared = json.load(open(few / "summary.json"))["compared"]
    assert compared["differ"] == ["--train_docs 300 here, --train_docs 3000 there"]
    assert {(r["member"], r["metric"]) for r in compared["rows"]} == {
        (m, k) for m in ("ar", "mlm") for k in ("log ppl", "log ppl, prefixes 1..T/4")}
    row = next(r for r in compared["rows"] if (r["member"], r["metric"]) == ("mlm", "log ppl"))
    ppl = {(d, s): json.load(open(tmp_path / d / "mlm" / f"seed{s}" / "results.json"))["gen"]["ppl"]
           for d in ("main", "few") for s in (1, 2)}
    assert row["n_seeds"] == 2 and row["mean_diff"] == pytest.approx(
        np.mean([math.log(ppl["few", s]) - math.log(ppl["main", s]) for s in (1, 2)]))
    assert len(compared["rows_best"]) == len(compared["rows"]) and "early stopping" in capsys.readouterr().out
    # two runs of one member and seed under the folder: refused, naming them
    (main / "copy").mkdir()
    (main / "copy" / "results.json").write_text((main / "ar" / "seed1" / "results.json").read_text())
    assert L.main(quick + ["--out_dir", str(tmp_path / "other"), "--compare_to", str(main)]) == 2
    assert "two runs of ar with seed 1" in capsys.readouterr().err
    (main / "copy" / "results.json").unlink()
    # runs made by other code are refused before anything trains
    path = main / "ar" / "seed1" / "results.json"
    r = json.load(open(path))
    r["code"]["sha256"] = "0" * 64
    json.dump(r, open(path, "w"))
    assert L.main(quick + ["--out_dir", str(tmp_path / "other"), "--compare_to", str(main)]) == 2
    assert "another version of lookaround.py" in capsys.readouterr().err and not (tmp_path / "other").exists()
    assert L.main(quick + ["--out_dir", str(tmp_path / "other"), "--compare_to", str(tmp_path / "none")]) == 2
    assert "--compare_to" in capsys.readouterr().err
    assert L.main(quick + ["--out_dir", str(main / "arm"), "--compare_to", str(main)]) == 2  # one inside the other
    assert "one inside the other" in capsys.readouterr().err


def test_seeds_take_ranges():
    assert L.parse_args(["--seeds", "9-12"]).seeds == [9, 10, 11, 12]
    assert L.parse_args(["--seeds", "1,3-4,3"]).seeds == [1, 3, 4]  # each seed once
    for bad in ("3-x", "24-9"):
        with pytest.raises(SystemExit):
            L.parse_args(["--seeds", bad])


def test_default_curve_points():
    assert L.default_curve_iters(1000) == [250, 500, 1000]
    assert L.default_curve_iters(3000) == [250, 500, 1000, 2000, 3000]
    assert L.default_curve_iters(400) == [250, 400] and L.default_curve_iters(150) == [150]
    assert L.curve_iters(L.parse_args(["--max_iters", "100", "--curve_iters", "50,10"])) == [10, 50, 100]


def test_rerunning_a_study_reads_its_runs_back(study, monkeypatch):
    out, _, first_seconds = study
    monkeypatch.setattr(L, "make_synthetic", small_synthetic)
    before = open(out / "summary.json").read()
    os.remove(out / "summary.json")
    t0 = time.time()
    with contextlib.redirect_stdout(io.StringIO()) as text:
        assert L.main(STUDY + ["--out_dir", str(out)]) == 0
    assert time.time() - t0 < first_seconds / 3
    assert open(out / "summary.json").read() == before
    n = 2 * len(L.OBJECTIVES)  # every objective, two seeds
    assert text.getvalue().count("has these settings; not run again") == n
    assert f"study: {n} runs, {n} read back, 0 to train" in text.getvalue() and "run 1 of" not in text.getvalue()


def test_a_study_refuses_a_changed_setting_and_names_the_flag(study, capsys):
    out, _, _ = study
    assert L.main(STUDY[:-2] + ["--curve_iters", "20", "--out_dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--curve_iters 30,60 there, --curve_iters 20,60 here" in err and "another --out_dir" in err
    assert L.main(STUDY + ["--max_iters", "80", "--no-eval_gen", "--out_dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--max_iters 60 there, --max_iters 80 here" in err and "--eval_gen there, --no-eval_gen here" in err


def test_a_study_records_its_runtime_and_refuses_to_mix_runtimes(tmp_path, capsys):
    quick = TINY + ["--seeds", "1,2", "--max_iters", "2", "--eval_interval", "2", "--no-eval_cluster",
                    "--no-eval_finetune", "--no-eval_gen", "--out_dir", str(tmp_path / "s")]
    assert L.main(quick + ["--device", "cpu"]) == 0
    path = tmp_path / "s" / "seed1" / "results.json"
    r = json.load(open(path))
    assert r["settings"]["runtime"] == {"device_type": "cpu", "autocast_dtype": None, "torch": torch.__version__,
                                        "gpu": None} and "device" not in r["settings"]
    assert L.main(quick + ["--device", "auto"]) == 0  # the same resolved device, typed otherwise: read back
    assert "not run again" in capsys.readouterr().out
    r["settings"]["runtime"].update(device_type="cuda", autocast_dtype="torch.bfloat16", gpu="NVIDIA H100 PCIe")
    json.dump(r, open(path, "w"))  # as if seed 1 had run on a GPU
    assert L.main(quick) == 2
    err = capsys.readouterr().err
    assert "a run on device_type cuda" in err and "NVIDIA H100 PCIe there, a run on device_type cpu" in err


def test_a_study_refuses_another_objectives_runs(tmp_path, capsys):
    quick = TINY + ["--seeds", "1,2", "--max_iters", "2", "--eval_interval", "2", "--no-eval_cluster",
                    "--no-eval_finetune", "--no-eval_gen", "--out_dir", str(tmp_path / "s")]
    assert L.main(quick + ["--objective", "mlm"]) == 0
    before = open(tmp_path / "s" / "seed1" / "results.json").read()
    assert L.main(quick + ["--objective", "ar"]) == 2  # the same folders, seed1/ and seed2/, hold mlm's runs
    assert "holds a mlm run with seed 1, not ar" in capsys.readouterr().err
    assert open(tmp_path / "s" / "seed1" / "results.json").read() == before


def test_points_before_the_end_fine_tune_at_the_primary_rows_n(monkeypatch):
    seen = []
    monkeypatch.setattr(L, "evaluate_finetune", lambda *a: seen.append(a[5]) or {})
    corpus = L.make_synthetic(n_train_docs=40, n_val_docs=10, n_eval_docs=20, block_size=16)
    model = L.GPT(L.GPTConfig(vocab_size=corpus.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16))
    for labels, final in (("32,128,512", False), ("32,128,512", True), ("8,16", False)):
        args = L.parse_args(["--finetune_labels", labels, "--no-eval_cluster", "--no-eval_gen"])
        L.evaluate(model, corpus, "ar", 1, args, torch.device("cpu"), final)
    assert seen == [[128], [32, 128, 512], [8]]


def test_the_study_figure_is_written(study):
    pytest.importorskip("matplotlib", reason="the figure needs matplotlib (pip install matplotlib)")
    out, text, _ = study
    assert (out / "summary.png").stat().st_size > 10_000 and "figure:" in text


def test_the_figure_draws_the_languages_perplexity_and_one_colour_per_member(study, tmp_path, monkeypatch):
    """Every perplexity panel has the language's own line (its log-space mean over the seeds' corpora); a
    member keeps its colour in a figure of other members; one with fewer seeds is named with its n."""
    pytest.importorskip("matplotlib", reason="the figure needs matplotlib (pip install matplotlib)")
    import matplotlib.figure
    figures = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: figures.append(fig))
    runs = json.load(open(study[0] / "summary.json"))["runs"]
    fewer = [r for r in runs if r["objective"] != "ar" and (r["objective"], r["seed"]) != ("mlm", 2)]
    L.plot_summary(runs, str(tmp_path / "a.png"))
    L.plot_summary(fewer, str(tmp_path / "b.png"))
    whole, part = ({line.get_label(): line for ax in fig.axes for line in ax.get_lines()} for fig in figures)
    for f in L.PREFIX_FRACTIONS:
        ax = next(ax for ax in figures[0].axes if ax.get_title().startswith(f"perplexity after a prefix of {f:g} T"))
        language = next(line for line in ax.get_lines() if line.get_label() == L.LANGUAGE_ROW)
        limits = {r["bayes"]["ppl_by_prefix"][str(f)] for r in runs}  # one per seed's corpus
        assert len(limits) == 2 and np.allclose(language.get_ydata(), np.exp(np.mean(np.log(list(limits)))))
    assert all(whole[name].get_color() == part[name].get_color() for name in ("ar_diverse", "mlm_varlen"))
    assert whole["mlm"].get_color() == part["mlm (n=1)"].get_color() and "ar" not in part
    assert figures[1]._suptitle.get_text().startswith("mean over 2 seed(s)")


def test_plot_without_matplotlib_says_how_to_install_it_and_changes_nothing_else(tmp_path, monkeypatch, capsys):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib"
                        else real_find_spec(name, *a))
    assert L.main(TINY + ["--max_iters", "2", "--eval_interval", "2", "--no-eval_cluster", "--no-eval_finetune",
                          "--plot", "--out_dir", str(tmp_path / "run")]) == 0
    assert "pip install matplotlib" in capsys.readouterr().out
    assert (tmp_path / "run" / "results.json").exists() and not (tmp_path / "run" / "summary.png").exists()


def test_an_interrupted_study_goes_on_from_its_checkpoint(tmp_path, monkeypatch):
    common = TINY + ["--objective", "mlm_varlen", "--seeds", "1,2", "--max_iters", "20", "--eval_interval", "5",
                     "--curve_iters", "10", "--no-eval_cluster", "--no-eval_finetune"]
    assert L.main(common + ["--out_dir", str(tmp_path / "whole")]) == 0
    real_step, steps = L.optimizer_step, []

    def killed_at_step_33(*a):  # seed 1's 20 steps, then seed 2 dies after step 13 (last checkpoint: iter 10)
        steps.append(1)
        if len(steps) == 34:
            raise KeyboardInterrupt
        real_step(*a)
    monkeypatch.setattr(L, "optimizer_step", killed_at_step_33)
    with pytest.raises(KeyboardInterrupt):
        L.main(common + ["--out_dir", str(tmp_path / "cut")])
    monkeypatch.setattr(L, "optimizer_step", real_step)
    assert not (tmp_path / "cut" / "seed2" / "results.json").exists()
    assert torch.load(tmp_path / "cut" / "seed2" / "ckpt.pt", weights_only=False)["iter"] == 10
    with contextlib.redirect_stdout(io.StringIO()) as text:
        assert L.main(common + ["--out_dir", str(tmp_path / "cut")]) == 0
    assert "resumed" in text.getvalue() and "not run again" in text.getvalue()
    for seed in (1, 2):
        whole, cut = (json.load(open(tmp_path / d / f"seed{seed}" / "results.json")) for d in ("whole", "cut"))
        assert cut["train"]["tokens_per_s"] > 0 and cut["train"]["seconds"] > 0  # timed across the cut
        for r in (whole, cut):
            for k in ("seconds", "tokens_per_s"):
                r["train"].pop(k)
            for p in [r, r["best"]] + r["curve"]:
                p.get("gen") and p["gen"].pop("seconds")
        assert whole == cut  # the lowest val loss's weights too: kept in the checkpoint across the cut


# ---------------------------------------------------------------------------------------------------
# Training loop: resume, torchrun, flags


def test_interrupted_and_resumed_run_matches_an_uninterrupted_one(tmp_path):
    common = TINY + ["--objective", "mlm", "--dropout", "0.1", "--lr_decay_iters", "20", "--eval_interval", "10",
                     "--no-eval_cluster", "--no-eval_gen"]
    assert L.main(common + ["--max_iters", "20", "--out_dir", str(tmp_path / "a")]) == 0
    assert L.main(common + ["--max_iters", "10", "--out_dir", str(tmp_path / "b")]) == 0
    assert L.main(common + ["--max_iters", "20", "--out_dir", str(tmp_path / "b"), "--resume"]) == 0
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)
    assert a["iter"] == b["iter"] == 20
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    ra, rb = (json.load(open(tmp_path / x / "results.json")) for x in "ab")
    assert ra["train"]["final_val_loss"] == rb["train"]["final_val_loss"]
    assert ra["train"]["curve"] == rb["train"]["curve"] and len(ra["train"]["curve"]) == 3  # 0, 10, 20: no repeat
    # and the comparison can fail: a run that skips the interruption point's state differs
    assert L.main(common + ["--max_iters", "20", "--seed", "2", "--out_dir", str(tmp_path / "c")]) == 0
    c = torch.load(tmp_path / "c" / "ckpt.pt", weights_only=False)
    assert not torch.equal(a["model"]["wte.weight"], c["model"]["wte.weight"])


def test_resume_without_checkpoint_or_with_another_seed_fails_clearly(tmp_path, capsys):
    assert L.main(TINY + ["--resume", "--out_dir", str(tmp_path / "none")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    run = TINY + ["--max_iters", "2", "--eval_interval", "2", "--no-eval_cluster", "--no-eval_gen",
                  "--out_dir", str(tmp_path / "r")]
    assert L.main(run) == 0
    assert L.main(run + ["--seed", "2", "--max_iters", "4", "--resume"]) == 2  # another seed means another data split
    assert "--seed" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["garbage", "truncated", "not ours"])
def test_a_damaged_checkpoint_is_a_clear_error_naming_it(damage, tmp_path, capsys):
    run = TINY + ["--max_iters", "2", "--eval_interval", "2", "--no-eval_cluster", "--no-eval_gen",
                  "--no-eval_finetune", "--out_dir", str(tmp_path / "r")]
    assert L.main(run) == 0
    ckpt = tmp_path / "r" / "ckpt.pt"
    whole = ckpt.read_bytes()
    damaged = {"garbage": b"not a checkpoint at all", "truncated": whole[:len(whole) // 2]}
    if damage == "not ours":
        torch.save({"weights": torch.zeros(3)}, ckpt)
    else:
        ckpt.write_bytes(damaged[damage])
    before = sorted(os.listdir(tmp_path / "r"))
    assert L.main(run + ["--max_iters", "4", "--resume"]) == 2
    err = capsys.readouterr().err
    assert str(ckpt) in err and "Move it away" in err and "Traceback" not in err
    assert sorted(os.listdir(tmp_path / "r")) == before  # nothing written
    # a study that finds such a file in a run's folder names that run's file too
    study = tmp_path / "study"
    os.makedirs(study / "seed2")
    (study / "seed2" / "ckpt.pt").write_bytes(damaged.get(damage, b"x"))
    assert L.main(TINY + ["--seeds", "1,2", "--max_iters", "2", "--out_dir", str(study)]) == 2
    assert str(study / "seed2" / "ckpt.pt") in capsys.readouterr().err
    assert not (study / "seed1").exists()  # every folder is checked before anything trains


def test_a_damaged_results_json_in_a_study_is_a_clear_error(tmp_path, capsys):
    os.makedirs(tmp_path / "s" / "seed1")
    (tmp_path / "s" / "seed1" / "results.json").write_text('{"objective": "ar", "se')
    assert L.main(TINY + ["--seeds", "1,2", "--max_iters", "2", "--out_dir", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "s" / "seed1" / "results.json") in err and "Move it away" in err


def test_torchrun_two_processes_on_cpu(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(HERE, "lookaround.py"), *TINY, "--device", "cpu", "--objective", "ar_diverse",
           "--max_iters", "6", "--eval_interval", "6", "--no-eval_cluster", "--out_dir", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=HERE)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "x 2 processes" in p.stdout
    r = json.load(open(out / "results.json"))
    assert r["train"]["iters"] == 6 and math.isfinite(r["train"]["final_val_loss"])


def descendants(pid):
    """Every process below pid (Linux's /proc): torchrun starts its workers in process groups of their own."""
    children = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = open(f"/proc/{entry}/stat").read()
        except OSError:  # ended meanwhile
            continue
        children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))  # its parent's pid
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found, todo = found + below, todo + below
    return found


def test_torchrun_killed_and_resumed_ends_with_the_uninterrupted_weights(tmp_path):
    """Two Gloo processes training mlm (each rank its own batches and masks) are killed with SIGKILL
    after a checkpoint and resumed: every rank's random streams come back from the checkpoint, so
    the weights at the end are those of the same run never interrupted."""
    import signal

    def command(out, *extra):
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                os.path.join(HERE, "lookaround.py"), *TINY, "--device", "cpu", "--objective", "mlm",
                "--max_iters", "300", "--eval_interval", "10", "--no-eval_cluster", "--no-eval_finetune",
                "--no-eval_gen", "--out_dir", str(out), *extra]
    whole = subprocess.run(command(tmp_path / "whole"), capture_output=True, text=True, timeout=300, cwd=HERE)
    assert whole.returncode == 0, whole.stdout + whole.stderr
    ckpt = tmp_path / "cut" / "ckpt.pt"
    with open(tmp_path / "cut.log", "w") as log:
        p = subprocess.Popen(command(tmp_path / "cut"), stdout=log, stderr=log, cwd=HERE, start_new_session=True)
        stopped_at = None
        while p.poll() is None and stopped_at is None:
            time.sleep(0.02)
            if ckpt.exists() and torch.load(ckpt, weights_only=False)["iter"] >= 20:
                for pid in [p.pid, *descendants(p.pid)]:  # torchrun and both workers (their own groups), mid-run
                    os.kill(pid, signal.SIGKILL)
                stopped_at = torch.load(ckpt, weights_only=False)["iter"]
        p.wait(timeout=60)
    assert stopped_at is not None and stopped_at < 300, "the run ended before it could be killed"
    assert not (tmp_path / "cut" / "results.json").exists() and len(torch.load(ckpt, weights_only=False)["rng"]) == 2
    resumed = subprocess.run(command(tmp_path / "cut", "--resume"), capture_output=True, text=True, timeout=300,
                             cwd=HERE)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resumed {ckpt} at iter {stopped_at}" in resumed.stdout
    a = torch.load(tmp_path / "whole" / "ckpt.pt", weights_only=False)["model"]
    b = torch.load(ckpt, weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_error_on_rank_0_stops_every_rank_at_once(tmp_path):
    """Rank 0 fails in its evaluation (here: results.json's place is taken by a folder): both
    processes stop within seconds, with the error, instead of rank 1 waiting out the timeout."""
    out = tmp_path / "ddp"
    os.makedirs(out / "results.json")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(HERE, "lookaround.py"), *TINY, "--device", "cpu", "--max_iters", "4", "--eval_interval",
           "2", "--no-eval_cluster", "--no-eval_finetune", "--no-eval_gen", "--out_dir", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=HERE)
    assert p.returncode != 0
    assert "rank 0 stopped" in p.stderr and "every rank stops with it" in p.stderr


def test_cuda_requested_but_absent_is_a_clear_error(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert L.main(["--device", "cuda", "--out_dir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "--device cuda" in err and "--device cpu" in err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("flags, words", [
    (["--varlen_min", "0.9", "--varlen_max", "0.2"], "varlen_min"),
    (["--n_embd", "30", "--n_head", "4"], "divisible"),
    (["--objective", "all", "--resume"], "--resume"),
    (["--dropout", "1.5"], "--dropout"),
    (["--gen_seqs", "0"], "--gen_seqs"),
    (["--pos_emb", "rope", "--n_embd", "36", "--n_head", "4"], "even"),
    (["--learning_rate", "0"], "--learning_rate"),
    (["--objective", "ar_diverse", "--n_future", "1"], "--n_future"),
    (["--gen_steps", "49"], "--gen_steps 49: a continuation has 48 positions"),  # block 64, a prefix of 16
])
def test_impossible_flag_combinations_are_refused(flags, words, tmp_path, capsys):
    assert L.main(flags + ["--out_dir", str(tmp_path / "x")]) == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("flag, value", [("--seeds", "1,x"), ("--seeds", ","), ("--finetune_labels", "0,32")])
def test_malformed_lists_are_refused_by_the_parser(flag, value, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        L.main([flag, value, "--out_dir", str(tmp_path / "x")])
    assert exit_.value.code == 2 and flag in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_help_documents_every_flag():
    for action in L.make_parser()._actions:  # every flag says what it does (and so shows its default)
        assert action.help and action.help.strip(), action.option_strings
    p = subprocess.run([sys.executable, os.path.join(HERE, "lookaround.py"), "--help"], capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.count("(default:") >= 40
    flags = """--n_layer --n_head --n_embd --block_size --batch_size --dropout --learning_rate --max_iters
               --warmup_iters --weight_decay --grad_clip --gradient_accumulation_steps --eval_interval --log_interval
               --out_dir --seed
               --device --compile --objective --data --mask_ratio --varlen_min --varlen_max --n_future --resume
               --eval_cluster --eval_gen --sample --seeds --encoding --compact_vocab --bench --vocab_size --eval_iters
               --gen_seqs --temperature --top_k --bench_iters --bench_nanogpt --lr_decay_iters
               --readout_views --pos_emb --varlen_weight --varlen_corruption
               --theory --theory_worlds --theory_vocab --theory_len --theory_classes --theory_alpha"""
    for flag in flags.split():
        assert flag in p.stdout, flag


# ---------------------------------------------------------------------------------------------------
# Real text


def write(path, content, mode="w"):
    with open(path, mode) as f:
        f.write(content)
    return str(path)


def jsonl_corpus(tmp_path, n=60, labelled=True):
    words = ["alpha beta gamma delta", "river stone bridge water", "market price trade coin"]
    docs = [{"text": f"{words[i % 3]} document number {i} " * 3} for i in range(n)]
    lines = [json.dumps(d | {"label": f"t{i % 3}"} if labelled else d) for i, d in enumerate(docs)]
    return write(tmp_path / "c.jsonl", "\n".join(lines) + "\n")


def have_encoding():
    try:
        L.load_encoding("gpt2")
        return True
    except L.UsageError:
        return False


needs_gpt2 = pytest.mark.skipif(not have_encoding(), reason="tiktoken's gpt2 files are not reachable: set "
                                "TIKTOKEN_CACHE_DIR (e.g. ../shared/tiktoken_cache) or go online")


@needs_gpt2
def test_jsonl_corpus_compaction_cache_and_rebuild(tmp_path, capsys):
    path = jsonl_corpus(tmp_path)
    corpus = L.load_text_corpus(path, "gpt2", 1, 16, compact_vocab=True)
    assert corpus.vocab_size < 200 and corpus.train.max() < corpus.vocab_size
    assert corpus.eval_labels is not None and corpus.label_names == ["t0", "t1", "t2"]
    meta = path + ".gpt2.seed1.meta.json"
    assert os.path.exists(meta) and os.path.exists(path + ".gpt2.seed1.train.bin")
    # decoding maps compact ids back to text
    assert "document number" in corpus.decode(corpus.eval_docs[0])
    # every training document with its own label (fine-tuning reads them): the label follows from the words
    words = ["alpha", "river", "market"]
    assert len(corpus.train_docs) == len(corpus.train_labels) == 60 - len(corpus.eval_docs) - 3
    for doc, label in zip(corpus.train_docs, corpus.train_labels):
        assert corpus.decode(doc).startswith(words[label])
    # the cache is reused: same arrays, meta untouched
    stamp = os.stat(meta).st_mtime_ns
    again = L.load_text_corpus(path, "gpt2", 1, 16, compact_vocab=True)
    assert os.stat(meta).st_mtime_ns == stamp and np.array_equal(again.train, corpus.train)
    # a changed source rebuilds it
    write(path, json.dumps({"text": "brand new words entirely here " * 5, "label": "t9"}) + "\n", mode="a")
    rebuilt = L.load_text_corpus(path, "gpt2", 1, 16, compact_vocab=True)
    assert os.stat(meta).st_mtime_ns != stamp
    assert len(rebuilt.train) + len(rebuilt.val) > len(corpus.train) + len(corpus.val)
    # another split seed, another cache; the splits differ
    other = L.load_text_corpus(path, "gpt2", 2, 16, compact_vocab=True)
    assert os.path.exists(path + ".gpt2.seed2.meta.json") and not np.array_equal(other.val, rebuilt.val)
    # the full vocabulary on request
    assert L.load_text_corpus(path, "gpt2", 1, 16, compact_vocab=False).vocab_size == 50257


@needs_gpt2
def test_text_quirks_unicode_line_separators_crlf_and_a_damaged_cache(tmp_path):
    # U+2028 is legal inside a JSON string: it must not split the line
    lines = [json.dumps({"text": f"line\u2028break number {i} " * 4, "label": str(i % 2)}, ensure_ascii=False)
             for i in range(30)]
    path = write(tmp_path / "u.jsonl", "\n".join(lines))
    assert len(L.read_documents(path)) == 30
    # Windows line endings and whitespace-only lines still separate .txt documents
    txt = write(tmp_path / "crlf.txt", "\r\n \r\n".join(f"document {i}\r\nsecond line" for i in range(5)))
    assert len(L.read_documents(txt)) == 5
    # a cache with a file missing is rebuilt, not a crash
    first = L.load_text_corpus(path, "gpt2", 1, 16, compact_vocab=True)
    os.remove(path + ".gpt2.seed1.train.bin")
    again = L.load_text_corpus(path, "gpt2", 1, 16, compact_vocab=True)
    assert np.array_equal(first.train, again.train) and os.path.exists(path + ".gpt2.seed1.train.bin")


@needs_gpt2
def test_generation_windows_start_at_held_out_documents(tmp_path):
    corpus = L.load_text_corpus(jsonl_corpus(tmp_path), "gpt2", 1, 16, compact_vocab=True)
    windows = L.gen_windows(corpus, 16, 4)
    assert len(windows) == 4
    for w, d in zip(windows, corpus.eval_docs):
        assert w[:len(d)].tolist() == d.tolist()


def test_built_in_generation_windows_are_the_held_out_documents():
    syn = L.make_synthetic(n_train_docs=4, n_val_docs=2, n_eval_docs=8, block_size=32)
    assert L.gen_windows(syn, 32, 8).tolist() == [d.tolist() for d in syn.eval_docs]


@needs_gpt2
def test_txt_corpus_is_unlabelled_and_skips_clustering_with_a_reason(tmp_path, capsys):
    text = "\n\n".join(f"paragraph {i} says something about the weather today " * 3 for i in range(40))
    path = write(tmp_path / "plain.txt", text)
    out = tmp_path / "run"
    assert L.main(TINY + ["--data", path, "--max_iters", "4", "--eval_interval", "4", "--objective", "mlm_varlen",
                          "--out_dir", str(out)]) == 0
    r = json.load(open(out / "results.json"))
    assert r["cluster"] is None and r["gen"] is not None and r["gen"]["elbo"]["se"] > 0
    assert r["bayes"] is None and r["gen"]["samples"] is None  # no exact judge for real text: said so
    text = capsys.readouterr().out
    assert "no labels" in text and L.SAMPLES_NOTE in text


@needs_gpt2
def test_checkpoint_stores_the_vocabulary_mapping(tmp_path):
    path = jsonl_corpus(tmp_path)
    out = tmp_path / "run"
    assert L.main(TINY + ["--data", path, "--max_iters", "3", "--eval_interval", "3", "--no-eval_cluster",
                          "--no-eval_gen", "--block_size", "16", "--out_dir", str(out)]) == 0
    ckpt = torch.load(out / "ckpt.pt", weights_only=False)
    corpus = L.load_text_corpus(path, "gpt2", 1, 16, compact_vocab=True)
    assert np.array_equal(ckpt["tokenizer"]["vocab_ids"], corpus.vocab_ids) and ckpt["tokenizer"]["encoding"] == "gpt2"


@needs_gpt2
def test_only_one_label_skips_clustering_and_training_goes_on(tmp_path, capsys):
    lines = (json.dumps({"text": f"same topic text {i} " * 6, "label": "only"}) for i in range(40))
    path = write(tmp_path / "one.jsonl", "\n".join(lines))
    out = tmp_path / "run"
    assert L.main(TINY + ["--data", path, "--block_size", "16", "--max_iters", "3", "--eval_interval", "3",
                          "--out_dir", str(out)]) == 0
    assert "only one distinct label" in capsys.readouterr().out
    assert json.load(open(out / "results.json"))["cluster"] is None


@needs_gpt2
def test_a_folder_mixing_labelled_and_unlabelled_documents_is_refused(tmp_path, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    jsonl_corpus(folder)
    write(folder / "notes.txt", "an unlabelled paragraph\n\nand another")
    assert L.main(TINY + ["--data", str(folder), "--out_dir", str(tmp_path / "o")]) == 2
    assert "have a label and the rest none" in capsys.readouterr().err


def bad_inputs(tmp_path):
    many = "\n".join(json.dumps({"text": f"words {i} " * 5, "label": "a"}) for i in range(10))
    return {
        "missing": (str(tmp_path / "nope.jsonl"), "no such file"),
        "empty": (write(tmp_path / "empty.jsonl", ""), "is empty"),
        "not utf-8": (write(tmp_path / "latin.txt", b"caf\xe9 au lait\n\nmore text here", "wb"), "byte 3 (line 1)"),
        "bad json": (write(tmp_path / "bad.jsonl", many + "\n{not json}\n"), "line 11 is not valid JSON"),
        "no text": (write(tmp_path / "notext.jsonl", many + "\n" + json.dumps({"body": "x", "label": "a"}) + "\n"),
                    "line 11 has no \"text\""),
        "too short": (write(tmp_path / "short.jsonl", "\n".join(json.dumps({"text": "hi", "label": str(i % 2)})
                                                                for i in range(6))), "too few for --block_size"),
        # each split exactly one causal window (block_size + 1 tokens with the end-of-text): get_batch draws starts
        # below len - window, so there is none to draw
        "one window": (write(tmp_path / "one.txt", "\n\n".join(["hello" + " hello" * 31] * 3)),
                       "too few for --block_size"),
        "too few": (write(tmp_path / "two.jsonl", '{"text": "a"}\n{"text": "b"}\n'), "at least 3 are needed"),
        "unknown type": (write(tmp_path / "data.csv", "a,b\n"), "unknown file type"),
    }


@pytest.mark.parametrize("case", ["missing", "unknown type"] + [  # the others are read after the encoding loads
    pytest.param(case, marks=needs_gpt2)
    for case in ["empty", "not utf-8", "bad json", "no text", "too short", "one window", "too few"]])
def test_bad_input_is_a_clear_error_with_nothing_written(case, tmp_path, capsys):
    path, words = bad_inputs(tmp_path)[case]
    before = set(os.listdir(tmp_path))
    assert L.main(TINY + ["--data", path, "--out_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert words in err, err
    assert set(os.listdir(tmp_path)) == before  # no cache, no checkpoint, no out_dir


@needs_gpt2
def test_bad_input_from_the_command_line_has_no_traceback(tmp_path):
    path, _ = bad_inputs(tmp_path)["bad json"]
    p = subprocess.run([sys.executable, os.path.join(HERE, "lookaround.py"), "--data", path,
                        "--out_dir", str(tmp_path / "o")], capture_output=True, text=True)
    assert p.returncode == 2 and "Traceback" not in p.stderr and "line 11" in p.stderr


def test_unknown_or_unloadable_encoding_is_a_clear_error(tmp_path, capsys, monkeypatch):
    path = jsonl_corpus(tmp_path)
    assert L.main(TINY + ["--data", path, "--encoding", "no_such_encoding", "--out_dir", str(tmp_path / "o")]) == 2
    assert "unknown tiktoken encoding" in capsys.readouterr().err
    import tiktoken

    def offline(name):
        raise ConnectionError("no network")
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    assert L.main(TINY + ["--data", path, "--out_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "TIKTOKEN_CACHE_DIR" in err and "network" in err
    assert not (tmp_path / "o").exists() and not os.path.exists(path + ".gpt2.seed1.meta.json")


def test_prepare_ag_news_converts_local_csv(tmp_path):
    csv_path = write(tmp_path / "test.csv", '"3","Fears for T N pension","Unions say they are \\\\disappointed\\\\."\n'
                                          '"2","Team wins","A \\\\nbig night."\n')
    p = subprocess.run([sys.executable, PREPARE, "--csv", csv_path, "--out", str(tmp_path / "ag")],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    rows = [json.loads(line) for line in open(tmp_path / "ag" / "test.jsonl")]
    assert [r["label"] for r in rows] == ["Business", "Sports"]
    assert rows[0]["text"].startswith("Fears for T N pension. Unions") and "\\" not in rows[1]["text"]
    bad = write(tmp_path / "bad.csv", '"7","x","y"\n')
    p = subprocess.run([sys.executable, PREPARE, "--csv", bad, "--out", str(tmp_path / "ag2")],
                       capture_output=True, text=True)
    assert p.returncode != 0 and "row 1" in p.stderr and not (tmp_path / "ag2").exists()


def test_prepare_ag_news_downloads_when_online(tmp_path):
    # a local web server on the loopback address stands in for the public copy of the CSVs
    import functools
    import http.server
    import threading
    web = tmp_path / "web"
    web.mkdir()
    write(web / "train.csv", '"1","Talks resume","Leaders meet again."\n"4","New chip","Faster and cooler."\n')
    write(web / "test.csv", '"2","Cup final","A late goal."\n')
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(web))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{{split}}.csv"
        p = subprocess.run([sys.executable, PREPARE, "--url", url, "--out", str(tmp_path / "ag")],
                           capture_output=True, text=True, timeout=60)
    finally:
        server.shutdown()
        server.server_close()  # the port now refuses connections
    assert p.returncode == 0, p.stderr
    assert [json.loads(x)["label"] for x in open(tmp_path / "ag" / "train.jsonl")] == ["World", "Sci/Tech"]
    assert [json.loads(x)["label"] for x in open(tmp_path / "ag" / "test.jsonl")] == ["Sports"]
    # offline (nothing listening): a clear message that names the --csv way out, and nothing written
    p = subprocess.run([sys.executable, PREPARE, "--url", url, "--out", str(tmp_path / "ag3")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "--csv" in p.stderr and not (tmp_path / "ag3").exists()


AG_NEWS = os.environ.get("LOOKAROUND_AG_NEWS")


@needs_gpt2
@pytest.mark.skipif(not AG_NEWS or not os.path.exists(AG_NEWS),
                    reason="set LOOKAROUND_AG_NEWS to the AG News test.csv (../shared/datasets/ag_news/test.csv)")
def test_ag_news_end_to_end(tmp_path):
    p = subprocess.run([sys.executable, PREPARE, "--csv", AG_NEWS, "--out", str(tmp_path / "ag")],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    path = str(tmp_path / "ag" / "test.jsonl")
    out = tmp_path / "run"
    assert L.main(TINY + ["--data", path, "--objective", "mlm", "--max_iters", "10", "--eval_interval", "10",
                          "--out_dir", str(out)]) == 0
    r = json.load(open(out / "results.json"))
    check_results_schema(r)
    assert r["cluster"] is not None and 0 <= r["cluster"]["nmi"] <= 1
    assert r["cluster"]["baselines"]["tfidf"]["nmi"] > 0.03  # chance ~0.003: the held-out labels match their texts
    corpus = L.load_text_corpus(path, "gpt2", 1, 32, compact_vocab=True)
    assert len(corpus.eval_docs) == 760 and 5000 < corpus.vocab_size < 50257


# ---------------------------------------------------------------------------------------------------
# Benchmark


def test_peak_flops_match_whole_product_names():
    assert L.peak_flops("NVIDIA L40S") == 362e12 and L.peak_flops("NVIDIA L4") == 121e12  # an L40S is no L4
    assert L.peak_flops("NVIDIA H100 80GB HBM3") == 989e12 and L.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert L.peak_flops("NVIDIA H100 NVL") == 835e12 and L.peak_flops("NVIDIA H200") == 989e12
    assert L.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12 and L.peak_flops("NVIDIA GeForce RTX 4090") == 165e12
    assert L.peak_flops("NVIDIA B200") == 2250e12 and L.peak_flops("NVIDIA GeForce RTX 3090") == 71e12
    assert L.peak_flops("Tesla T4") is None and L.peak_flops("NVIDIA GeForce RTX 3080") is None  # no guessed MFU
    assert L.mfu(tiny_model(), 1e6, torch.device("cpu")) is None


def symbolic_inputs_per_graph(compile_model):
    """Compile a new model per objective in one process, as a study does, with a backend that counts each
    graph's inputs of symbolic size (a dynamic-shape graph has some)."""
    counts = []

    def recording(gm, example_inputs):
        values = [n.meta.get("example_value") for n in gm.graph.nodes if n.op == "placeholder"]
        counts.append(sum(isinstance(v, torch.SymInt) or (isinstance(v, torch.Tensor) and any(
            isinstance(s, torch.SymInt) for s in v.shape)) for v in values))
        return gm.forward
    torch._dynamo.reset()
    for name in ("ar", "mlm", "mlm_varlen", "ar_diverse"):
        objective_loss(name, compile_model(tiny_model(), recording), random_ids(B=8, T=window(name)))
    torch._dynamo.reset()
    return counts


def test_objectives_compile_with_static_shapes_in_one_process(monkeypatch):
    import functools
    real = torch.compile

    def as_training_does(model, backend):  # wrap_model's torch.compile, with the recording backend
        monkeypatch.setattr(torch, "compile", functools.partial(real, backend=backend))
        return L.wrap_model(model, True, None, torch.device("cpu"))
    ours = symbolic_inputs_per_graph(as_training_does)
    assert len(ours) == 4 and sum(ours) == 0  # a static graph per objective
    # and the test can fail: compiled as torch.compile does by default, the later objectives go dynamic
    assert sum(symbolic_inputs_per_graph(lambda m, backend: real(m, backend=backend))) > 0


def test_bench_writes_a_valid_bench_json(tmp_path):
    out = tmp_path / "bench"
    assert L.main(TINY + ["--bench", "--objective", "mlm", "--bench_iters", "5", "--vocab_size", "512",
                          "--out_dir", str(out)]) == 0
    b = json.load(open(out / "bench.json"))
    assert set(b) >= {"objective", "device", "n_params", "batch_size", "block_size", "vocab_size", "ms_per_iter",
                      "tokens_per_s", "mfu"}
    assert b["objective"] == "mlm" and b["ms_per_iter"] > 0 and b["tokens_per_s"] > 0 and b["batch_size"] == 8


def test_bench_times_nanogpt_side_by_side(tmp_path, capsys):
    # a stand-in with nanoGPT's interface: GPTConfig(...), GPT(config), forward(idx, targets) -> (logits, loss)
    ref = write(tmp_path / "model.py", """
import torch, torch.nn as nn, torch.nn.functional as F
from dataclasses import dataclass
@dataclass
class GPTConfig:
    block_size: int = 8; vocab_size: int = 8; n_layer: int = 1; n_head: int = 1; n_embd: int = 8
    dropout: float = 0.0; bias: bool = True
class GPT(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.emb = nn.Embedding(c.vocab_size, c.n_embd); self.head = nn.Linear(c.n_embd, c.vocab_size)
    def forward(self, idx, targets):
        logits = self.head(self.emb(idx))
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
""")
    out = tmp_path / "bench"
    assert L.main(TINY + ["--bench", "--objective", "mlm_varlen", "--bench_iters", "5", "--vocab_size", "64",
                          "--bench_nanogpt", ref, "--out_dir", str(out)]) == 0
    b = json.load(open(out / "bench.json"))
    assert b["nanogpt_tokens_per_s"] > 0
    assert b["speed_ratio"] == pytest.approx(b["tokens_per_s"] / b["nanogpt_tokens_per_s"])
    bad = write(tmp_path / "not_nanogpt.py", "x = 1\n")
    assert L.main(TINY + ["--bench", "--bench_nanogpt", bad, "--out_dir", str(tmp_path / "b2")]) == 2
    assert "--bench_nanogpt" in capsys.readouterr().err
    assert not (tmp_path / "b2").exists()


# ---------------------------------------------------------------------------------------------------
# Theory


def hand_world():
    """Two classes, V = 2, L = 3, probabilities set by hand: small enough to check on paper."""
    starts = np.array([[0.5, 0.5], [0.8, 0.2]])
    transitions = np.array([[[0.9, 0.1], [0.2, 0.8]],
                            [[0.3, 0.7], [0.6, 0.4]]])
    return L.enumerate_world(starts, transitions, 3)


def theory_components(patterns):
    """Connected components of the co-occurrence graph two ways: singular values 1, and scipy's graph search."""
    from scipy import sparse
    from scipy.sparse.csgraph import connected_components
    tokens, p_xc = hand_world()
    _, _, A = L.exact_optimum(tokens, p_xc.sum(1), patterns, 2)
    A = A[:, np.asarray(A.sum(0)).ravel() > 0]  # targets no context reaches are no part of the graph
    bipartite = sparse.bmat([[None, A], [A.T, None]])
    by_search = connected_components(bipartite, directed=False)[0]
    by_spectrum = int((L.graph_spectrum(A) > 1 - 1e-8).sum())
    assert by_search == by_spectrum
    return by_spectrum


def test_theory_causal_ceiling_equals_bayes_when_the_last_token_says_nothing_of_the_class():
    tokens, p_xc = hand_world()
    causal = L.causal_bayes_accuracy(tokens, p_xc, 2)
    # by hand: sum over the 4 prefixes x0 x1 of max_c P(x0, x1, c)
    starts = np.array([[0.5, 0.5], [0.8, 0.2]])
    trans = np.array([[[0.9, 0.1], [0.2, 0.8]], [[0.3, 0.7], [0.6, 0.4]]])
    by_hand = sum(max(starts[c, a] * trans[c, a, b] / 2 for c in (0, 1)) for a in (0, 1) for b in (0, 1))
    assert causal == pytest.approx(by_hand) and causal < float(p_xc.max(1).sum())
    # classes that differ only in where they start: the last token adds nothing, and the two ceilings agree
    same_steps = np.array([[[0.9, 0.1], [0.2, 0.8]]] * 2)
    tokens, p_xc = L.enumerate_world(starts, same_steps, 3)
    assert L.causal_bayes_accuracy(tokens, p_xc, 2) == pytest.approx(float(p_xc.max(1).sum()))


def check_tally_by_hand(worlds, tally):
    """theory.json's tally, every count and sign test recomputed from its worlds."""
    by_hand = 0
    for w in worlds:
        mlm, ar = w["objectives"]["mlm"], w["objectives"]["ar"]
        assert ar["probe_rel_per_position_causal"] == ar["probe_acc_per_position"] / w["bayes_acc_causal"]
        assert ar["probe_acc_per_position"] <= w["bayes_acc_causal"] + 1e-9  # ar cannot beat its own ceiling
        mlm_rel = mlm["probe_acc_per_position"] / w["bayes_acc"]
        ar_rel = ar["probe_acc_per_position"] / w["bayes_acc_causal"]
        by_hand += mlm_rel > ar_rel + 1e-9
    assert tally["mlm>ar_per_position_matched"] == by_hand
    # every other count from theory.json's worlds, and each sign test over the worlds that differ
    def count(a, b, key):
        return sum(w["objectives"][a][key] > w["objectives"][b][key] + 1e-9 for w in worlds)
    lost = {"mlm>ar_per_position_matched": sum(w["objectives"]["ar"]["probe_rel_per_position_causal"]
                                               > w["objectives"]["mlm"]["probe_rel_per_position"] + 1e-9
                                               for w in worlds)}
    for a, key, name in (("mlm", "probe_acc", "mlm>ar"), ("ar_diverse", "probe_acc", "ar_diverse>ar"),
                         ("mlm", "probe_acc_per_position", "mlm>ar_per_position"),
                         ("ar_diverse", "probe_acc_per_position", "ar_diverse>ar_per_position")):
        assert tally[name] == count(a, "ar", key), name
        lost[name] = count("ar", a, key)
    for name, losses in lost.items():
        n = tally[name] + losses
        by_hand_p = min(1.0, 2 * sum(math.comb(n, k) for k in range(min(tally[name], losses) + 1)) / 2 ** n)
        assert tally["sign_test_p"][name] == pytest.approx(by_hand_p), name
    coverage = [sum(w["objectives"][o]["coverage"].values()) for w in worlds for o in ("mlm_varlen", "mlm")]
    assert tally["mlm_varlen_covers_more"] == sum(a > b for a, b in zip(coverage[::2], coverage[1::2]))


def test_theory_enumeration_sums_to_one_and_p_star_matches_a_brute_force_count():
    tokens, p_xc = hand_world()
    assert tokens.shape == (8, 3) and p_xc.shape == (8, 2)
    assert p_xc.sum() == pytest.approx(1.0)
    row = tokens.tolist().index([0, 1, 1])
    assert p_xc[row].tolist() == pytest.approx([0.5 * 0.1 * 0.8 / 2, 0.8 * 0.7 * 0.4 / 2])
    p_x = p_xc.sum(1)
    for visible in range(8):
        for target in (j for j in range(3) if not visible >> j & 1):
            pooled, _, _ = L.exact_optimum(tokens, p_x, [(visible, target, 1.0)], 2)
            shown = [j for j in range(3) if visible >> j & 1]
            for i, x in enumerate(tokens.tolist()):  # brute force: every sequence that shows the same context
                same = [k for k, y in enumerate(tokens.tolist()) if all(y[j] == x[j] for j in shown)]
                counts = [sum(p_x[k] for k in same if tokens[k, target] == v) for v in range(2)]
                assert np.exp(pooled[i]) == pytest.approx(np.array(counts) / sum(counts))


def test_theory_next_token_perplexity_by_hand():
    tokens, p_xc = hand_world()
    # P(x0, x1) by hand: (1/2) start_c(x0) transition_c(x0 -> x1), summed over the two classes
    joint = {(0, 0): 0.5 * (0.5 * 0.9 + 0.8 * 0.3), (0, 1): 0.5 * (0.5 * 0.1 + 0.8 * 0.7),
             (1, 0): 0.5 * (0.5 * 0.2 + 0.2 * 0.6), (1, 1): 0.5 * (0.5 * 0.8 + 0.2 * 0.4)}
    first = {a: joint[a, 0] + joint[a, 1] for a in (0, 1)}
    entropy = -sum(p * math.log(p / first[a]) for (a, _), p in joint.items())  # H(x1 | x0)
    assert L.next_token_perplexity(tokens, p_xc.sum(1), 1, 2) == pytest.approx(math.exp(entropy))


def test_theory_patterns_are_weighted_like_the_objectives_sample():
    for name in list(L.OBJECTIVES):
        assert sum(w for _, _, w in L.training_patterns(L.OBJECTIVES[name], 6)) == pytest.approx(1.0), name
    lo, hi = VARLEN["varlen_min"], VARLEN["varlen_max"]
    counts = L.varlen_count_probs(6, lo, hi)  # against the network's own draw
    r = np.random.default_rng(0).uniform(lo, hi, 400_000)
    drawn = np.bincount(L.hidden_counts(torch.from_numpy(r), 6).numpy(), minlength=6) / len(r)
    assert all(abs(counts.get(m, 0.0) - drawn[m]) < 0.005 for m in range(6)), (counts, drawn)


def test_theory_components_fixed_position_targets_split_the_graph():
    # L = 3: mlm hides m = max(1, round(0.15 * 3)) = 1 token
    assert theory_components(L.training_patterns(record("ar"), 3)) == 2  # one per target position, L - 1
    assert theory_components(L.training_patterns(record("mlm"), 3)) == 3  # one per hidden position, L
    assert theory_components(L.training_patterns(record("ar_diverse", n_future=2), 3)) == 1
    assert theory_components(L.training_patterns(record("mlm_varlen"), 3)) == 1
    assert theory_components(L.training_patterns(record("mlm", mask_ratio=0.6), 3)) == 1  # m = 2 joins it


def test_theory_probes_stay_below_bayes_and_coverage_follows_the_visible_lengths():
    tokens, p_xc = hand_world()
    bayes = p_xc.max(1).sum()
    for name in list(L.OBJECTIVES):
        pooled, per_position, _ = L.exact_optimum(tokens, p_xc.sum(1), L.training_patterns(record(name), 3), 2)
        for features in (pooled, per_position):
            assert L.exact_probe_accuracy(features, p_xc) <= bayes + 1e-12, name
    # and the probe reaches it: the log posterior is linear in itself, so a probe of it is the Bayes classifier;
    # constant features leave it the prior's guess, 1/2 here
    posterior = np.log(p_xc / p_xc.sum(1, keepdims=True))
    assert L.exact_probe_accuracy(posterior, p_xc) == pytest.approx(bayes, abs=1e-9)
    assert L.exact_probe_accuracy(np.ones((len(p_xc), 1)), p_xc) == pytest.approx(0.5, abs=1e-9)
    assert L.covered_prefixes(L.training_patterns(record("ar"), 3), 3) == {"1": True, "2": True}
    assert L.covered_prefixes(L.training_patterns(record("mlm"), 3), 3) == {"1": False, "2": True}  # only l = L - m
    assert L.covered_prefixes(L.training_patterns(record("mlm", mask_ratio=0.6), 3), 3) == {"1": True, "2": False}
    assert L.covered_prefixes(L.training_patterns(record("mlm_varlen"), 3), 3) == {"1": True, "2": True}


def test_theory_writes_a_deterministic_theory_json(tmp_path, capsys):
    runs = []
    for seed, worlds, out in (("1", "2", "a"), ("1", "1", "b"), ("2", "1", "c")):
        assert L.main(["--theory", "--theory_worlds", worlds, "--seed", seed, "--out_dir", str(tmp_path / out)]) == 0
        runs.append(json.load(open(tmp_path / out / "theory.json")))
    a, b, c = runs
    # the same seed, the same worlds (the first of two is the one of one, exactly); another seed, others
    assert a["worlds"][0] == b["worlds"][0] and a["worlds"][0] != c["worlds"][0]
    for run in (a, c):
        check_tally_by_hand(run["worlds"], run["tally"])
    assert set(a) == {"settings", "worlds", "tally"} and len(a["worlds"]) == 2
    own = {k for o in L.OBJECTIVES.values() for k in o.settings}  # every objective's settings
    assert set(a["settings"]) == {"theory_worlds", "theory_vocab", "theory_len", "theory_classes", "theory_alpha",
                                  "seed"} | own and own >= {"mask_ratio", "varlen_min", "varlen_max", "n_future"}
    assert set(a["tally"]) == {"worlds", "mlm>ar", "ar_diverse>ar", "mlm>ar_per_position", "ar_diverse>ar_per_position",
                               "mlm>ar_per_position_matched", "mlm_varlen_covers_more", "sign_test_p"}
    assert set(a["tally"]["sign_test_p"]) == set(a["tally"]) - {"worlds", "sign_test_p", "mlm_varlen_covers_more"}
    assert L.sign_test_p(14, 20) == pytest.approx(0.1153, abs=1e-4) and L.sign_test_p(20, 20) == 2 / 2 ** 20
    assert L.sign_test_p(10, 20) == 1.0 and L.sign_test_p(0, 8) == L.sign_test_p(8, 8) == 2 / 256
    assert L.sign_test_p(0, 0) == 1.0  # every world a tie: nothing decided
    world = a["worlds"][0]
    assert set(world) == {"seed", "bayes_acc", "bayes_acc_causal", "objectives"}
    assert set(world["objectives"]) == set(L.OBJECTIVES)
    for w in a["worlds"] + c["worlds"]:  # the causal ceiling never exceeds the full one
        assert w["bayes_acc_causal"] <= w["bayes_acc"] + 1e-12
    for name, o in world["objectives"].items():
        causal = L.OBJECTIVES[name].attention == "causal"
        causal_keys = {"probe_rel_causal", "probe_rel_per_position_causal"} if causal else set()
        assert set(o) == {"probe_acc", "probe_rel", "probe_acc_per_position", "probe_rel_per_position", "components",
                          "sigma_k1", "coverage", "gen_ppl"} | causal_keys
        if causal_keys:
            assert o["probe_rel_causal"] == o["probe_acc"] / world["bayes_acc_causal"]
        assert list(o["coverage"]) == list(o["gen_ppl"]) == ["1", "2", "3", "4", "5"]
        assert all((o["gen_ppl"][l] is None) != covered for l, covered in o["coverage"].items())
        assert o["probe_acc"] <= world["bayes_acc"] + 1e-12 and o["probe_rel"] == o["probe_acc"] / world["bayes_acc"]
    assert [w["objectives"][n]["components"] for w in a["worlds"] for n in list(L.OBJECTIVES)] == [5, 1, 6, 1] * 2
    out = capsys.readouterr().out
    assert "world 2/2" in out and "never trained" in out and "tally over 2 worlds" in out


@pytest.mark.parametrize("flags, words", [
    (["--theory_len", "1"], "--theory_len"),
    (["--theory_vocab", "50", "--theory_len", "10"], "2^16"),
    (["--n_future", "6"], "--n_future 6"),
    (["--bench"], "--bench"),
    (["--seeds", "1,2"], "--seeds"),
])
def test_theory_refuses_bad_flags(flags, words, tmp_path, capsys):
    assert L.main(["--theory"] + flags + ["--out_dir", str(tmp_path / "x")]) == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# The language's exact probabilities, and the judge and the bound built on them.

def test_language_next_token_distribution_sums_to_one_and_agrees_with_prefix_probabilities():
    corpus = L.make_synthetic(n_train_docs=8, n_val_docs=2, n_eval_docs=4, seed=4)
    lang = corpus.language
    for doc in corpus.train_docs[:4]:
        q = L.language_next_probs(lang, doc)
        log_p = L.mixture_log_probs(lang, doc)
        assert np.allclose(q.sum(1), 1) and log_p[0] == pytest.approx(0) and np.isfinite(log_p).all()
        assert np.allclose(q[np.arange(len(doc)), doc], np.exp(np.diff(log_p)))  # P(x_i | x_<i) both ways
        # the topic marginalised with its uniform prior
        assert np.allclose(log_p, np.logaddexp.reduce(L.language_log_probs(lang, doc) - math.log(4), axis=0))
    s = {w: i for i, w in enumerate(lang.itos)}
    q = L.language_next_probs(lang, [s["the"], s["old"]])[-1]
    assert q[s["."]] == q[s["the"]] == q[s["found"]] == q[s["<eos>"]] == 0 and q[s["river"]] > 0  # D A: a noun
    assert L.mixture_log_probs(lang, [s["the"], s["."]])[-1] == -np.inf
    assert np.all(L.language_next_probs(lang, [s["the"], s["."]])[-1] == 0)  # impossible: no distribution
    # a sentence by hand: "the old river found the market ." under template "D A N V D N ."
    sentence = [s[w] for w in "the old river found the market .".split()]
    t = L.language_tables(lang)
    style = lang.style[1]
    weights = np.asarray(style["templates"]) / sum(style["templates"])
    n_nouns, n_verbs, n_adjs = len(L.SYN_NOUNS), len(L.SYN_VERBS), len(L.SYN_ADJS)
    verb = 0.8 * ("found" in style["verbs"]["river"]) / 2 + 0.2 / n_verbs
    obj = 0.7 * ("market" in style["objects"]["found"]) / 3 + 0.3 * t["noun"][1][s["market"]]
    by_hand = weights[0] * (1 / 5) * (1 / n_adjs) * t["noun"][1][s["river"]] * verb * (1 / 5) * obj
    assert t["noun"][1][s["river"]] == pytest.approx(0.84 / n_nouns)
    assert t["noun"][1][s["market"]] == pytest.approx(0.84 / n_nouns + 0.12 / 10 + 0.04 / 4 / 10)  # shared + own
    assert math.exp(L.language_log_probs(lang, sentence)[1, -1]) == pytest.approx(by_hand)


def test_the_language_predicts_its_own_samples_at_its_entropy_and_token_frequencies():
    # documents sampled by make_synthetic against the distributions the exact predictor gives: every token's
    # count where expected (z-scores), and the mean -log p of what was drawn equal to the mean entropy
    corpus = L.make_synthetic(n_train_docs=300, n_val_docs=2, n_eval_docs=4, seed=3)
    V = len(corpus.language.itos)
    observed, expected, variance, gap = np.zeros(V), np.zeros(V), np.zeros(V), []
    for doc in corpus.train_docs:
        q = L.language_next_probs(corpus.language, doc)[:-1]
        np.add.at(observed, doc, 1)
        expected, variance = expected + q.sum(0), variance + (q * (1 - q)).sum(0)
        entropy = -(q * np.log(np.where(q > 0, q, 1))).sum(1)
        gap += list(-np.log(q[np.arange(len(doc)), doc]) - entropy)
    assert np.all(np.abs(observed - expected) <= 5 * np.sqrt(variance) + 1e-9)
    assert abs(np.mean(gap)) < 4 * np.std(gap) / math.sqrt(len(gap))


def test_the_judge_passes_the_data_and_fails_a_sentence_broken_by_hand():
    corpus = L.make_synthetic(n_train_docs=8, n_val_docs=2, n_eval_docs=12, block_size=32)
    lang, blocks = corpus.language, L.gen_windows(corpus, 32, 12)
    labels = corpus.eval_labels[:12]
    data = L.judge_continuations(lang, blocks, 8, labels)
    assert data["grammatical"] == data["topic_kept"] == data["possible"] == 1 and data["sentences"] >= 12
    # where the sampler is the language itself, log q = log p: no gap
    log_p = torch.tensor([L.mixture_log_probs(lang, b.tolist())[-1] - L.mixture_log_probs(lang, b.tolist())[8]
                          for b in blocks])
    assert L.judge_continuations(lang, blocks, 8, labels, log_p)["kl"] == pytest.approx(0, abs=1e-9)
    assert data["nll"] == pytest.approx(float(-log_p.mean()) / 24)
    broken = blocks.clone()
    period = lang.itos.index(".")
    first_end = int(next(j for j in range(8, 32) if broken[0, j] == period))
    broken[0, first_end - 1] = lang.itos.index("the")  # "... the ." ends no template
    hurt = L.judge_continuations(lang, broken, 8, labels)
    assert hurt["sentences"] == data["sentences"] and hurt["possible"] == pytest.approx(11 / 12)
    assert hurt["grammatical"] == pytest.approx((data["sentences"] - 1) / data["sentences"])
    noise = torch.full_like(blocks, lang.itos.index("the"))
    noise[:, :8] = blocks[:, :8]
    noise[:, -1] = period
    nothing = L.judge_continuations(lang, noise, 8, labels)
    assert nothing["grammatical"] == nothing["topic_kept"] == nothing["possible"] == 0 and nothing["nll"] is None


def exact_conditionals(p_x):
    """For a distribution over every sequence (p_x: dict tuple -> probability): the stand-in masked model
    whose logits at a hidden position are log p(token there | the shown tokens), exactly."""
    seqs = list(p_x)
    V, mask = 1 + max(max(s) for s in seqs), 1 + max(max(s) for s in seqs)

    def logits_fn(x, rows):
        out = []
        for r in rows.tolist():
            shown = x[r // x.size(1)].tolist()
            probs = np.zeros(V)
            for s, p in p_x.items():
                if all(a == b or a == mask for a, b in zip(shown, s)):
                    probs[s[r % x.size(1)]] += p
            out.append(np.log(probs / probs.sum()))
        return torch.tensor(np.array(out), dtype=torch.float32)
    return logits_fn, mask


def test_the_elbo_is_tight_for_exact_conditionals_and_its_error_shrinks_with_draws():
    rng = np.random.default_rng(0)
    T, V = 4, 3
    seqs = [tuple(int(c) for c in np.base_repr(i, 3).zfill(T)) for i in range(V ** T)]
    p_x = dict(zip(seqs, rng.dirichlet(np.ones(len(seqs)))))
    logits_fn, mask = exact_conditionals(p_x)
    windows = torch.tensor([seqs[i] for i in rng.choice(len(seqs), 16, p=list(p_x.values()))])
    truth = np.mean([-math.log(p_x[tuple(w)] / sum(p for s, p in p_x.items() if s[0] == w[0]))
                     for w in windows.tolist()]) / (T - 1)  # -log p(x[1:] | x[0]) per token
    few = L.masked_elbo(logits_fn, windows, mask, 8, torch.Generator().manual_seed(0))
    many = L.masked_elbo(logits_fn, windows, mask, 128, torch.Generator().manual_seed(1))
    assert abs(many["nll"] - truth) < 3 * many["se"] and abs(few["nll"] - truth) < 3 * few["se"]
    assert many["se"] < 0.5 * few["se"]


def test_the_language_limits_score_each_prefix_length_by_its_next_token_distribution():
    corpus = L.make_synthetic(n_train_docs=8, n_val_docs=2, n_eval_docs=6, block_size=32)
    limits = L.language_limits(corpus, L.parse_args(["--block_size", "32", "--gen_seqs", "6", "--eval_samples", "0"]))
    windows = L.gen_windows(corpus, 32, 6)
    # another path to the same numbers: P(x[l] | x[<l]) from the next-token distribution, l = 1..31
    nll = np.stack([-np.log(L.language_next_probs(corpus.language, w.tolist())[np.arange(1, 32), w[1:]])
                    for w in windows])
    assert limits["ppl_by_length"] == pytest.approx(np.exp(nll.mean(0)).tolist(), rel=1e-9)
    assert limits["nll"] == pytest.approx(nll.mean(), rel=1e-9) and limits["samples"] is None


def test_text_corpora_have_no_language_limits_and_no_sample_judge():
    args = L.parse_args([])
    text = dataclasses.replace(L.make_synthetic(n_train_docs=8, n_val_docs=2, n_eval_docs=4), language=None)
    assert L.language_limits(text, args) is None


# Variants: an objective's record with settings overridden, a study member like the four.

def test_a_variant_overrides_only_the_settings_it_names():
    args = L.parse_args(["--variants", "mlm_half,low=mlm_varlen:varlen_min=0.2:varlen_corruption=bert"])
    half, mlm = L.member("mlm_half", args), L.member("mlm", args)
    assert half.values == dict(mlm.values, mask_ratio=0.5) and half.loss is mlm.loss and half.name == "mlm_half"
    assert half.attention == mlm.attention and half.learning_rate == L.VARIANT_LEARNING_RATES.get("mlm_half", 1e-3)
    low, varlen = L.member("low", args), L.member("mlm_varlen", args)
    assert low.values == dict(varlen.values, varlen_min=0.2, varlen_corruption="bert")
    assert L.members(args) == ["ar", "mlm_half", "low"]
    assert L.config_from_args(args, L.member("ar_diverse8", args), 151).n_future == 8


@pytest.mark.parametrize("flags, message", [
    (["--variants", "nope"], "nope: not an objective"),
    (["--variants", "x=bert:mask_ratio=0.5"], "'bert' is not an objective"),
    (["--variants", "x=mlm:ratio=0.5"], "mlm has no setting 'ratio'"),
    (["--variants", "x=mlm:mask_ratio=half"], "mask_ratio=half is not a float"),
    (["--variants", "x=mlm_varlen:varlen_corruption=some"], "varlen_corruption is one of mask, bert"),
    (["--variants", "mlm=mlm:mask_ratio=0.5"], "not an objective's name"),
    (["--variants", "x=mlm:mask_ratio=1.5"], "variant x: --mask_ratio 1.5 must lie strictly between 0 and 1"),
    (["--objective", "mlm_hal"], "mlm_hal: not an objective"),
])
def test_a_bad_variant_is_refused_with_the_fix(flags, message, capsys):
    assert L.main(flags + ["--max_iters", "0"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_variant_trains_beside_its_objective_and_is_paired_in_the_summary(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(L, "make_synthetic", small_synthetic)
    out = tmp_path / "study"
    common = TINY + ["--objective", "mlm", "--seeds", "1,2", "--max_iters", "8", "--eval_interval", "4",
                     "--no-eval_finetune", "--no-eval_cluster", "--out_dir", str(out)]
    flags = common + ["--variants", "mlm_half"]
    assert L.main(flags) == 0
    r = json.load(open(out / "mlm_half" / "seed1" / "results.json"))
    check_results_schema(r)
    assert r["variant"] == {"of": "mlm", "values": {"mask_ratio": 0.5},
                            "learning_rate_tuned": "mlm_half" in L.VARIANT_LEARNING_RATES}
    assert r["values"]["mask_ratio"] == 0.5 and r["settings"]["mask_ratio"] == 0.15  # the flag is mlm's
    summary = json.load(open(out / "summary.json"))
    assert {"mlm", "mlm_half"} <= set(summary["table"])
    assert summary["table"]["mlm_half"]["ppl"]["n"] == 2
    # the same command reads both back; a redefined variant is refused, naming what changed
    capsys.readouterr()
    assert L.main(flags) == 0 and "4 read back" in capsys.readouterr().out
    assert L.main(common + ["--variants", "mlm_half=mlm:mask_ratio=0.4"]) == 2
    assert "'mask_ratio': 0.5" in capsys.readouterr().err


def test_the_recipe_search_never_reads_the_evaluation_documents(monkeypatch):
    monkeypatch.setattr(L, "PRIMARY_FINETUNE_LABELS", 16)  # a smaller search, by the same code
    monkeypatch.setattr(L, "FINETUNE_VAL_DOCS", 40)
    monkeypatch.setattr(L, "FINETUNE_GRID", {"learning_rate": [1e-4, 1e-3], "epochs": [1, 3]})
    corpus = L.make_synthetic(n_train_docs=80, n_val_docs=2, n_eval_docs=40, block_size=16)
    model = L.GPT(L.GPTConfig(vocab_size=corpus.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=32))
    o, cpu = L.OBJECTIVES["mlm"], torch.device("cpu")
    clean = L.finetune_search(model, corpus, o, 1, cpu, 2)
    poisoned = dataclasses.replace(corpus, eval_docs=[d[::-1] for d in corpus.eval_docs],
                                   eval_labels=np.zeros_like(corpus.eval_labels))
    assert L.finetune_search(model, poisoned, o, 1, cpu, 2) == clean
    assert set(clean) == {"0.0001/1", "0.0001/3", "0.001/1", "0.001/3"}
    # reading a 3-epoch run after 1 epoch is the 1-epoch run (a constant learning rate)
    recipe = dict(L.FINETUNE_RECIPE, epochs=1, learning_rate=1e-3)
    pool, targets = np.arange(40), corpus.train_docs[40:]
    alone = [L.finetune_predictions(model, o, corpus, 16, d, 1, cpu, recipe, pool, targets) for d in (0, 1)]
    assert np.array_equal(alone[0], L.finetune_predictions(model, o, corpus, 16, 0, 1, cpu, recipe, pool, targets,
                                                           [1, 3])[1])
    accs = [float((a == corpus.train_labels[40:]).mean()) for a in alone]
    assert clean["0.001/1"] == pytest.approx(np.mean(accs))


def test_the_untrained_baseline_fine_tunes_with_the_recipe_of_its_objective(monkeypatch):
    corpus = L.make_synthetic(n_train_docs=40, n_val_docs=2, n_eval_docs=8, block_size=16)
    model = L.GPT(L.GPTConfig(vocab_size=corpus.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=32))
    monkeypatch.setitem(L.FINETUNE_RECIPES, "mlm", {"learning_rate": 1e-3, "epochs": 2})
    used, asked = [], []
    real = L.finetune_predictions
    monkeypatch.setattr(L, "finetune_predictions", lambda *a, **k: used.append(a[7]) or real(*a, **k))
    L.evaluate_finetune(model, corpus, L.OBJECTIVES["mlm"], 1, torch.device("cpu"), [8], 1,
                        untrained=lambda part, compute, recipe=None: asked.append(recipe) or compute())
    assert len(used) == 2 and all(r == dict(L.FINETUNE_RECIPE, learning_rate=1e-3, epochs=2) for r in used)
    assert asked == [used[0]]  # the stored baseline's key holds the recipe


def test_train_docs_changes_only_the_training_documents():
    args = L.parse_args([])
    full = L.load_corpus(args, 3)
    few = L.load_corpus(L.parse_args(["--train_docs", "300"]), 3)
    for name in ("val", "held", "held_starts", "eval_labels"):
        assert np.array_equal(getattr(full, name), getattr(few, name))
    assert all(np.array_equal(a, b) for a, b in zip(full.eval_docs, few.eval_docs))
    assert len(few.train_docs) == 300 and np.array_equal(few.train_labels, full.train_labels[:300])
    assert np.array_equal(few.train, full.train[:len(few.train)]) and few.train[-1] == 0  # whole documents
    assert int((few.train == 0).sum()) == 300 and np.bincount(few.train_labels).tolist() == [75] * 4
    assert L.main(["--train_docs", "3001"]) == 2


def test_a_study_refuses_runs_made_by_other_code_or_missing_a_setting(tmp_path, capsys):
    import hashlib
    out = tmp_path / "study"
    flags = TINY + ["--seeds", "1,2", "--max_iters", "4", "--eval_interval", "4", "--no-eval_cluster",
                    "--no-eval_finetune", "--no-eval_gen", "--out_dir", str(out)]
    assert L.main(flags) == 0
    path = out / "seed1" / "results.json"
    r = json.load(open(path))
    assert r["code"]["sha256"] == hashlib.sha256(open(L.__file__, "rb").read()).hexdigest()
    assert set(r["code"]) == {"sha256", "commit", "modified"}
    assert torch.load(out / "seed1" / "ckpt.pt", weights_only=False)["code"] == r["code"]
    r["code"]["sha256"] = "0" * 64  # as if an edited lookaround.py had made it
    json.dump(r, open(path, "w"))
    capsys.readouterr()
    assert L.main(flags) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "another version of lookaround.py" in err and "--accept_code_change" in err
    assert L.main(flags + ["--accept_code_change"]) == 0 and "2 read back" in capsys.readouterr().out
    # a setting the run did not record counts as its flag's default: read back at the default, refused otherwise
    r = json.load(open(path))
    del r["settings"]["gen_steps"]
    json.dump(r, open(path, "w"))
    assert L.main(flags + ["--accept_code_change"]) == 0
    assert L.main(flags + ["--accept_code_change", "--gen_steps", "4"]) == 2
    assert "--gen_steps not recorded there, --gen_steps 4 here" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["ar", "mlm"])
def test_ppl_by_length_agrees_with_the_bands_and_the_short_input_form(name):
    model, o = tiny_model().eval(), L.OBJECTIVES[name]
    seqs = random_ids(B=5, T=32, seed=3)
    nll = L.next_token_nll(model, seqs, list(range(1, 32)), o)
    scores = L.perplexities(nll, 32)
    assert len(scores["ppl_by_length"]) == 31 and scores["ppl"] == pytest.approx(math.exp(float(nll.mean())))
    for f, positions in L.scored_positions(32).items():  # each band: the mean of its lengths' losses
        band = np.log([scores["ppl_by_length"][p - 1] for p in positions]).mean()
        assert math.log(scores["ppl_by_prefix"][str(f)]) == pytest.approx(band)
    short = L.short_input_nll(model, seqs, o)
    if o.hiding is None:  # a causal model never reads what follows: both forms are the same
        assert torch.allclose(short, nll, atol=1e-5)
    else:  # the prefix and one [MASK] is another input than the prefix and 32 - l of them; the last length agrees
        assert not torch.allclose(short, nll, atol=1e-3) and torch.allclose(short[:, -1], nll[:, -1], atol=1e-5)
        for l in (1, 5):  # by hand: the prefix of l tokens and one [MASK], read at the [MASK]
            x = torch.cat([seqs[:, :l], torch.full((5, 1), model.config.vocab_size)], 1)
            ref = F.cross_entropy(model(x, attention="bidirectional")[:, l], seqs[:, l], reduction="none")
            assert torch.allclose(short[:, l - 1], ref, atol=1e-5)
