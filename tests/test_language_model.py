"""Language modelling (issue 12): the WikiText loader, the BPE tokenizer and its cache, perplexity,
DFA's feedback points and injected signals on the transformer, DDP equivalence and kill/resume.

Every corpus here is written by the test in the WikiText format, so nothing is downloaded.
"""
from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from omegaconf import OmegaConf

from bench.config import compose
from bench.data import DataUnavailable
from bench.data import tokenizer as tokmod
from bench.data.text import TextDataModule, sequences, token_stream
from bench.options import ConfigError
from conftest import REPO, cli_env, load_state, run_dirs

TEXT = {
    "train": [" = Alpha = ", "", " The cat sat on the mat . The dog sat on the log . ", "",
              " A cat and a dog met on a mat , and the cat ran . ", " = = Beta = = ", "",
              " Dogs and cats , mats and logs : the end of the story . "] * 6,
    "valid": [" = Gamma = ", "", " The dog ran to the mat . ", " A cat sat . "],
    "test": [" = Delta = ", "", " The log sat on the cat . ", " Mats and dogs . "],
}


def write_corpus(folder: Path, text: dict = TEXT) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, lines in text.items():
        (folder / f"wiki.{split}.tokens").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def data_cfg(root: Path, **kw):
    base = dict(name="wikitext2", root=str(root), seq_len=8, vocab_size=300, train_subset=None, batch_size=4,
                eval_batch_size=16, augment=False)
    return OmegaConf.create({**base, **kw})


# ----------------------------------------------------------------------------- data and tokenizer

def test_wikitext_loader_yields_exactly_the_expected_token_stream(tmp_path):
    folder = write_corpus(tmp_path / "wikitext-2")
    dm = TextDataModule(data_cfg(tmp_path), seed=0)
    dm.setup("fit")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(dm.tokenizer["tokenizer_file"])
    eos = tok.token_to_id("<eos>")
    assert dm.tokenizer["eos_id"] == eos and dm.tokenizer["vocab_size"] == tok.get_vocab_size() == dm.num_classes
    for split, (x, y) in (("train", dm.train), ("valid", dm.val), ("test", dm.test)):
        expected: list[int] = []
        for line in TEXT[split]:  # every non-blank line, stripped, then <eos>; blank lines give nothing
            if line.strip():
                expected += tok.encode(line.strip()).ids + [eos]
        n = (len(expected) - 1) // 8
        assert x.shape == y.shape == (n, 8) and x.dtype == torch.long
        assert x.reshape(-1).tolist() == expected[: n * 8]
        assert y.reshape(-1).tolist() == expected[1: n * 8 + 1]
    assert dm.input_shape == (8,)
    # the stream decodes back to the text (byte-level BPE: nothing lost), eos between lines
    x, _ = dm.val
    decoded = tok.decode([t for t in x.reshape(-1).tolist() if t != eos])
    assert "= Gamma =The dog ran to the mat .A cat sat .".startswith(decoded) and len(decoded) >= 20
    # train_subset keeps the first N sequences
    dm2 = TextDataModule(data_cfg(tmp_path, train_subset=3), seed=0)
    dm2.setup("fit")
    assert torch.equal(dm2.train[0], dm.train[0][:3])
    assert folder.joinpath(".tokenizer-cache").is_dir()


def test_absent_wikitext_is_one_line_naming_where_and_how(tmp_path):
    dm = TextDataModule(data_cfg(tmp_path, name="wikitext103"), seed=0)
    with pytest.raises(DataUnavailable) as err:
        dm.setup("fit")
    text = str(err.value)
    assert "\n" not in text
    assert text.startswith("wikitext103 data unavailable: looked in ")
    assert str(tmp_path / "wikitext-103") in text and "wikitext-103-v1.zip" in text


def test_sequences_cut_the_stream_into_shifted_blocks():
    x, y = sequences(torch.arange(10), 3)
    assert x.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert y.tolist() == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]


def test_tokenizer_round_trips_and_its_cache_is_reused_or_rebuilt(tmp_path):
    train = write_corpus(tmp_path / "c") / "wiki.train.tokens"
    cache = tmp_path / "c" / ".tokenizer-cache"
    before = tokmod.TRAINED["count"]
    tok, path, config, digest = tokmod.load_or_train(train, 300, cache)
    assert tokmod.TRAINED["count"] == before + 1 and path.is_file() and digest in path.name
    assert tok.get_vocab_size() == 300 and config["vocab_size"] == 300
    for text in ("The cat sat on the mat.", "naïve café — 3.14 ≠ π", "  spaces  and\ttabs "):
        assert tok.decode(tok.encode(text).ids) == text
    # the same config: read from the cache, not trained again
    stamp = path.stat().st_mtime_ns
    tok2, path2, _, digest2 = tokmod.load_or_train(train, 300, cache)
    assert tokmod.TRAINED["count"] == before + 1 and (path2, digest2) == (path, digest)
    assert path2.stat().st_mtime_ns == stamp
    assert tok2.encode("The dog sat.").ids == tok.encode("The dog sat.").ids
    # another vocabulary size: another hash, trained again
    _, path3, _, digest3 = tokmod.load_or_train(train, 280, cache)
    assert tokmod.TRAINED["count"] == before + 2 and digest3 != digest and path3 != path
    # another training text: another hash, trained again
    train.write_text(train.read_text() + " A new line about birds .\n")
    _, _, _, digest4 = tokmod.load_or_train(train, 300, cache)
    assert tokmod.TRAINED["count"] == before + 3 and digest4 not in (digest, digest3)


# ----------------------------------------------------------------------------- rules on the transformer

LM = ["model.name=transformer", "model.n_layer=2", "model.n_embd=8", "model.n_head=2", "probe.every=0",
      "output.progress=none", "data.name=wikitext2"]


def rule_module(*overrides: str, vocab: int = 11, seq: int = 4, seed: int = 0):
    from bench.algorithms import RULES
    from bench.models import create_model

    cfg = compose(overrides=[*LM, f"seed={seed}", *overrides])
    torch.manual_seed(seed)
    model = create_model(cfg.model, (seq,), vocab)
    return RULES.get(str(cfg.algorithm.name))(cfg, model, vocab, (seq,))


def test_perplexity_is_exp_of_mean_token_cross_entropy_by_hand():
    m = rule_module(vocab=3, seq=2)
    logits = torch.tensor([[[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]]])  # one sequence of 2 tokens, vocabulary 3
    y = torch.tensor([[0, 2]])
    ce1 = -(2.0 - math.log(math.exp(2.0) + math.exp(0.0) + math.exp(-1.0)))
    ce2 = -(0.0 - math.log(math.exp(0.5) + math.exp(1.5) + math.exp(0.0)))
    m.log_dict = lambda *a, **k: None
    m._update_metrics("val", logits, y, m.loss_fn(logits, y))
    values = m._log_split("val")
    assert float(values["val/loss"]) == pytest.approx((ce1 + ce2) / 2, abs=1e-6)
    assert float(values["val/ppl"]) == pytest.approx(math.exp((ce1 + ce2) / 2), rel=1e-6)
    assert "confmat" not in m.metrics["test_m"]  # no V × V matrix for a language model


@pytest.mark.parametrize("arch,attn_norm", [("nanogpt", "ln_2"), ("launay", "ln_1")])
def test_dfa_points_on_a_two_block_transformer(arch, attn_norm):
    macro = rule_module("algorithm.name=dfa", "algorithm.granularity=macro", f"model.arch={arch}")
    micro = rule_module("algorithm.name=dfa", "algorithm.granularity=micro", f"model.arch={arch}")
    assert macro.tap.names == ["blocks.0", "blocks.1"]
    assert micro.tap.names == [f"blocks.0.{attn_norm}", "blocks.0.mlp.act", "blocks.0",
                               f"blocks.1.{attn_norm}", "blocks.1.mlp.act", "blocks.1"]
    if arch == "launay":  # the FFN point sits after ReLU and the FFN's dropout, as in Launay et al.'s code
        act = dict(micro.model.named_modules())["blocks.0.mlp.act"]
        assert [type(m).__name__ for m in act] == ["ReLU", "Dropout"]


def batch(vocab=11, b=3, t=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (b, t), generator=g), torch.randint(0, vocab, (b, t), generator=g)


def rule_grads(m, x, y):
    """One step of the rule's backward; returns its .grad per parameter and the captured point tensors."""
    m.zero_grad(set_to_none=True)
    surrogate, logits, loss = m.objective(x, y)
    points = list(m.tap.outputs)
    for h in points:
        h.retain_grad()
    surrogate.backward()
    return {n: p.grad for n, p in m.model.named_parameters()}, points, logits


@pytest.mark.parametrize("granularity", ["macro", "micro"])
@pytest.mark.parametrize("error_at", ["hidden", "logits"])
def test_dfa_step_changes_every_parameter_and_no_gradient_crosses_a_point(granularity, error_at):
    m = rule_module("algorithm.name=dfa", f"algorithm.granularity={granularity}", f"algorithm.error_at={error_at}")
    x, y = batch()
    # a hooked module: every block after the first (and, at micro points, every sub-layer after a
    # point) reads a tensor with no autograd history, so no gradient can flow back through it; the
    # point's own tensor then receives exactly B_i e (test_injected_signal_is_the_hand_computed_projection)
    seen = {}
    watch = ["blocks.1"] + (["blocks.0.mlp.c_fc", "blocks.0.mlp.c_proj"] if granularity == "micro" else [])
    modules = dict(m.model.named_modules())
    hooks = [modules[n].register_forward_pre_hook(lambda mod, inp, n=n: seen.__setitem__(n, (inp[0].requires_grad, inp[0].grad_fn)))
             for n in watch]
    grads, points, _ = rule_grads(m, x, y)
    for h in hooks:
        h.remove()
    assert seen == {n: (False, None) for n in watch}, f"a gradient path crosses a point: {seen}"
    assert all(h.grad_fn is not None for h in points)  # the points themselves stay attached to their layers
    for name, g in grads.items():
        assert g is not None and g.abs().sum() > 0, f"{name} got no update"
    # the Adam step moves every parameter
    before = {n: p.detach().clone() for n, p in m.model.named_parameters()}
    torch.optim.Adam(m.model.parameters(), lr=1e-3).step()
    for n, p in m.model.named_parameters():
        assert not torch.equal(p, before[n]), f"{n} did not change"


def hand_error(m, x, y, error_at):
    """e by hand: logits = z W_headᵀ (+ b), e_logits = (softmax − onehot)/N, e_hidden = e_logits W_head."""
    with torch.no_grad(), m.tap.settings(cut=False):
        feats = {}
        hook = m.model.lm_head.register_forward_hook(lambda mod, i, o: feats.update(z=i[0]))
        logits = m.model(x)
        hook.remove()
    v = logits.shape[-1]
    p = torch.softmax(logits.reshape(-1, v).double(), -1)
    e_logits = (p - F.one_hot(y.reshape(-1), v).double()) / p.shape[0]
    if error_at == "logits":
        return e_logits
    return e_logits @ m.model.lm_head.weight.detach().double()


@pytest.mark.parametrize("error_at", ["hidden", "logits"])
@pytest.mark.parametrize("rule", ["dfa", "sdfa"])
def test_injected_signal_is_the_hand_computed_projection(rule, error_at):
    m = rule_module(f"algorithm.name={rule}", "algorithm.granularity=micro", f"algorithm.error_at={error_at}")
    x, y = batch()
    e = hand_error(m, x, y, error_at)
    assert e.shape[1] == (8 if error_at == "hidden" else 11)
    if rule == "sdfa":
        e = torch.sign(e) / e.shape[0]
    _, points, _ = rule_grads(m, x, y)
    for i, h in enumerate(points):
        expected = e @ m.feedback.matrix_for(i).double().t()  # B_i e, one row per token
        assert h.grad.shape[:2] == x.shape
        torch.testing.assert_close(h.grad.reshape(-1, h.shape[-1]).double(), expected, rtol=1e-5, atol=1e-7)


def test_micro_point_layer_update_equals_local_backprop_by_hand():
    """The FFN's first layer c_fc sits between two micro points (ln_2 → c_fc → GELU = mlp.act): its update
    must be ΔW = Σ_tokens (B_act e ⊙ GELU′(a)) ⊗ ln_2(x), with a = c_fc(ln_2(x)), computed here by hand."""
    m = rule_module("algorithm.name=dfa", "algorithm.granularity=micro", "algorithm.error_at=hidden", "model.n_layer=1")
    x, y = batch()
    inputs = {}
    fc = m.model.blocks[0].mlp.c_fc
    hook = fc.register_forward_hook(lambda mod, i, o: inputs.update(x=i[0].detach(), a=o.detach()))
    grads, points, _ = rule_grads(m, x, y)
    hook.remove()
    e = hand_error(m, x, y, "hidden")
    signal = (e @ m.feedback.matrix_for(1).double().t())  # point 1 of block 0 is mlp.act
    a = inputs["a"].reshape(-1, fc.out_features).double()
    gelu_prime = 0.5 * (1 + torch.erf(a / math.sqrt(2))) + a * torch.exp(-a * a / 2) / math.sqrt(2 * math.pi)
    delta = signal * gelu_prime
    inp = inputs["x"].reshape(-1, fc.in_features).double()
    torch.testing.assert_close(grads["blocks.0.mlp.c_fc.weight"].double(), delta.t() @ inp, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(grads["blocks.0.mlp.c_fc.bias"].double(), delta.sum(0), rtol=1e-5, atol=1e-8)
    # and the macro version: the block's update is the backprop of ⟨h, B e⟩ through the block alone
    mm = rule_module("algorithm.name=dfa", "algorithm.granularity=macro", "algorithm.error_at=hidden", "model.n_layer=2")
    grads, points, _ = rule_grads(mm, x, y)
    e = hand_error(mm, x, y, "hidden")
    with mm.tap.settings(cut=False):
        emb = mm.model.drop(mm.model.wte(x) + mm.model.wpe(torch.arange(x.shape[1])))
        h0 = mm.model.blocks[0](emb.detach())
    injected = (e @ mm.feedback.matrix_for(0).double().t()).float().reshape(h0.shape)
    params = list(mm.model.blocks[0].parameters())
    local = torch.autograd.grad((h0 * injected).sum(), params)
    for (name, _), g_local in zip(mm.model.blocks[0].named_parameters(), local):
        torch.testing.assert_close(grads[f"blocks.0.{name}"], g_local, rtol=1e-5, atol=1e-7)


def test_rules_that_cannot_train_the_transformer_refuse_in_one_line():
    for rule in ("rlra", "lra_e", "dtp", "tp", "eprop", "dense_fa"):
        with pytest.raises(ConfigError) as err:
            compose(overrides=[*LM, f"algorithm.name={rule}"])
        assert "\n" not in str(err.value) and f"algorithm.name={rule} cannot train model.name=transformer" in str(err.value)
    with pytest.raises(ConfigError, match="drtp: DRTP projects the one-hot target"):
        compose(overrides=[*LM, "algorithm.name=drtp", "algorithm.error_at=hidden"])
    with pytest.raises(ConfigError, match="error_at=hidden is not valid for model.name=mlp"):
        compose(overrides=["algorithm.name=dfa", "algorithm.error_at=hidden"])
    with pytest.raises(ConfigError, match="cannot train model.tie_weights=true"):
        compose(overrides=[*LM, "algorithm.name=fa", "model.tie_weights=true"])


def test_fa_converts_every_linear_and_keeps_the_embeddings():
    m = rule_module("algorithm.name=fa")
    linear = [n for n, mod in m.model.named_modules() if isinstance(mod, torch.nn.Linear)]
    assert sorted(m.converted) == sorted(linear) and "lm_head" in m.converted and len(m.converted) == 9
    assert m.kept == ["wte", "wpe"]
    x, y = batch()
    m.zero_grad()
    surrogate, _, _ = m.objective(x, y)
    surrogate.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.model.parameters())


# ----------------------------------------------------------------------------- DDP and resume

DDP_RULES = {
    "bp": ["algorithm.name=bp"],
    "dfa_macro": ["algorithm.name=dfa", "algorithm.granularity=macro", "algorithm.error_at=hidden"],
    "fa": ["algorithm.name=fa"],
}
DDP_COMMON = ["algorithm.optimizer=sgd", "algorithm.lr=0.5", "trainer.max_steps=3", "data.seq_len=8",
              "data.vocab_size=300", "data.eval_batch_size=16", "output.wandb=disabled"]


def ddp_config(root: Path, rule: str, *extra: str):
    return compose(overrides=[*LM, *DDP_COMMON, f"data.root={root}", *DDP_RULES[rule], *extra])


def _ddp_worker(rank: int, port: int, data_root: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", NODE_RANK="0",
                      LOCAL_RANK=str(rank), RANK=str(rank), CI="true", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from bench.run.train import train

    for rule in DDP_RULES:
        train(ddp_config(Path(data_root), rule, "trainer.name=ddp_cpu", "data.batch_size=4", f"output.root={out}/{rule}"))


def test_ddp_two_ranks_equal_one_process_double_batch_on_the_transformer(tmp_path):
    from bench.run.train import train

    data_root = tmp_path / "data"
    files = {s: write_corpus(data_root / "wikitext-2") / f"wiki.{s}.tokens" for s in ("train", "valid", "test")}
    token_stream(files, 300)  # train the tokenizer once, before the ranks read its cache
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_ddp_worker, args=(port, str(data_root), str(tmp_path / "ddp")), nprocs=2,
                       start_method="spawn", join=True)
    for rule in DDP_RULES:
        init = train(ddp_config(data_root, rule, "algorithm.lr=0.0", "trainer.max_steps=1", "data.batch_size=8",
                                f"output.root={tmp_path}/init/{rule}"))
        single = train(ddp_config(data_root, rule, "trainer.name=cpu", "data.batch_size=8", f"output.root={tmp_path}/one/{rule}"))
        (ddp_dir,) = run_dirs(tmp_path / "ddp" / rule)
        ddp_summary = json.loads((ddp_dir / "summary.json").read_text())
        assert ddp_summary["status"] == single["status"] == init["status"] == "finished", ddp_summary.get("error")
        assert (ddp_summary["world_size"], single["world_size"]) == (2, 1)
        ddp = {k: v for k, v in load_state(ddp_dir).items() if k.startswith("model.")}
        one = {k: v for k, v in load_state(run_dirs(tmp_path / "one" / rule)[0]).items() if k.startswith("model.")}
        w0 = {k: v for k, v in load_state(run_dirs(tmp_path / "init" / rule)[0]).items() if k.startswith("model.")}
        assert ddp.keys() == one.keys() and len(one) > 10
        for key in one:
            diff = (ddp[key] - one[key]).abs().max().item()
            assert diff < 1e-6, f"{rule}: {key} differs by {diff:.3g}"
            if key.endswith(".weight") and one[key].dim() == 2:  # every weight matrix moved ≥ 10× the tolerance, so the equality means something
                assert (one[key] - w0[key]).abs().max().item() > 1e-5, f"{rule}: {key} did not move"


RESUME = [*LM, "algorithm.name=dfa", "algorithm.granularity=macro", "algorithm.error_at=hidden", "data.seq_len=8",
          "data.vocab_size=300", "data.batch_size=2", "data.eval_batch_size=16", "trainer.epochs=4", "trainer.threads=1",
          "probe.every=5"]


def test_kill_and_resume_a_transformer_run_equals_the_uninterrupted_run(tmp_path):
    from bench.run.train import train

    data_root = tmp_path / "data"
    write_corpus(data_root / "wikitext-2")
    args = [*RESUME, f"data.root={data_root}"]
    threads = torch.get_num_threads()
    try:
        reference = train(compose(overrides=[*args, f"output.root={tmp_path / 'ref'}"]))
    finally:
        torch.set_num_threads(threads)
    assert reference["status"] == "finished" and reference["epochs_done"] == 4
    # the run records the tokenizer it used, and its tokens/s and perplexities
    assert reference["tokenizer"]["vocab_size"] == 300 and reference["tokenizer"]["tokenizer"] == "tokenizers bpe-bytelevel"
    assert reference["last_epoch"]["time/tokens_per_s"] > 0 and reference["last_epoch"]["data/tokens"] % 16 == 0
    assert reference["final"]["test/ppl"] == pytest.approx(math.exp(reference["final"]["test/loss"]), rel=1e-5)
    root = tmp_path / "runs"
    proc = subprocess.Popen([sys.executable, "-m", "bench", "run", *args, f"output.root={root}"], env=cli_env(),
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline, summary_path = time.monotonic() + 240, None
    while time.monotonic() < deadline and proc.poll() is None:
        found = list(root.rglob("summary.json"))
        if found and json.loads(found[0].read_text()).get("epochs_done", 0) >= 1:
            summary_path = found[0]
            break
        time.sleep(0.05)
    assert summary_path is not None, proc.communicate()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    killed = json.loads(summary_path.read_text())
    assert killed["status"] == "running" and 1 <= killed["epochs_done"] < 4, "the kill came too late to test resume"
    rerun = subprocess.run([sys.executable, "-m", "bench", "run", *args, f"output.root={root}"], env=cli_env(),
                           cwd=REPO, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "resuming" in rerun.stderr
    resumed = json.loads(summary_path.read_text())
    ref_dir = run_dirs(tmp_path / "ref")[0]
    a, b = load_state(ref_dir), load_state(summary_path.parent)
    for key in a:
        if key.startswith("model."):
            assert torch.equal(a[key], b[key]), key
    assert resumed["best"]["best/val_ppl"] == pytest.approx(reference["best"]["best/val_ppl"], rel=1e-6)
    assert resumed["final"]["test/ppl"] == pytest.approx(reference["final"]["test/ppl"], rel=1e-6)
