"""`polyalign train`: target-only loss, the fast loss path, learning, artefacts, resume, DDP, bad input."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import requires_gemma, write_jsonl

from polyalign import cli
from polyalign.training import train as T
from polyalign.errors import PolyalignError
from polyalign.store import read_jsonl

WORDS = "red blue green small big old dog cat bird horse runs sleeps eats jumps".split()
INSTR = "\nTranslate the input from German to English:\n"
FAST = ["threads=1"]     # tiny models run fastest on one thread (and the test machine may be shared)


pytestmark = pytest.mark.usefixtures("one_thread")


def _pairs(n: int, offset: int = 0) -> list[dict]:
    out = []
    for i in range(offset, offset + n):
        a, b, c = WORDS[i % 14], WORDS[(i * 5 + 3) % 14], WORDS[(i * 3 + 1) % 14]
        out.append({"id": f"de-{i}", "source": "de", "target": "en",
                    "input": f"Satz: der {a} {b} {c}.\nAntwort: \"{INSTR}", "output": f"Sentence: the {a} {b} {c}.\nAnswer: \""})
    return out


@pytest.fixture
def data(tmp_path) -> str:
    folder = tmp_path / "data"
    write_jsonl(folder / "train.jsonl", _pairs(40))
    write_jsonl(folder / "val.jsonl", _pairs(8, offset=100))
    return str(folder)


def _cfg(model, data, out, *overrides, **kw) -> T.TrainConfig:
    return T.TrainConfig(model=model, data=data, output=str(out), progress=False,
                         overrides=[*FAST, *overrides], **kw)


# ----------------------------------------------------------------------------- config
def test_config_layers_and_unknown_keys(tmp_path):
    hp = T.resolve_config(T.TrainConfig())
    assert (hp["lora_r"], hp["lora_alpha"], hp["lora_dropout"], hp["lora_target"]) == (8, 16, 0.0, ["q_proj", "v_proj"])
    assert (hp["lr"], hp["scheduler"], hp["warmup_ratio"], hp["epochs"], hp["batch_size"], hp["cutoff"]) == \
        (5e-5, "cosine", 0.1, 3, 16, 2048)
    assert set(T.defaults()) <= {f for f in T.TrainConfig.__dataclass_fields__}
    f = tmp_path / "c.yaml"
    f.write_text("lr: 1.0e-4\nepochs: 2\nlora_target: q_proj,k_proj\n")
    hp = T.resolve_config(T.TrainConfig(config=str(f), epochs=5, overrides=["epochs=1", "max_steps=20", "chat_template=true"]))
    assert (hp["lr"], hp["epochs"], hp["max_steps"], hp["chat_template"], hp["lora_target"]) == \
        (1e-4, 1, 20, True, ["q_proj", "k_proj"])
    with pytest.raises(PolyalignError, match="unknown setting 'lrr' in the command line; did you mean 'lr'"):
        T.resolve_config(T.TrainConfig(overrides=["lrr=1"]))
    f.write_text("micro_bach_size: 2\n")
    with pytest.raises(PolyalignError, match="did you mean 'micro_batch_size'"):
        T.resolve_config(T.TrainConfig(config=str(f)))
    with pytest.raises(PolyalignError, match="setting epochs: expected a number"):
        T.resolve_config(T.TrainConfig(overrides=["epochs=three"]))
    with pytest.raises(PolyalignError, match="scheduler must be one of"):
        T.resolve_config(T.TrainConfig(overrides=["scheduler=step"]))


# ----------------------------------------------------------------------------- masking
def test_loss_covers_only_the_target_tokens(tiny_tokenizer):
    import torch
    inp, out = _pairs(1)[0]["input"], _pairs(1)[0]["output"]
    ids, start, cut = T.encode_pair(tiny_tokenizer, inp, out, 2048)
    assert not cut and ids[0] == tiny_tokenizer.bos_token_id and ids[-1] == tiny_tokenizer.eos_token_id
    assert tiny_tokenizer.decode(ids[:start], skip_special_tokens=True) == inp
    assert tiny_tokenizer.decode(ids[start:]) == out + "<eos>"
    _, rows, cols, targets = T.collate([T.Example(ids, start), T.Example(ids[:start + 3], start)], 0, "cpu")
    # Every predicted token is a target token, predicted from the position just before it.
    assert tiny_tokenizer.decode(targets[:len(ids) - start].tolist()) == out + "<eos>"
    assert tiny_tokenizer.decode(targets[len(ids) - start:].tolist()) == tiny_tokenizer.decode(ids[start:start + 3])
    assert int(cols.min()) == start - 1 and rows.tolist().count(1) == 3
    assert torch.equal(torch.tensor(ids)[cols[:len(ids) - start] + 1], targets[:len(ids) - start])


def test_chat_template_masks_the_prompt(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = ("{% for m in messages %}{{ '<' + m['role'] + '>' + m['content'] + '</s>' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ '<assistant>' }}{% endif %}")
    ids, start, _ = T.encode_pair(tok, "Hallo Welt", "Hello world", 2048, chat_template=True)
    assert tok.decode(ids[:start]) == "<user>Hallo Welt</s><assistant>"
    assert tok.decode(ids[start:]) == "Hello world</s>"
    with pytest.raises(PolyalignError, match="no chat template"):
        T.encode_pair(tiny_tokenizer, "a", "b", 2048, chat_template=True)


def test_truncation_keeps_the_target_when_it_fits(tiny_tokenizer):
    ids, start, cut = T.encode_pair(tiny_tokenizer, "word " * 300, "short answer", 64)
    assert cut and len(ids) == 64 and tiny_tokenizer.decode(ids[start:]) == "short answer<eos>"
    ids, start, cut = T.encode_pair(tiny_tokenizer, "word " * 300, "long " * 300, 64)
    assert cut and len(ids) == 64 and 0 < start < 64


def test_fast_loss_equals_the_models_own_loss(tiny_model_path, tiny_tokenizer):
    """Decoder + chunked head at target positions == the model's loss with labels -100 on the input."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    exs = [T.Example(*T.encode_pair(tiny_tokenizer, p["input"], p["output"], 2048)[:2]) for p in _pairs(3)]
    exs[1] = T.Example(exs[1].ids[:-4], exs[1].start)           # rows of different lengths
    batch = T.collate(exs, tiny_tokenizer.pad_token_id, "cpu")
    fast = T.make_loss_model(peft, chunk=7)(*batch)              # several chunks
    total, ntok = 0.0, 0
    for e in exs:
        labels = [-100] * e.start + e.ids[e.start:]
        out = peft(input_ids=torch.tensor([e.ids]), labels=torch.tensor([labels]))
        total += float(out.loss.detach()) * e.n_target
        ntok += e.n_target
    assert float(fast) == pytest.approx(total, rel=1e-5)
    # The gradients agree too.
    fast.backward()
    g_fast = {n: p.grad.clone() for n, p in peft.named_parameters() if p.requires_grad and p.grad is not None}
    peft.zero_grad()
    ref = sum(peft(input_ids=torch.tensor([e.ids]), labels=torch.tensor([[-100] * e.start + e.ids[e.start:]])).loss
              * e.n_target for e in exs)
    ref.backward()
    for n, p in peft.named_parameters():
        if n in g_fast:
            scale = float(p.grad.abs().max()) + 1e-6
            assert float((g_fast[n] - p.grad).abs().max()) < 1e-3 * scale, n


@pytest.mark.parametrize("rows", [2, 3, 10 ** 6])      # a few rows at a time (CPU), or whole chunks (as on a GPU)
def test_chunked_ce_paths_agree(rows, monkeypatch):
    """The hand-written softmax gradient (linear heads) == autograd (any other head) == a plain CE."""
    import torch
    import torch.nn.functional as F

    monkeypatch.setattr(T, "CE_ROWS", rows)

    torch.manual_seed(0)
    h, t = torch.randn(10, 16), torch.randint(0, 50, (10,))
    lin = torch.nn.Linear(16, 50, bias=False).requires_grad_(False)
    other = torch.nn.Sequential(lin)                       # not a Linear: the autograd path
    for cap in (None, 5.0):
        hh = h.clone().requires_grad_(True)
        z = lin(hh)
        z = torch.tanh(z / cap) * cap if cap else z
        ref = F.cross_entropy(z, t, reduction="sum")
        (g_ref,) = torch.autograd.grad(ref, hh)
        for head, chunk in ((lin, 3), (other, 4), (lin, 100)):
            loss, g = T._chunked_ce_forward(h, t, head, cap, chunk, True)
            assert float(loss) == pytest.approx(float(ref), rel=1e-5)
            assert torch.allclose(g, g_ref, atol=1e-5)
            assert float(T._chunked_ce_forward(h, t, head, cap, chunk, False)[0]) == pytest.approx(float(ref), rel=1e-5)


def test_plan_step_deals_every_example_once():
    exs = [T.Example(list(range(n)), 1) for n in (5, 9, 3, 12, 7, 7, 2, 10, 4, 6, 8)]
    idx = list(range(11))
    for world in (1, 2, 4):
        n_micro = -(-(-(-len(idx) // world)) // 2)
        plans = [T.plan_step(idx, exs, world, r, 2, n_micro) for r in range(world)]
        assert all(len(p) == n_micro for p in plans)
        real = sorted(i for p in plans for members, w in p if w for i in members)
        assert real == idx
        for p in plans:
            for members, _ in p:
                lens = [len(exs[i].ids) for i in members]
                assert lens == sorted(lens, reverse=True)          # length-sorted micro-batches


# ----------------------------------------------------------------------------- training
def test_loss_falls_and_artefacts(tmp_path, tiny_llama_path, data):
    import torch

    out = tmp_path / "run"
    args = ("dtype=fp32", "max_steps=12", "lr=1e-2", "batch_size=8", "logging_steps=2", "eval_steps=6", "warmup_ratio=0")
    s = T.train(_cfg(tiny_llama_path, data, out, *args, merge=True))
    log = read_jsonl(out / "train_log.jsonl")
    train_recs = [r for r in log if "loss" in r]
    evals = [r for r in log if "eval_loss" in r]
    assert [r["step"] for r in train_recs] == [2, 4, 6, 8, 10, 12] and [r["step"] for r in evals] == [6, 12]
    assert set(train_recs[0]) >= {"step", "epoch", "loss", "lr", "tokens"} and set(evals[0]) == {"step", "epoch", "eval_loss"}
    assert train_recs[-1]["loss"] < train_recs[0]["loss"] - 0.5          # it learns
    assert train_recs[-1]["tokens"] == s["train_tokens"] and train_recs[-1]["epoch"] == pytest.approx(2.4)
    assert s["final_eval_loss"] == evals[-1]["eval_loss"] and s["truncated"] == 0 and s["fast_loss"]
    assert s["tokens_per_s"] > 0 and s["steps"] == 12 and s["examples"] == 40
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    conf = yaml.safe_load((out / "config.yaml").read_text())
    assert conf["lr"] == 0.01 and conf["lora_r"] == 8 and conf["data_hash"]
    assert list((out / "checkpoints").iterdir())
    # The adapter loads back through polyalign.models and the merged model gives the same logits.
    from polyalign.models import load_model
    with_adapter = load_model(tiny_llama_path, "fp32", "cpu", adapter=str(out))
    merged = load_model(str(out / "merged"), "fp32", "cpu")
    base = load_model(tiny_llama_path, "fp32", "cpu")
    ids = torch.tensor([T.encode_pair(base.tokenizer, "a b c", "d", 64)[0]])
    with torch.no_grad():
        a, m, b = (x.model(input_ids=ids).logits for x in (with_adapter, merged, base))
    assert torch.allclose(a, m, atol=1e-4) and not torch.allclose(a, b, atol=1e-3)
    # A rerun of the finished run does nothing and returns the same summary.
    assert T.train(_cfg(tiny_llama_path, data, out, *args))["final_eval_loss"] == s["final_eval_loss"]


def test_resume_gives_the_same_adapter(tmp_path, tiny_llama_path, data, monkeypatch):
    from safetensors.torch import load_file

    args = ("dtype=fp32", "max_steps=7", "batch_size=8", "micro_batch_size=3", "lr=5e-3", "save_steps=2",
            "logging_steps=1", "eval_steps=3")
    ref = T.train(_cfg(tiny_llama_path, data, tmp_path / "ref", *args))

    real, calls = T.plan_step, []

    def dies_in_step_6(*a, **kw):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt            # killed inside step 6; the last checkpoint is step 4
        return real(*a, **kw)

    monkeypatch.setattr(T, "plan_step", dies_in_step_6)
    with pytest.raises(KeyboardInterrupt):
        T.train(_cfg(tiny_llama_path, data, tmp_path / "cut", *args))
    monkeypatch.setattr(T, "plan_step", real)
    assert [p.name for p in T._checkpoints(tmp_path / "cut")] == ["step-0000002", "step-0000004"]
    assert not (tmp_path / "cut" / "summary.json").exists()
    with pytest.raises(PolyalignError, match="pass --resume"):
        T.train(_cfg(tiny_llama_path, data, tmp_path / "cut", *args))
    res = T.train(_cfg(tiny_llama_path, data, tmp_path / "cut", *args, resume=True))
    assert res["resumed_from"] == 4
    a = load_file(str(tmp_path / "ref" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max() < 1e-6, k
    ref_log, cut_log = read_jsonl(tmp_path / "ref" / "train_log.jsonl"), read_jsonl(tmp_path / "cut" / "train_log.jsonl")
    assert len(ref_log) == len(cut_log) == 10                        # 7 train + 3 eval records, none twice
    for r, c in zip(ref_log, cut_log):
        r.pop("seconds", None), c.pop("seconds", None)
        assert c == pytest.approx(r, rel=1e-6)
    assert res["final_eval_loss"] == pytest.approx(ref["final_eval_loss"], abs=1e-6)


def test_a_finished_run_whose_adapter_went_missing_saves_it_again(tmp_path, tiny_llama_path, data):
    """Before: summary.json alone made the run 'done', so `polyalign run` could never rebuild the adapter."""
    from safetensors.torch import load_file

    args = ("dtype=fp32", "max_steps=4", "batch_size=8", "micro_batch_size=4", "save_steps=2", "eval_steps=2")
    out = tmp_path / "run"
    T.train(_cfg(tiny_llama_path, data, out, *args))
    before = load_file(str(out / "adapter_model.safetensors"))
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (out / name).unlink()
    res = T.train(_cfg(tiny_llama_path, data, out, *args, resume=True))
    assert res["resumed_from"] == 2 and (out / "adapter_config.json").is_file()
    after = load_file(str(out / "adapter_model.safetensors"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_same_adapter(tmp_path, tiny_llama_path, data):
    """A real kill -9 in the middle of a run (whatever it was writing), then --resume."""
    import signal
    import time

    from safetensors.torch import load_file

    args = ["dtype=fp32", "max_steps=40", "batch_size=4", "micro_batch_size=2", "lr=5e-3", "save_steps=3",
            "logging_steps=1", "eval_steps=10", "threads=1", "device=cpu"]   # bitwise resume: one device
    T.train(T.TrainConfig(model=tiny_llama_path, data=data, output=str(tmp_path / "ref"), progress=False,
                          overrides=args))
    cmd = ["train", "--model", tiny_llama_path, "--data", data, "--output", str(tmp_path / "cut"), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.Popen([sys.executable, "-m", "polyalign", *cmd, *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = tmp_path / "cut" / "checkpoints" / "step-0000003"
    deadline = time.time() + 120
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if (tmp_path / "cut" / "summary.json").exists():
        pytest.skip("the run finished before the kill")
    assert cli.main([*cmd, "--resume", *args]) == 0
    a = load_file(str(tmp_path / "ref" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "adapter_model.safetensors"))
    for k in a:
        assert (a[k] - b[k]).abs().max() < 1e-6, k
    steps = [r["step"] for r in read_jsonl(tmp_path / "cut" / "train_log.jsonl") if "loss" in r]
    assert steps == list(range(1, 41))                                 # no step logged twice or lost


def _run(argv, capsys) -> tuple[int, str]:
    capsys.readouterr()
    rc = cli.main(argv)
    return rc, capsys.readouterr().err.strip()


def test_bad_input_one_line_exit_2(tmp_path, tiny_llama_path, data, capsys):
    base = ["train", "--model", tiny_llama_path, "--data", data, "--no-progress"]   # key=value settings go last
    rc, err = _run(base + ["--output", str(tmp_path / "a"), "threads=1", "lrr=1e-4"], capsys)
    assert rc == 2 and "unknown setting 'lrr'" in err and "did you mean 'lr'" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "a").exists()
    rc, err = _run(["train", "--data", str(tmp_path / "none"), "--output", str(tmp_path / "a")], capsys)
    assert rc == 2 and "training data not found" in err
    bad = tmp_path / "bad.jsonl"
    write_jsonl(bad, [{"input": "x", "output": ""}])
    rc, err = _run(["train", "--data", str(bad), "--output", str(tmp_path / "a")], capsys)
    assert rc == 2 and "record 0 has an empty input or output" in err
    # A finished run is not damaged by a different one pointed at the same folder.
    assert _run(base + ["--output", str(tmp_path / "b"), "threads=1", "max_steps=1", "batch_size=4"], capsys)[0] == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "b").iterdir() if p.is_file()}
    rc, err = _run(base + ["--output", str(tmp_path / "b"), "threads=1", "max_steps=1", "batch_size=4", "lr=1e-3"], capsys)
    assert rc == 2 and "already holds a different run (lr: 5e-05 there, 0.001 now)" in err
    assert {p.name: p.read_bytes() for p in (tmp_path / "b").iterdir() if p.is_file()} == before
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "x.txt").write_text("mine")
    rc, err = _run(base + ["--output", str(tmp_path / "c"), "threads=1", "max_steps=1"], capsys)
    assert rc == 2 and "not empty" in err and (tmp_path / "c" / "x.txt").read_text() == "mine"


@pytest.mark.slow
def test_two_cpu_processes_match_one(tmp_path, tiny_llama_path, data):
    """torchrun with 2 CPU processes (gloo DDP) ends with the same adapter as one process."""
    from safetensors.torch import load_file

    launcher = Path(sys.executable).with_name("torchrun")
    if not launcher.exists():
        pytest.skip("torchrun is not installed beside this Python")
    args = ["dtype=fp32", "max_steps=3", "batch_size=8", "micro_batch_size=3", "lr=5e-3", "logging_steps=1", "threads=1"]
    common = ["train", "--model", tiny_llama_path, "--data", data, "--no-progress"]
    assert cli.main([*common, "--output", str(tmp_path / "one"), *args]) == 0
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([str(launcher), "--nproc_per_node", "2", "--master_port", str(port), "-m", "polyalign",
                           *common, "--output", str(tmp_path / "two"), *args], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("train: done") == 1                     # rank 0 alone reports
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["world_size"] == 2
    a = load_file(str(tmp_path / "one" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "adapter_model.safetensors"))
    for k in a:
        assert (a[k] - b[k]).abs().max() < 1e-5, k
    one, two = read_jsonl(tmp_path / "one" / "train_log.jsonl"), read_jsonl(tmp_path / "two" / "train_log.jsonl")
    assert [r.get("loss", r.get("eval_loss")) for r in one] == pytest.approx([r.get("loss", r.get("eval_loss")) for r in two], rel=1e-5)


@pytest.mark.gemma
@requires_gemma
def test_gemma_trains_on_shared_snli(tmp_path, shared_data):
    from polyalign.training.prepare import PrepareConfig, prepare

    prepare(PrepareConfig(task="snli", sources="zh,de", target="en", per_language=24, val_size=8,
                          data=str(shared_data), output=str(tmp_path / "data"), progress=False))
    s = T.train(T.TrainConfig(data=str(tmp_path / "data"), output=str(tmp_path / "gemma"), progress=False,
                              overrides=["max_steps=3", "batch_size=8", "lr=1e-4", "logging_steps=1"]))
    log = read_jsonl(tmp_path / "gemma" / "train_log.jsonl")
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3]
    assert s["fast_loss"] and 0 < s["final_eval_loss"] < 5 and s["dtype"] in ("bf16", "fp32")
    assert (tmp_path / "gemma" / "adapter_model.safetensors").exists()
