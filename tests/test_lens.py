"""The logit lens equals a brute-force reference, its last layer is the model's own output, and
samples whose English and target token sets overlap are excluded and counted."""
from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SHARED, requires_gemma
from polyalign import cli
from polyalign.labels import paper_token_set
from polyalign.analysis.lens import LensConfig, answer_states, lens_sets, prepare_prompts, run_lens
from polyalign.models import load_model
from polyalign.engine.runner import PrefixRunner
from polyalign.engine.model_parts import unembed
from polyalign.tasks import load_task
from testdevice import DEVICE
from tinytask import GOLD, REVIEWS, write_tiny_task

LANGS = ["en", "zh", "de", "ms"]


@pytest.fixture(scope="session")
def tiny_task(tmp_path_factory) -> tuple[str, str]:
    return write_tiny_task(tmp_path_factory.mktemp("lens_task"), "tinypolar", LANGS)


@pytest.fixture(scope="session")
def lens_model_path(tiny_model_path, tmp_path_factory) -> str:
    """The tiny model with random final-norm weights (so that normalising twice shows) and a
    tokenizer without a word-start marker in front of every text (as Gemma's), so that the label
    token sets of different scripts do not all share the bare `▁`."""
    from tokenizers import pre_tokenizers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("lens_" + Path(tiny_model_path).name)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5 + (0.0 if "gemma" in model.config.model_type else 1.0))
    model.save_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    tok.save_pretrained(folder)
    return str(folder)


# ----------------------------------------------------------------------------- reference
@torch.no_grad()
def brute_force(model, tokenizer, prompt: str, tgt: list[int], eng: list[int], tgt_all, eng_all):
    """One item, no cache, full vocabulary: manual RMSNorm + unembedding on output_hidden_states."""
    cfg = model.config
    ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    hs = out.hidden_states
    n_layers = len(hs) - 1
    assert n_layers == cfg.num_hidden_layers
    weight = model.get_output_embeddings().weight.double()
    norm_w = model.model.norm.weight.double()
    gemma = cfg.model_type.startswith("gemma")
    cap = getattr(cfg, "final_logit_softcapping", None)

    def head(h):
        logits = h @ weight.T
        return torch.tanh(logits / cap) * cap if cap else logits

    rows = []
    for layer in range(n_layers + 1):
        if layer < n_layers:
            h = hs[layer][0, -1].double()
            h = h / torch.sqrt(h.pow(2).mean() + cfg.rms_norm_eps)
            h = h * (1.0 + norm_w) if gemma else h * norm_w
            logits = head(h)
        else:
            logits = out.logits[0, -1].double()      # the model's real output distribution
            # transformers returns hidden_states[-1] already normed for this architecture:
            assert torch.allclose(head(hs[-1][0, -1].double()), logits, atol=1e-4)
        p = torch.softmax(logits, -1)
        ent = float(-(p * torch.log(p)).sum() / math.log(2))
        rows.append([float(p[tgt].sum()), float(p[eng].sum()), float(p[tgt_all].sum()), float(p[eng_all].sum()), ent])
    return np.array(rows)


def read_csv(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------- tests
def test_lens_equals_brute_force(lens_model_path, tiny_task, tmp_path, capsys):
    task_path, data = tiny_task
    out = tmp_path / "lens"
    langs = ["zh", "ms"]   # ms: one class readable, one overlapping (kept here, so both are compared)
    cfg = LensConfig(model=lens_model_path, task=task_path, langs=",".join(langs), labels="native",
                     output=str(out), data=data, limit=4, dtype="fp32", device=DEVICE, batch_tokens=64,
                     keep_overlapping=True, progress=False)
    summary = run_lens(cfg)
    samples = np.load(out / "samples.npz")
    lm = load_model(lens_model_path, "fp32", "cpu")
    task = load_task(task_path)
    for lang in langs:
        sets = lens_sets(lm.tokenizer, task, lang)
        checked = 0
        for i, (text, gold) in enumerate(zip(REVIEWS[lang][:4], GOLD)):
            c = task.classes.index(gold)
            prompt = task.prompt(lang, {"review": text}, "native")
            ref = brute_force(lm.model, lm.tokenizer, prompt, sets.target[c], sets.english[c],
                              sets.target_all, sets.english_all)
            for j, m in enumerate(["target_answer", "english_answer", "target_all", "english_all", "entropy_bits"]):
                got = samples[f"base/{lang}/{m}"][i]
                np.testing.assert_allclose(got, ref[:, j], atol=1e-5, rtol=0, err_msg=f"{lang} item {i} {m}")
            checked += 1
        assert checked == 4
        assert samples[f"base/{lang}/target_answer"].shape == (4, lm.model.config.num_hidden_layers + 1)
    # The numbers must not be trivially equal across layers (the check would be void).
    ta = samples["base/zh/target_answer"]
    assert np.ptp(ta, axis=1).min() > 1e-6
    assert summary["models"][0]["layers"] == lm.model.config.num_hidden_layers


def test_last_layer_is_model_output(lens_model_path, tiny_task):
    """Through the prefix cache and batching: the lens' last layer is the model's own distribution,
    and layer 0 is the (Gemma-scaled) embedding put through the final norm and head."""
    task_path, _ = tiny_task
    lm = load_model(lens_model_path, "fp32", "cpu")
    task = load_task(task_path)
    items = [{"id": str(i), "review": t, "label": g} for i, (t, g) in enumerate(zip(REVIEWS["zh"], GOLD))]
    ps = prepare_prompts(lm.tokenizer, task, "zh", "native", items, 4096)
    runner = PrefixRunner(lm.model, lm.tokenizer, token_budget=64)
    prefix = runner.prefix(ps.prefix_ids[:ps.prompts[0].cached_len])
    group = [p for p in ps.prompts if p.cached_len == ps.prompts[0].cached_len]
    last_hidden, hidden = runner.forward(prefix, [p.suffix for p in group], hidden_states=True)
    pos = torch.tensor([len(p.suffix) - 1 for p in group])
    states = answer_states(lm.model, hidden, last_hidden, pos)
    n_layers = lm.model.config.num_hidden_layers
    assert states.shape[1] == n_layers + 1
    with torch.inference_mode():
        lens_last = torch.softmax(unembed(lm.model, states[:, -1]), -1)
        lens_first = torch.softmax(unembed(lm.model, states[:, 0]), -1)
    for row, p in enumerate(group):
        with torch.inference_mode():
            full = torch.tensor([p.ids])
            ref = torch.softmax(lm.model(input_ids=full).logits[0, -1].float(), -1)
            emb = lm.model.get_input_embeddings()(full)[0, -1]          # includes Gemma's sqrt(d) scale
            from polyalign.engine.model_parts import final_norm
            ref0 = torch.softmax(unembed(lm.model, final_norm(lm.model)(emb)), -1)
        assert (lens_last[row] - ref).abs().max() < 1e-5
        assert (lens_first[row] - ref0).abs().max() < 1e-5


def test_overlap_exclusion_counted(tiny_llama_path, tiny_task, tmp_path, capsys):
    task_path, data = tiny_task
    # A tokenizer without the leading marker (see lens_model_path); the default tiny one puts a bare
    # `▁` in front of every label, so every sample of every language would overlap.
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_llama_path, model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_llama_path)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    tok.save_pretrained(model_dir)
    out = tmp_path / "lens"
    code = cli.main(["lens", "--model", str(model_dir), "--task", task_path, "--langs", ",".join(LANGS),
                     "--data", data, "--output", str(out), "--dtype", "fp32", "--device", DEVICE, "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    rows = {(r["lang"], r["class"]): (int(r["n_excluded"]), int(r["n_total"])) for r in read_csv(out / "excluded.csv")}
    # en: target == English; de positiv/negativ share "p"/"n" with English; zh shares nothing;
    # ms "chanya" is readable but "negatif" shares "n" with "negative".
    assert rows == {("en", "positive"): (3, 3), ("en", "negative"): (3, 3), ("de", "positive"): (3, 3),
                    ("de", "negative"): (3, 3), ("zh", "positive"): (0, 3), ("zh", "negative"): (0, 3),
                    ("ms", "positive"): (0, 3), ("ms", "negative"): (3, 3)}
    # Independently of the lens: the rule on paper_token_set.
    for (lang, cls), (k, _) in rows.items():
        words = load_task(task_path).label_words(lang, "native")
        overlap = set(paper_token_set(tok, words[cls])) & set(paper_token_set(tok, cls))
        assert bool(overlap) == (k > 0)
    assert "ms" in printed and "3/3" in printed and "0/3" in printed
    lens_rows = read_csv(out / "lens.csv")
    n_by_lang = {r["lang"]: int(r["n"]) for r in lens_rows}
    assert n_by_lang == {"zh": 6, "ms": 3}          # en and de are fully excluded
    assert {r["measure"] for r in lens_rows} == {"target_answer", "english_answer", "target_all", "english_all",
                                                  "entropy_bits"}
    assert (out / "lens_zh.png").exists() and not (out / "lens_en.png").exists()
    samples = np.load(out / "samples.npz")
    assert samples["base/ms/excluded"].tolist() == [False, True] * 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reading"]["base"]["en"] == {"n": 0}


def test_compare_adapter_overlay(tiny_llama_path, tiny_task, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    task_path, data = tiny_task
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_path, dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))
    adapter = tmp_path / "qa-zh"
    peft_model.save_pretrained(adapter)
    out = tmp_path / "lens"
    summary = run_lens(LensConfig(model=tiny_llama_path, compare_adapter=[str(adapter)], task=task_path,
                                  langs="zh,ms", output=str(out), data=data, dtype="fp32", device=DEVICE,
                                  keep_overlapping=True, progress=False))
    assert [m["label"] for m in summary["models"]] == ["base", "qa-zh"]
    rows = read_csv(out / "lens.csv")
    assert {r["model"] for r in rows} == {"base", "qa-zh"}
    s = np.load(out / "samples.npz")
    assert not np.allclose(s["base/zh/entropy_bits"], s["qa-zh/zh/entropy_bits"])
    for r in rows:
        if r["ci_low"]:
            assert float(r["ci_low"]) <= float(r["mean"]) <= float(r["ci_high"])
    assert (out / "lens_overlay.png").exists() and (out / "lens_zh.png").exists()


def test_bad_input_is_one_line_error(tiny_task, tmp_path, capsys):
    task_path, data = tiny_task
    code = cli.main(["lens", "--model", "unused", "--task", task_path, "--langs", "zh,xx", "--data", data,
                     "--output", str(tmp_path)])
    assert code == 2
    assert "unknown language 'xx'" in capsys.readouterr().err
    code = cli.main(["lens", "--model", "unused", "--task", task_path, "--langs", "zh", "--data", data,
                     "--compare-adapter", str(tmp_path / "nope"), "--output", str(tmp_path)])
    assert code == 2
    assert "no PEFT adapter" in capsys.readouterr().err


@requires_gemma
@pytest.mark.gemma
def test_real_gemma_lens_and_geometry(tmp_path):
    if not SHARED.exists():
        pytest.skip("../shared/data/paper-release is absent")
    lens_out, geo_out = tmp_path / "lens", tmp_path / "geo"
    assert cli.main(["lens", "--model", "gemma-3-270m", "--task", "amazon_polarity", "--langs", "zh,ja",
                     "--labels", "native", "--data", str(SHARED), "--limit", "8", "--output", str(lens_out),
                     "--no-progress"]) == 0
    summary = json.loads((lens_out / "summary.json").read_text())
    for lang in ("zh", "ja"):
        r = summary["reading"]["base"][lang]
        assert r["n"] == 8
        # The last layer is the real output: with native demos, the native answer should carry mass.
        assert r["final_target_answer"] > 0.05
    assert (lens_out / "lens_zh.png").exists()
    assert cli.main(["geometry", "--model", "gemma-3-270m", "--task", "amazon_polarity", "--langs", "en,zh",
                     "--data", str(SHARED), "--limit", "8", "--output", str(geo_out), "--no-progress"]) == 0
    geo = json.loads((geo_out / "summary.json").read_text())
    assert geo["layers"] and (geo_out / "alignment.csv").exists()


def test_long_items_are_truncated_inside_the_item(tiny_tokenizer, tiny_task):
    task = load_task(tiny_task[0])
    items = [{"id": "0", "review": "Great book, I read it twice. " * 40, "label": "positive"},
             {"id": "1", "review": "Short.", "label": "negative"}]
    prefix_len = len(tiny_tokenizer(task.demo_prefix("en", "native"))["input_ids"])
    ps = prepare_prompts(tiny_tokenizer, task, "en", "native", items, prefix_len + 30)
    long, short = ps.prompts
    assert long.truncated and not short.truncated
    assert len(long.ids) <= prefix_len + 30 and long.text.endswith('\nEmotion: "')
    assert long.text.startswith(task.demo_prefix("en", "native")) and long.cached_len == prefix_len


def test_rerun_and_killed_run_compute_only_what_is_missing(tmp_path, tiny_llama_path, tiny_task, monkeypatch):
    """Each (model, language) is saved when done: a repeated run loads no model, a run that lost one
    language's part recomputes that language alone, and the outputs are byte-identical each time."""
    from polyalign.analysis import lens as L

    task_path, data = tiny_task
    out = tmp_path / "lens"
    cfg = dict(model=tiny_llama_path, task=task_path, langs="zh,de,ms", output=str(out), data=data,
               dtype="fp32", device=DEVICE, keep_overlapping=True, progress=False)
    run_lens(LensConfig(**cfg))
    first = (out / "lens.csv").read_bytes(), (out / "samples.npz").read_bytes()
    assert sorted(p.name for p in (out / "parts" / "base").iterdir()) == ["de.npz", "ms.npz", "zh.npz"]

    done = []
    real = L.run_group
    monkeypatch.setattr(L, "run_group",
                        lambda model, runner, ps, *a, **k: done.append(ps.lang) or real(model, runner, ps, *a, **k))
    import polyalign.models as M
    monkeypatch.setattr(M, "load_model", lambda *a, **k: pytest.fail("a finished run loaded the model"))
    summary = run_lens(LensConfig(**cfg))
    assert done == [] and summary["models"][0]["cached_langs"] == ["de", "ms", "zh"]
    assert ((out / "lens.csv").read_bytes(), (out / "samples.npz").read_bytes()) == first

    monkeypatch.setattr(M, "load_model", load_model)
    (out / "parts" / "base" / "de.npz").unlink()          # as if killed before German was saved
    run_lens(LensConfig(**cfg))
    assert done == ["de"]
    assert ((out / "lens.csv").read_bytes(), (out / "samples.npz").read_bytes()) == first

    run_lens(LensConfig(**cfg, limit=2))                  # other items: a new hash, recomputed
    assert done == ["de", "zh", "de", "ms"]
    run_lens(LensConfig(**cfg, recompute=True))
    assert done[4:] == ["zh", "de", "ms"]
    assert ((out / "lens.csv").read_bytes(), (out / "samples.npz").read_bytes()) == first
