"""The tuned lens: identity at initialisation (= the logit lens), the chunked KL and its gradient vs
autograd over full logits, training lowers the KL, the last layer is the model's own output, resume."""
from __future__ import annotations

import json

import pytest
import torch

from polyalign.analysis import tuned_lens as T

TEXTS = ["The blender crushes ice in seconds.", "Das Handy ist kaputt gegangen, leider.",
         "这本小说让我熬夜读到凌晨两点。", "A man is playing a guitar on stage while people watch."]


def _setup(path):
    from polyalign.analysis.activations import shared_prefix, token_sequences
    from polyalign.engine.runner import PrefixRunner
    from polyalign.models import load_model
    lm = load_model(path, "fp32", "cpu", progress=False)
    runner = PrefixRunner(lm.model, lm.tokenizer)
    seqs = token_sequences(lm.tokenizer, TEXTS, 10_000, 64)
    return lm, runner, runner.prefix(shared_prefix(lm.tokenizer)), seqs


def test_identity_at_init_equals_logit_lens(tiny_model_path, one_thread):
    from polyalign.analysis.lens import answer_states
    lm, runner, prefix, seqs = _setup(tiny_model_path)
    last, hidden = runner.forward(prefix, seqs, hidden_states=True)
    pos = torch.tensor([len(s) - 1 for s in seqs])
    rows = torch.arange(len(seqs))
    cfg = lm.model.config
    t = T.Translators(cfg.num_hidden_layers, cfg.hidden_size)
    with torch.no_grad():
        tuned = T.tuned_states(lm.model, t, hidden, last, rows, pos)
    torch.testing.assert_close(tuned, answer_states(lm.model, hidden, last, pos), rtol=0, atol=0)


def test_chunked_kl_and_gradient_equal_autograd(tiny_model_path, one_thread):
    from polyalign.engine.model_parts import final_norm, unembed
    lm, runner, prefix, seqs = _setup(tiny_model_path)
    hidden, final = T.real_states(runner, prefix, seqs)
    cfg = lm.model.config
    t = T.Translators(cfg.num_hidden_layers, cfg.hidden_size)
    torch.manual_seed(0)
    with torch.no_grad():                              # away from the identity, so the gradient is not 0
        t.weight.normal_(0, 0.05)
        t.bias.normal_(0, 0.1)
    kl = T.lens_loss_and_backward(lm.model, t, hidden, final, chunk=7)
    got = (t.weight.grad.clone(), t.bias.grad.clone())

    t.zero_grad()
    p = torch.log_softmax(unembed(lm.model, final), -1)
    ref = []
    for layer, h in enumerate(hidden):
        q = torch.log_softmax(unembed(lm.model, final_norm(lm.model)(t(h, layer))), -1)
        ref.append((p.exp() * (p - q)).sum(-1).mean())
    torch.stack(ref).sum().backward()
    torch.testing.assert_close(kl.float(), torch.stack(ref).detach(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got[0], t.weight.grad, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(got[1], t.bias.grad, rtol=1e-3, atol=1e-6)


def _cfg(model, out, **kw):
    base = dict(model=model, langs="en,de,zh", tokens_per_language=400, steps=8, tokens_per_step=300,
                save_every=3, output=str(out), dtype="fp32", device="cpu", progress=False)
    return T.TuneLensConfig(**{**base, **kw})


def test_training_lowers_kl_last_layer_is_the_output_and_resume(tiny_llama_path, tmp_path, one_thread, monkeypatch):
    from safetensors.torch import load_file

    from polyalign.engine.model_parts import unembed
    info = T.tune_lens(_cfg(tiny_llama_path, tmp_path / "a"))
    log = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 8 and info["kl_last"] < info["kl_first"]
    # Layer by layer too (the first steps see other tokens than the last: compare on the same step's
    # tokens by re-measuring the lens at init and after training on one batch).
    lm, runner, prefix, seqs = _setup(tiny_llama_path)
    hidden, final = T.real_states(runner, prefix, seqs)
    cfg = lm.model.config
    trained, _ = T.load_translators(tmp_path / "a", lm.model)
    fresh = T.Translators(cfg.num_hidden_layers, cfg.hidden_size).requires_grad_(False)
    kl_init = T.chunked_kl(_normed(lm.model, fresh, hidden, final), final, lm.model.lm_head, None, 64)[0]
    kl_trained = T.chunked_kl(_normed(lm.model, trained, hidden, final), final, lm.model.lm_head, None, 64)[0]
    assert (kl_trained < kl_init).all()
    # The tuned lens' last layer is the model's own output distribution.
    last, all_hidden = runner.forward(prefix, seqs, hidden_states=True)
    pos = torch.tensor([len(s) - 1 for s in seqs])
    rows = torch.arange(len(seqs))
    with torch.no_grad():
        states = T.tuned_states(lm.model, trained, all_hidden, last, rows, pos)
        own = torch.stack([lm.model(input_ids=torch.tensor([prefix.ids + s])).logits[0, -1] for s in seqs])
    torch.testing.assert_close(torch.softmax(unembed(lm.model, states[:, -1]), -1), torch.softmax(own.float(), -1),
                               rtol=1e-4, atol=1e-5)

    # Killed after step 5 (checkpoint at step 3), rerun: the same translators as without the kill.
    real = T.lens_loss_and_backward
    calls = []

    def dying(*a, **k):
        calls.append(1)
        if len(calls) > 5 * _batches_per_step(tiny_llama_path):
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(T, "lens_loss_and_backward", dying)
    with pytest.raises(KeyboardInterrupt):
        T.tune_lens(_cfg(tiny_llama_path, tmp_path / "b"))
    assert (tmp_path / "b" / "checkpoint.pt").is_file()
    monkeypatch.setattr(T, "lens_loss_and_backward", real)
    T.tune_lens(_cfg(tiny_llama_path, tmp_path / "b"))
    a, b = load_file(str(tmp_path / "a" / "lens.safetensors")), load_file(str(tmp_path / "b" / "lens.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)
    assert (tmp_path / "a" / "log.jsonl").read_text().count("\n") == (tmp_path / "b" / "log.jsonl").read_text().count("\n")
    # A rerun of a finished lens trains nothing and returns what the folder holds.
    monkeypatch.setattr(T, "lens_loss_and_backward", lambda *a, **k: pytest.fail("a finished lens was retrained"))
    again = T.tune_lens(_cfg(tiny_llama_path, tmp_path / "a"))
    assert again["kl_last"] == info["kl_last"]


def _batches_per_step(path):
    return 1   # the step's few hundred tokens fit in one runner batch (the default token budget)


def _normed(model, translators, hidden, final):
    from polyalign.engine.model_parts import final_norm
    with torch.no_grad():
        return torch.stack([final_norm(model)(translators(h, l)) for l, h in enumerate(hidden)])


def test_lens_command_logit_tuned_both(tiny_llama_path, tmp_path, one_thread, capsys):
    import csv

    from polyalign import cli
    from polyalign.analysis.lens import LensConfig, run_lens
    lens_dir = tmp_path / "lens"
    T.tune_lens(_cfg(tiny_llama_path, lens_dir, steps=2))
    common = dict(model=tiny_llama_path, langs="de,zh", limit=4, dtype="fp32", device="cpu", progress=False)
    run_lens(LensConfig(**common, output=str(tmp_path / "logit")))
    both = run_lens(LensConfig(**common, output=str(tmp_path / "both"), lens="both", tuned_lens=str(lens_dir)))
    assert [m["label"] for m in both["models"]] == ["base", "base-tuned"]
    rows = lambda out, label: [r for r in csv.DictReader((tmp_path / out / "lens.csv").open()) if r["model"] == label]  # noqa: E731
    assert rows("both", "base") == rows("logit", "base")          # the logit lens is unchanged by --lens both
    tuned, plain = rows("both", "base-tuned"), rows("logit", "base")
    assert len(tuned) == len(plain)
    last = max(int(r["layer"]) for r in plain)
    for t, p in zip(tuned, plain):                                  # the last layer is the model's output
        if int(t["layer"]) == last:
            assert float(t["mean"]) == pytest.approx(float(p["mean"]), rel=1e-4, abs=1e-6)
    assert any(t != p for t, p in zip(tuned, plain) if int(t["layer"]) < last)
    # In memory, on a loaded model: the same numbers as the files (main's run_lens paths, with the views).
    from polyalign.models import load_model
    lm = load_model(tiny_llama_path, "fp32", "cpu", progress=False)
    mem = run_lens(LensConfig(**common, output=None, lens="both", tuned_lens=str(lens_dir)),
                   model=lm.model, tokenizer=lm.tokenizer)
    assert mem.models == ["base", "base-tuned"] and mem.output is None
    for r in mem.rows:
        if r["model"] == "base-tuned":
            f = next(x for x in tuned if (x["lang"], x["layer"], x["measure"]) == (r["lang"], str(r["layer"]), r["measure"]))
            assert r["mean"] == pytest.approx(float(f["mean"]), rel=1e-5, abs=1e-9)
    base = ["lens", "--model", tiny_llama_path, "--langs", "de", "--output", str(tmp_path / "x"), "--no-progress"]
    with pytest.raises(SystemExit) as exc:            # argparse's choices: one line, exit 2
        cli.main(base + ["--lens", "fancy"])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and "\n" not in err and "invalid choice: 'fancy'" in err
    from polyalign.errors import PolyalignError
    with pytest.raises(PolyalignError, match="unknown lens 'fancy'"):   # from Python, before any model loads
        run_lens(LensConfig(**common, output=None, lens="fancy"))
    assert cli.main(base + ["--lens", "tuned"]) == 2
    assert "--tuned-lens" in capsys.readouterr().err


def test_experiment_trains_and_reads_the_tuned_lens(tiny_llama_path, tmp_path, one_thread, capsys):
    """`analyses: tuned_lens` through `polyalign run`: a tune-lens step, then the lens with both views,
    whose tuned rows are those of `polyalign lens --lens both` on the step's own lens."""
    import csv
    import json

    import yaml

    from polyalign import cli
    from polyalign.analysis.lens import LensConfig, run_lens
    raw = {"name": "tl", "model": tiny_llama_path, "dtype": "fp32", "device": "cpu", "settings": [],
           "eval": {"tasks": ["snli"], "langs": ["en", "zh"], "limit": 3},
           "analyses": {"tuned_lens": {"task": "snli", "langs": ["zh"], "limit": 3,
                                       "train": {"steps": 2, "langs": "en,zh", "tokens_per_language": 400,
                                                 "tokens_per_step": 256}}},
           "report": {"bootstrap": 100}}
    (tmp_path / "tl.yaml").write_text(yaml.safe_dump(raw))
    run = tmp_path / "run"
    assert cli.main(["run", str(tmp_path / "tl.yaml"), "--output", str(run)]) == 0
    capsys.readouterr()
    steps = {s["kind"]: s for s in json.loads((run / "manifest.json").read_text())["steps"]}
    lens_dir, read = run / steps["tune_lens"]["dir"], run / steps["tuned_lens"]["dir"]
    assert (lens_dir / "lens.safetensors").is_file()
    ref = run_lens(LensConfig(model=tiny_llama_path, task="snli", langs="zh", limit=3, dtype="fp32", device="cpu",
                              progress=False, output=None, lens="both", tuned_lens=str(lens_dir)))
    rows = list(csv.DictReader((read / "lens.csv").open()))
    assert {r["model"] for r in rows} == {"base", "base-tuned"}
    for r, m in zip(rows, ref.rows):
        assert (r["model"], int(r["layer"]), r["measure"]) == (m["model"], m["layer"], m["measure"])
        assert float(r["mean"]) == pytest.approx(m["mean"], rel=1e-5, abs=1e-9)
    assert "base-tuned" in (run / "report.md").read_text()


def test_my_share_deals_every_sequence_once():
    seqs = [[0] * n for n in (5, 9, 2, 7, 7, 1, 3)]
    idx = [6, 0, 3, 1, 4, 2, 5]
    shares = [T.my_share(idx, seqs, 3, r) for r in range(3)]
    assert sorted(i for s in shares for i in s) == sorted(idx)
    # snake order by length: 9,7,7 | 5,3,2 | 1 -> rank 0 gets 9,2,1; rank 1 7,3; rank 2 7,5
    assert shares == [[1, 2, 5], [3, 6], [4, 0]]
    assert T.my_share(idx, seqs, 1, 0) == sorted(idx, key=lambda i: (-len(seqs[i]), i))


@pytest.mark.slow      # two processes: not in `make test-fast`
def test_two_cpu_processes_train_the_same_translators(tiny_llama_path, tmp_path, one_thread, monkeypatch):
    """`torchrun --nproc_per_node 2 -m polyalign tune-lens` (gloo on CPU) trains the translators one
    process trains on the same data, with one log written once; and two processes resume a run that
    one process began and was killed in."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    from test_distributed import _free_port
    launcher = Path(sys.executable).with_name("torchrun")
    if not launcher.exists():
        pytest.skip("torchrun is not installed beside this Python")
    T.tune_lens(_cfg(tiny_llama_path, tmp_path / "single"))

    def launch(out):
        args = ["tune-lens", "--model", tiny_llama_path, "--langs", "en,de,zh", "--tokens-per-language", "400",
                "--steps", "8", "--tokens-per-step", "300", "--save-every", "3", "--dtype", "fp32",
                "--device", "cpu", "--no-progress", "--output", str(out)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "CUDA_VISIBLE_DEVICES": ""}
        proc = subprocess.run([str(launcher), "--nproc_per_node", "2", "--master_port", str(_free_port()),
                               "-m", "polyalign", *args], capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.count("tune-lens: ") == 1, proc.stdout      # rank 0 alone reports

    def same_as_single(out):
        assert sorted(p.name for p in out.iterdir()) == ["lens.json", "lens.safetensors", "log.jsonl"]
        a, b = load_file(str(tmp_path / "single" / "lens.safetensors")), load_file(str(out / "lens.safetensors"))
        assert (b["weight"] != 0).any()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)
        # One log, each step once (a process that believed itself alone would have logged its own 8).
        want = [json.loads(x) for x in (tmp_path / "single" / "log.jsonl").read_text().splitlines()]
        got = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
        assert [r["step"] for r in got] == list(range(1, 9)) and [r["tokens"] for r in got] == [r["tokens"] for r in want]
        for g, w in zip(got, want):
            assert g["kl_bits"] == pytest.approx(w["kl_bits"], rel=1e-4, abs=1e-6)

    launch(tmp_path / "multi")
    same_as_single(tmp_path / "multi")

    # One process killed after step 5 (checkpoint at step 3); two processes resume it.
    real, calls = T.lens_loss_and_backward, []

    def dying(*a, **k):
        calls.append(1)
        if len(calls) > 5 * _batches_per_step(tiny_llama_path):
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(T, "lens_loss_and_backward", dying)
    with pytest.raises(KeyboardInterrupt):
        T.tune_lens(_cfg(tiny_llama_path, tmp_path / "resumed"))
    assert (tmp_path / "resumed" / "checkpoint.pt").is_file()
    assert (tmp_path / "resumed" / "log.jsonl").read_text().count("\n") == 5
    launch(tmp_path / "resumed")
    same_as_single(tmp_path / "resumed")
