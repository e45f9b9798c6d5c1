"""Language neurons: activation counts vs a brute-force forward, LAPE vs numpy, deactivation vs
down_proj without those columns, and the command (outputs, resume, bad input)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from polyalign.analysis import activations as act

TEXTS = ["The blender crushes ice in seconds.", "Das Handy ist kaputt gegangen, leider.",
         "这本小说让我熬夜读到凌晨两点。", "A man is playing a guitar on stage while people watch.",
         "short", "Le film était long mais les acteurs étaient excellents et la musique aussi."]


def _load(path):
    from polyalign.models import load_model
    return load_model(path, "fp32", "cpu", progress=False)


def brute_force_counts(model, prefix, sequences, eps):
    """Each sequence alone through the model's own forward (no packing, no padding); the MLP input is
    caught by a pre-hook and act_fn(gate_proj(x)) recomputed from the weights for every token.
    Returns (lower, upper): a gate pre-activation within eps of zero may round to either sign between
    two forwards that sum in another order, so it counts in `upper` only."""
    layers = model.model.layers
    caught = {}
    hooks = [layer.mlp.register_forward_pre_hook(lambda m, a, i=i: caught.__setitem__(i, a[0].detach()))
             for i, layer in enumerate(layers)]
    lo = np.zeros((len(layers), model.config.intermediate_size), dtype=np.int64)
    hi = lo.copy()
    try:
        with torch.no_grad():
            for seq in sequences:
                model(input_ids=torch.tensor([prefix + seq]))
                for i, layer in enumerate(layers):
                    x = caught[i][0, len(prefix):]                       # the text's tokens only
                    g = x @ layer.mlp.gate_proj.weight.T
                    fired, unsure = layer.mlp.act_fn(g) > 0, g.abs() < eps
                    lo[i] += (fired & ~unsure).sum(0).numpy()
                    hi[i] += (fired | unsure).sum(0).numpy()
    finally:
        for h in hooks:
            h.remove()
    return lo, hi


@pytest.mark.parametrize("packed", [True, False])
def test_counts_equal_brute_force(tiny_model_path, one_thread, packed):
    from polyalign.engine.runner import PrefixRunner
    lm = _load(tiny_model_path)
    runner = PrefixRunner(lm.model, lm.tokenizer, token_budget=64)   # several batches, with padding
    if not packed:
        runner.packed, runner.pad_weight = False, 1.0
    seqs = act.token_sequences(lm.tokenizer, TEXTS * 3, 10_000, 40)
    prefix = act.shared_prefix(lm.tokenizer)
    counts, tokens = act.count_activations(lm.model, runner, prefix, seqs)
    assert tokens == sum(map(len, seqs))
    lo, hi = brute_force_counts(lm.model, prefix, seqs, 1e-5)
    assert counts.shape == lo.shape
    assert (lo <= counts).all() and (counts <= hi).all()
    assert (hi - lo).sum() <= 1e-4 * tokens * counts.size   # values near zero are rare: the bounds are tight
    assert counts.sum() > 0 and (counts < tokens).any()


def test_sign_preserving_activations_fire_where_their_input_is_positive():
    """The counter skips the activation for these: act(x) > 0 must be x > 0, in fp32 and bf16, for
    every transformers activation in the list (and a list entry that is not sign-preserving fails)."""
    from transformers.activations import ACT2CLS

    from polyalign.analysis.activations import SIGN_PRESERVING, MLPParts
    x = torch.cat([torch.linspace(-60, 60, 20001), torch.randn(20000) * 3])
    x = x[x.abs() > 1e-6]
    checked = 0
    for name, cls in ACT2CLS.items():
        cls, kwargs = (cls[0], cls[1]) if isinstance(cls, tuple) else (cls, {})
        try:
            act = cls(**kwargs)
        except TypeError:       # needs arguments the registry does not give (e.g. clipping bounds)
            continue
        parts = MLPParts(None, None, act, None, 0, True)
        for dtype in (torch.float32, torch.bfloat16):
            act = act.to(dtype)           # modules with parameters (PReLU) compute in their dtype
            truth = act(x.to(dtype)) > 0
            if parts.sign_preserving:
                assert torch.equal(parts.fired(x.to(dtype)), truth), name
                assert torch.equal(truth, x.to(dtype) > 0), f"{name} is listed but not sign-preserving"
                checked += 1
            else:
                assert torch.equal(parts.fired(x.to(dtype)), truth), name
    assert checked >= 2 * 8 and {"GELUTanh", "SiLUActivation"} <= SIGN_PRESERVING


def test_unknown_mlp_is_one_line(tiny_llama_path):
    lm = _load(tiny_llama_path)

    class StrangeMLP(torch.nn.Module):
        def forward(self, x):
            return x

    lm.model.model.layers[1].mlp = StrangeMLP()
    from polyalign.errors import PolyalignError
    with pytest.raises(PolyalignError, match="StrangeMLP") as e:
        act.mlp_parts(lm.model)
    assert "\n" not in str(e.value)


def test_deactivation_removes_down_proj_columns(tiny_model_path, one_thread):
    lm = _load(tiny_model_path)
    layer = lm.model.model.layers[1]
    mlp = layer.mlp
    off = [3, 17, 64, 127]
    x = torch.randn(2, 5, lm.model.config.hidden_size)
    keep = [i for i in range(mlp.down_proj.weight.shape[1]) if i not in off]
    with torch.no_grad():
        hidden = mlp.act_fn(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)
        manual = hidden[..., keep] @ mlp.down_proj.weight[:, keep].T
        with act.deactivated(lm.model, {1: off}):
            hooked = mlp(x)
        after = mlp(x)                                     # the hook is gone again
    torch.testing.assert_close(hooked, manual, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(after, manual, atol=1e-4)


# ----------------------------------------------------------------------------- LAPE
def reference_lape(probs, filter_pct, top_rate, act_pct):
    """Tang et al.'s selection written out neuron by neuron, in plain numpy and Python."""
    L, n, K = probs.shape
    flat = sorted(probs.ravel().tolist())
    kth = lambda pct: flat[max(1, round(len(flat) * pct / 100)) - 1]  # noqa: E731
    filt, bar = kth(filter_pct), kth(act_pct)
    scored = []
    for layer in range(L):
        for i in range(n):
            p = probs[layer, i]
            if not (p > filt).any():
                continue
            q = p / p.sum()
            scored.append((-sum(x * np.log(x) for x in q if x > 0), layer * n + i))
    scored.sort()
    kept = [flat_index for _, flat_index in scored[:round(L * n * top_rate)]]
    return [sorted(divmod(f, n) for f in kept if probs[f // n, f % n, k] > bar) for k in range(K)]


def _planted():
    rng = np.random.default_rng(1)
    probs = rng.uniform(0.2, 0.3, size=(2, 50, 3))
    probs[0, 5] = [0.9, 0.01, 0.01]       # a zh neuron, say
    probs[1, 7] = [0.01, 0.95, 0.01]
    probs[1, 20] = [0.9, 0.01, 0.9]       # shared by languages 0 and 2
    probs[0, 9] = 0.0                     # never fires: entropy 0, but dropped by the filter
    return probs


def test_lape_known_answer_and_reference():
    from polyalign.analysis.neurons import lape_select
    probs = _planted()
    sel = lape_select(probs, 95, 0.03, 95)
    got = [sorted((layer, i) for layer, idx in enumerate(per) for i in idx) for per in sel.neurons]
    assert got == [[(0, 5), (1, 20)], [(1, 7)], [(1, 20)]]
    assert got == reference_lape(probs, 95, 0.03, 95)
    assert sel.kept == 3


@pytest.mark.parametrize("seed", range(5))
def test_lape_matches_reference_on_random_matrices(seed):
    from polyalign.analysis.neurons import lape_select
    rng = np.random.default_rng(seed)
    probs = rng.beta(0.5, 2.0, size=(4, 60, 5)) * (rng.uniform(size=(4, 60, 1)) < 0.9)
    for args in ((95, 0.01, 95), (90, 0.05, 80), (99, 0.2, 50)):
        sel = lape_select(probs, *args)
        got = [sorted((layer, i) for layer, idx in enumerate(per) for i in idx) for per in sel.neurons]
        assert got == reference_lape(probs, *args)


def test_overlap_is_jaccard():
    from polyalign.analysis.neurons import overlap_matrix
    neurons = [[[1, 2, 3], [4]], [[2, 3], []], [[], []]]
    m = overlap_matrix(neurons)
    assert m[0, 1] == pytest.approx(2 / 4) and m[0, 0] == 1 and np.isnan(m[2, 2]) and m[0, 2] == 0
    assert overlap_matrix(neurons, 1)[0, 1] == 0


# ----------------------------------------------------------------------------- the command
def _tiny_adapter(model_path, folder):
    """A LoRA on the MLP's gate and up projections with non-zero weights: it changes the neurons."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(3)
    base = AutoModelForCausalLM.from_pretrained(model_path)
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=32, target_modules=["gate_proj", "up_proj"],
                                           init_lora_weights=False))
    peft.save_pretrained(folder)
    return str(folder)


def _cfg(model, out, **kw):
    from polyalign.analysis.neurons import NeuronsConfig
    base = dict(model=model, langs="en,de,zh", tokens_per_language=600, top_rate=0.05, output=str(out),
                dtype="fp32", device="cpu", progress=False)
    return NeuronsConfig(**{**base, **kw})


def _files(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_neurons_outputs_compare_and_resume(tiny_llama_path, tmp_path, one_thread, monkeypatch):
    import csv
    import json

    from polyalign.analysis import neurons as N
    adapter = _tiny_adapter(tiny_llama_path, tmp_path / "adapter")
    full = N.run_neurons(_cfg(tiny_llama_path, tmp_path / "a", compare_adapter=[adapter], seen="de,en"))
    out = tmp_path / "a"
    for name in ("neurons.json", "probabilities.npz", "counts.csv", "overlap.csv", "summary.json", "compare.csv",
                 "compare_layers.csv", "neuron_counts_base.png", "neuron_overlap_base.png",
                 "neuron_counts_adapter.png"):
        assert (out / name).is_file(), name
    data = json.loads((out / "neurons.json").read_text())
    assert data["settings"]["top_rate"] == 0.05 and data["settings"]["filter_percentile"] == 95.0
    # The saved lists are what LAPE selects from the saved probabilities.
    with np.load(out / "probabilities.npz") as z:
        probs = z["base/probabilities"]
        assert (z["base/counts"] / z["tokens"] == probs).all()
    ref = reference_lape(probs, 95, 0.05, 95)
    for k, lang in enumerate(["en", "de", "zh"]):
        listed = sorted((int(layer), i) for layer, idx in data["models"]["base"]["neurons"][lang].items() for i in idx)
        assert listed == ref[k]
    counts = list(csv.DictReader((out / "counts.csv").open()))
    assert {(r["model"], r["lang"]) for r in counts} == {(m, lang) for m in ("base", "adapter") for lang in ("en", "de", "zh")}
    assert list(full["compare"]) == ["adapter"]          # the first model against each other one
    rows = {r["lang"]: r for r in full["compare"]["adapter"]["languages"]}
    assert rows["de"]["seen"] is True and rows["zh"]["seen"] is False
    assert set(full["compare"]["adapter"]["groups"]) == {"seen", "unseen", "high"}
    assert full["models"]["base"]["per_language"] != full["models"]["adapter"]["per_language"] or \
        data["models"]["base"]["neurons"] != data["models"]["adapter"]["neurons"]

    # Killed after the first language, then rerun: byte-identical outputs, only the rest computed.
    calls = []
    from polyalign.analysis import activations as A
    real = A.count_activations

    def dying(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(A, "count_activations", dying)
    cfg = _cfg(tiny_llama_path, tmp_path / "b", compare_adapter=[adapter], seen="de,en")
    with pytest.raises(KeyboardInterrupt):
        N.run_neurons(cfg)
    monkeypatch.setattr(A, "count_activations", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    calls.clear()
    N.run_neurons(cfg)
    assert len(calls) == 5                       # 6 (model, language) parts, one saved before the kill
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert a.keys() == b.keys()
    for name in a:     # summary.json names its own --output folder; all else must be the same bytes
        if name == "summary.json":
            sa, sb = json.loads(a[name]), json.loads(b[name])
            assert sa["config"].pop("output") != sb["config"].pop("output")
            assert sa == sb
        else:
            assert a[name] == b[name], name


def test_bad_input_is_one_line(tiny_llama_path, tmp_path, capsys):
    import json

    from polyalign import cli
    from polyalign.analysis import neurons as N
    base = ["neurons", "--model", tiny_llama_path, "--dtype", "fp32", "--device", "cpu", "--no-progress"]
    assert cli.main(base + ["--langs", "en,sw", "--tokens-per-language", "2000000", "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "'en'" in err and "10%" in err
    for lang, texts in (("en", ["some English text here"] * 5), ("de", ["", " "])):
        (tmp_path / f"{lang}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    assert cli.main(base + ["--langs", "en,de", "--data", str(tmp_path / "{lang}.jsonl"),
                            "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no text in language 'de'" in err
    assert cli.main(base + ["--top-rate", "2", "--output", str(tmp_path / "o")]) == 2
    assert "--top-rate" in capsys.readouterr().err
    assert not (tmp_path / "o" / "parts").exists()
    assert N.MIN_SHARE == 0.10


def test_deactivation_matrix_and_fresh_caches(tiny_llama_path, tmp_path, one_thread, monkeypatch):
    import json

    from polyalign.analysis import neurons as N
    from polyalign.analysis.activations import deactivated
    from polyalign.engine import runner as R
    from polyalign.evaluation.evaluate import EvalConfig, evaluate
    from polyalign.store import read_jsonl

    made = []
    init = R.PrefixRunner.__init__
    monkeypatch.setattr(R.PrefixRunner, "__init__", lambda self, *a, **k: (made.append(self), init(self, *a, **k))[1])
    out = tmp_path / "n"
    summary = N.run_neurons(_cfg(tiny_llama_path, out, langs="en,de", top_rate=0.2, deactivate=True,
                                 eval_langs="en,de", eval_limit=6))
    d = summary["deactivation"]
    assert d["deactivated"] == ["en", "de"]
    runs = sorted(p.name for p in (out / "deactivate").iterdir())
    assert len(runs) == 5 and runs[-1].startswith("random-en")        # none, 2 languages, 2 controls
    assert len(made) == 1 + 5                 # the counting runner, then a fresh evaluator per deactivation
    acc = lambda folder: {r["lang"]: r["acc"] for r in json.loads((folder / "results.json").read_text())["rows"]}  # noqa: E731
    folder = {name.rsplit("-", 1)[0]: out / "deactivate" / name for name in runs}
    for lang in ("en", "de"):
        for e in ("en", "de"):
            assert d["change"][lang][e] == pytest.approx(acc(folder[lang])[e] - acc(folder["none"])[e])
            assert d["random_change"][lang][e] == pytest.approx(acc(folder[f"random-{lang}"])[e] - acc(folder["none"])[e])
    # The control zeroes as many neurons per layer as the language's set, other ones.
    sel = json.loads((out / "neurons.json").read_text())["models"]["base"]["neurons"]["de"]
    control = d["random_neurons"]["de"]
    assert {k: len(v) for k, v in control.items()} == {k: len(v) for k, v in sel.items()} and control != sel
    # A fresh model under the same hook scores exactly as the run did: no cache leaked between runs.
    from polyalign.models import load_model
    lm = load_model(tiny_llama_path, "fp32", "cpu", progress=False)
    with deactivated(lm.model, {int(k): v for k, v in sel.items()}):
        evaluate(EvalConfig(model=tiny_llama_path, tasks="amazon_polarity", langs="en,de", limit=6, dtype="fp32",
                            device="cpu", output=str(tmp_path / "check"), progress=False), model=lm)
    for e in ("en", "de"):
        mine = read_jsonl(tmp_path / "check" / "samples" / "amazon_polarity" / "english" / f"{e}.jsonl")
        theirs = read_jsonl(folder["de"] / "samples" / "amazon_polarity" / "english" / f"{e}.jsonl")
        assert [s["scores"] for s in mine] == [s["scores"] for s in theirs]
        plain = read_jsonl(folder["none"] / "samples" / "amazon_polarity" / "english" / f"{e}.jsonl")
        assert [s["scores"] for s in mine] != [s["scores"] for s in plain]
    assert (out / "deactivation.csv").is_file() and (out / "deactivation.png").is_file()


def test_in_memory_equals_the_folder_run(tiny_llama_path, tmp_path, one_thread, monkeypatch):
    """pa.neurons without output (by name, and on a loaded model) writes nothing and finds what the
    folder run finds: probabilities, selections, summary, deactivation accuracies."""
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import polyalign as pa
    from polyalign.analysis import neurons as N
    opts = dict(langs=["en", "de"], tokens_per_language=600, top_rate=0.2, dtype="fp32", device="cpu",
                deactivate=True, eval_langs="en,de", eval_limit=4, progress=False)
    folder = pa.neurons(tiny_llama_path, output=tmp_path / "folder", **opts)
    monkeypatch.chdir(tmp_path / "folder")       # a run in memory must not write (its default folder either)
    by_name = pa.neurons(tiny_llama_path, **opts)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_path)
    loaded = pa.neurons(model, AutoTokenizer.from_pretrained(tiny_llama_path), **opts)
    assert sorted(p.name for p in (tmp_path / "folder").iterdir()) == sorted(
        ["parts", "deactivate", "neurons.json", "probabilities.npz", "counts.csv", "overlap.csv", "summary.json",
         "deactivation.csv", "deactivation.png", "neuron_counts_base.png", "neuron_overlap_base.png"])
    assert isinstance(folder, N.NeuronsResult) and folder.output == tmp_path / "folder"
    on_disk = json.loads((tmp_path / "folder" / "summary.json").read_text())
    with np.load(tmp_path / "folder" / "probabilities.npz") as z:
        probs = z["base/probabilities"]
    for mem in (by_name, loaded):
        assert mem.output is None and mem["figures"] == []
        np.testing.assert_array_equal(mem.probabilities["base"], probs)
        assert mem.selections["base"] == folder.selections["base"]
        assert mem["models"] == on_disk["models"] and mem["tokens"] == on_disk["tokens"]
        d, ref = mem["deactivation"], on_disk["deactivation"]
        assert d["accuracy"] == ref["accuracy"] and d["change"] == ref["change"]
        assert d["random_change"] == ref["random_change"] and set(d["folders"].values()) == {None}
    assert loaded["config"]["model"] == tiny_llama_path and loaded["config"]["output"] is None
    assert not model.training                    # put back as it was given (eval after from_pretrained)
    with pytest.raises(pa.PolyalignError, match="apply to a model name"):
        pa.neurons(model, AutoTokenizer.from_pretrained(tiny_llama_path), adapter=str(tmp_path), **opts)


def test_too_little_text_is_one_line_naming_the_command(tiny_tokenizer):
    from polyalign.analysis.activations import token_sequences
    from polyalign.analysis.neurons import language_sequences
    from polyalign.errors import PolyalignError
    texts = {"en": ["one two three four five six seven eight"] * 3, "de": ["eins zwei"]}
    budget = sum(map(len, token_sequences(tiny_tokenizer, texts["en"], 10**6, 512)))
    got = language_sequences(tiny_tokenizer, texts, ["en"], budget, 512, "neurons")
    assert got == {"en": token_sequences(tiny_tokenizer, texts["en"], budget, 512)}
    with pytest.raises(PolyalignError, match=r"^tune-lens: language 'de' has only \d+ tokens of text, under 10% of "
                                             rf"--tokens-per-language {budget * 5}; more$"):
        language_sequences(tiny_tokenizer, texts, ["en", "de"], budget * 5, 512, "tune-lens", hint="; more")
