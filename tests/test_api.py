"""The Python API (`import polyalign as pa`): cheap import, in-memory results equal to what the
command line writes, a loaded (or PEFT-wrapped) model equal to the same model by name, one-line
errors, and examples/python_api.py run on a tiny model."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from toydata import toy

import polyalign as pa
from polyalign import cli
from testdevice import DEVICE

ROOT = Path(__file__).resolve().parents[1]
COMMON = dict(dtype="fp32", device=DEVICE, progress=False)


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _samples_on_disk(out: Path, plan) -> list[dict]:
    """The samples files of a folder, concatenated in the run's plan order."""
    lines = []
    for task, mode, lang in plan:
        path = out / "samples" / task / mode / f"{lang}.jsonl"
        lines += [json.loads(x) for x in path.read_text("utf-8").splitlines()]
    return lines


@pytest.fixture(scope="module")
def toy_task(tmp_path_factory):
    return toy(tmp_path_factory.mktemp("api_toy"))


@pytest.fixture(scope="module")
def in_memory(tiny_llama_path, toy_task, one_thread):
    task, data = toy_task
    return pa.evaluate(tiny_llama_path, tasks=[task], data=data, langs=["en", "de"], labels=["english", "native"],
                       batch_tokens=160, **COMMON)


# --------------------------------------------------------------------------- import
def test_import_is_cheap_and_lazy():
    """`import polyalign` (which the CLI does) loads no torch; the names resolve when used."""
    code = ("import sys, polyalign as pa; names = dir(pa); assert 'evaluate' in names and 'logit_lens' in names; "
            "pa.PolyalignError; import polyalign.cli; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'numpy')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_subpackages_do_not_shadow_the_functions():
    import polyalign.analysis.geometry  # noqa: F401
    import polyalign.analysis.lens  # noqa: F401
    import polyalign.evaluation.evaluate  # noqa: F401
    import polyalign.reporting.report  # noqa: F401
    import polyalign.training.train  # noqa: F401
    for name in pa.__all__:
        assert getattr(pa, name) is not None, name
    for name in ("load_model", "load_task", "load_data", "evaluate", "prepare_pairs", "train", "logit_lens",
                 "geometry", "neurons", "report"):
        fn = getattr(pa, name)
        assert callable(fn) and not isinstance(fn, type(sys)), name
        assert fn.__doc__ and ">>>" in fn.__doc__, f"{name} has no example in its docstring"
    with pytest.raises(AttributeError):
        pa.no_such_name


# --------------------------------------------------------------------------- evaluate
def test_in_memory_equals_the_files_of_an_output_run(tmp_path, tiny_llama_path, toy_task, in_memory, capsys):
    task, data = toy_task
    out = tmp_path / "run"
    # The producer: the command line, writing results.json and the samples files.
    assert cli.main(["evaluate", "--model", tiny_llama_path, "--tasks", task, "--data", data, "--langs", "en,de",
                     "--labels", "english,native", "--batch-tokens", "160", "--output", str(out),
                     "--dtype", "fp32", "--device", DEVICE, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert f"results: {out / 'results.json'}" in printed and "toy_polarity" in printed
    on_disk = json.loads((out / "results.json").read_text("utf-8"))

    got = in_memory.to_dict()
    assert got["rows"] == on_disk["rows"] and got["averages"] == on_disk["averages"]
    assert set(got) == set(on_disk)
    assert {k: v for k, v in got["config"].items() if k != "output"} == \
        {k: v for k, v in on_disk["config"].items() if k != "output"}
    assert got["config"]["output"] is None
    plan = [("toy_polarity", mode, lang) for mode in ("english", "native") for lang in ("en", "de")]
    assert in_memory.samples == _samples_on_disk(out, plan)

    # Typed rows carry the same numbers; the result reads like the dict it replaces.
    assert [r.to_dict() for r in in_memory.rows] == on_disk["rows"]
    assert in_memory.rows[0].acc == on_disk["rows"][0]["acc"] and in_memory["rows"] == on_disk["rows"]
    assert [a.langs for a in in_memory.averages] == [a["langs"] for a in on_disk["averages"]]


def test_with_an_output_folder_the_result_is_results_json_and_resumes(tmp_path, tiny_llama_path, toy_task,
                                                                     in_memory):
    task, data = toy_task
    args = dict(tasks=task, data=data, langs="en,de", labels="english,native", batch_tokens=160, **COMMON)
    first = pa.evaluate(tiny_llama_path, output=tmp_path / "run", **args)
    assert first.to_dict() == json.loads((tmp_path / "run" / "results.json").read_text("utf-8"))
    assert first.samples == in_memory.samples
    again = pa.evaluate(tiny_llama_path, output=tmp_path / "run", **args)
    assert again.timing["items_scored"] == 0 and again.to_dict()["rows"] == first.to_dict()["rows"]
    assert again.samples == first.samples


def test_loaded_model_equals_the_model_by_name(tiny_llama_path, toy_task, in_memory):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    task, data = toy_task
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_path).to(DEVICE)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_path)
    model.train()                                    # scored in eval mode, given back in train mode
    got = pa.evaluate(model, tokenizer, tasks=[task], data=data, langs=["en", "de"], labels=["english", "native"],
                      batch_tokens=160, progress=False)
    assert model.training
    assert got.to_dict()["rows"] == in_memory.to_dict()["rows"]
    assert got.samples == in_memory.samples
    # ... and so does what load_model returns.
    lm = pa.load_model(tiny_llama_path, dtype="fp32", device=DEVICE, progress=False)
    via_lm = pa.evaluate(lm, tasks=[task], data=data, langs=["en", "de"], labels=["english", "native"],
                         batch_tokens=160, progress=False)
    assert via_lm.samples == in_memory.samples and via_lm.model["name"] == tiny_llama_path


def _peft_model(path: str):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(path)
    # init_lora_weights=False: B is random too, so that the adapter really changes the scores.
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                           init_lora_weights=False))


def test_peft_model_equals_its_saved_adapter(tmp_path, tiny_llama_path, toy_task, in_memory):
    from transformers import AutoTokenizer
    task, data = toy_task
    args = dict(tasks=[task], data=data, langs=["en", "de"], labels=["english"], batch_tokens=160, progress=False)
    peft_model = _peft_model(tiny_llama_path).to(DEVICE)
    got = pa.evaluate(peft_model, AutoTokenizer.from_pretrained(tiny_llama_path), **args)
    assert "PEFT" in got.model["adapter"]
    peft_model.save_pretrained(tmp_path / "adapter")
    by_folder = pa.evaluate(tiny_llama_path, adapter=tmp_path / "adapter", dtype="fp32", device=DEVICE, **args)
    assert [s["pred"] for s in got.samples] == [s["pred"] for s in by_folder.samples]
    for a, b in zip(got.samples, by_folder.samples):
        assert a["scores"] == pytest.approx(b["scores"], rel=1e-5, abs=1e-7)
    base = [s["scores"] for s in in_memory.samples if s["labels"] == "english"]
    assert any(a != pytest.approx(b, abs=1e-4) for a, b in zip([s["scores"] for s in got.samples], base))


def test_an_output_folder_knows_the_weights_of_a_loaded_model(tmp_path, tiny_llama_path, toy_task):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    task, data = toy_task
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_path)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_path)
    args = dict(tasks=[task], data=data, langs=["en"], limit=4, output=tmp_path / "run", progress=False)
    pa.evaluate(model, tokenizer, **args)
    assert pa.evaluate(model, tokenizer, **args).timing["items_scored"] == 0      # the same weights resume
    with torch.no_grad():
        model.lm_head.weight.add_(0.01)
    with pytest.raises(pa.PolyalignError, match="other settings .*weights"):
        pa.evaluate(model, tokenizer, **args)


def test_to_pandas(in_memory, monkeypatch):
    df = in_memory.to_pandas()
    assert list(df["acc"]) == [r.acc for r in in_memory.rows] and set(df.columns) >= {"task", "lang", "labels"}
    assert len(in_memory.to_pandas("samples")) == len(in_memory.samples) == 48
    monkeypatch.setitem(sys.modules, "pandas", None)                 # as if pandas were not installed
    with pytest.raises(pa.PolyalignError, match="pip install pandas"):
        in_memory.to_pandas()


@pytest.mark.parametrize("call, message", [
    (lambda m: pa.evaluate(m, langs=["en", "xx"]), "xx"),
    (lambda m: pa.evaluate(m, labels=["english", "nativ"]), "unknown label mode 'nativ'"),
    (lambda m: pa.evaluate(m, scoring="vibes"), "unknown scoring rule 'vibes'"),
    (lambda m: pa.evaluate(m, tasks=["no_such_task"]), "no_such_task"),
    (lambda m: pa.evaluate(m, limit=0), "positive"),
    (lambda m: pa.evaluate(m, "a tokenizer"), "tokenizer goes with a loaded model"),
    (lambda m: pa.evaluate(object()), "loaded transformers model"),
    (lambda m: pa.logit_lens(m, langs=["zh"], labels="nativ"), "unknown label mode"),
    (lambda m: pa.geometry(m, langs=["en"]), "at least two"),
    (lambda m: pa.train("data", "out", model=m, lrr=1e-4), "did you mean 'lr'"),
    (lambda m: pa.load_data("amazon_polarity", ["en", "xx"]), "xx"),
])
def test_bad_input_is_one_line_before_any_model_loads(tiny_llama_path, monkeypatch, call, message):
    import polyalign.models

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(polyalign.models, "load_model", no_load)
    with pytest.raises(pa.PolyalignError) as e:
        call(tiny_llama_path)
    assert message in str(e.value) and "\n" not in str(e.value)


# --------------------------------------------------------------------------- lens and geometry
LENS = dict(task="amazon_polarity", langs=["zh", "de"], limit=4, keep_overlapping=True, batch_tokens=256)


def test_lens_in_memory_equals_an_output_run_and_draws_a_figure(tmp_path, tiny_llama_path, one_thread):
    import csv

    from matplotlib.figure import Figure
    from transformers import AutoModelForCausalLM, AutoTokenizer
    lens = pa.logit_lens(tiny_llama_path, **LENS, **COMMON)
    assert lens.output is None and lens.summary["figures"] == []
    written = pa.logit_lens(tiny_llama_path, output=tmp_path / "lens", **LENS, **COMMON)
    with open(tmp_path / "lens" / "lens.csv", encoding="utf-8") as f:
        on_disk = list(csv.DictReader(f))
    assert len(on_disk) == len(lens.rows) > 0
    for mine, theirs in zip(lens.rows, on_disk):
        assert [mine["model"], mine["lang"], str(mine["layer"]), mine["measure"]] == \
            [theirs["model"], theirs["lang"], theirs["layer"], theirs["measure"]]
        assert float(theirs["mean"]) == pytest.approx(mine["mean"], rel=1e-5)
    assert written["reading"] == lens["reading"]

    # A loaded model gives the same per-sample arrays as the same model by name.
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_path)
    loaded = pa.logit_lens(model, AutoTokenizer.from_pretrained(tiny_llama_path), **LENS, progress=False)
    for lang in LENS["langs"]:
        np.testing.assert_allclose(loaded.samples["base"][lang]["target_answer"],
                                   lens.samples["base"][lang]["target_answer"], rtol=1e-6, atol=1e-9)

    fig = lens.figure("zh")
    assert isinstance(fig, Figure) and len(fig.axes) >= 2
    assert len(lens.figure().axes) == 2                           # one panel per language
    with pytest.raises(pa.PolyalignError, match="no lens results for 'sw'"):
        lens.figure("sw")


def test_geometry_in_memory_equals_an_output_run(tmp_path, tiny_llama_path, one_thread):
    import csv
    args = dict(task="amazon_polarity", langs=["en", "de", "sw"], limit=6, batch_tokens=256, **COMMON)
    geo = pa.geometry(tiny_llama_path, **args)
    assert geo.output is None
    pa.geometry(tiny_llama_path, output=tmp_path / "geo", **args)
    with open(tmp_path / "geo" / "alignment.csv", encoding="utf-8") as f:
        on_disk = list(csv.DictReader(f))
    assert len(on_disk) == len(geo.alignment) > 0
    for mine, theirs in zip(geo.alignment, on_disk):
        assert (mine["lang"], str(mine["layer"])) == (theirs["lang"], theirs["layer"])
        assert float(theirs["retrieval_acc"]) == pytest.approx(mine["retrieval_acc"], rel=1e-5)
    summary = json.loads((tmp_path / "geo" / "summary.json").read_text("utf-8"))
    assert summary["per_layer"] == json.loads(json.dumps(geo["per_layer"]))
    assert geo.states["base"]["en"].shape[0] == 6


# --------------------------------------------------------------------------- the example
def test_the_example_session_runs_on_a_tiny_model(tmp_path, tiny_llama_path):
    figure = tmp_path / "lens.png"
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "python_api.py"), "--model", tiny_llama_path,
                           "--langs", "en,de", "--lens-langs", "zh", "--limit", "4", "--keep-overlapping",
                           "--figure", str(figure), "--no-progress"],
                          capture_output=True, text=True, env=_env(), timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    for lang in ("en", "de"):
        for mode in ("english", "native"):
            assert any(line.split()[1:3] == [mode, lang] for line in lines if line.startswith("amazon_polarity")), \
                (mode, lang, proc.stdout)
    assert any(line.startswith("average amazon_polarity/english over all") for line in lines)
    assert any(line.startswith("lens zh: n=4") for line in lines), proc.stdout
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lens.png"]     # in memory: nothing else written


@pytest.mark.slow
def test_in_memory_under_two_processes_gathers_every_sample(tmp_path, tiny_llama_path, toy_task, in_memory):
    """torchrun, two CPU processes, no output folder: rank 0 returns every item, each scored once."""
    import socket
    launcher = Path(sys.executable).with_name("torchrun")
    if not launcher.exists():
        pytest.skip("torchrun is not installed beside this Python")
    task, data = toy_task
    script = tmp_path / "session.py"
    script.write_text(
        "import json, sys, polyalign as pa\n"
        f"r = pa.evaluate({tiny_llama_path!r}, tasks=[{task!r}], data={data!r}, langs=['en', 'de'],\n"
        "                labels=['english', 'native'], batch_tokens=160, dtype='fp32', device='cpu', progress=False)\n"
        "if r is not None:\n"
        f"    json.dump({{'rows': r.to_dict()['rows'], 'samples': r.samples, 'scored': r.timing['items_scored']}},\n"
        f"              open({str(tmp_path / 'out.json')!r}, 'w'))\n", "utf-8")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([str(launcher), "--nproc_per_node", "2", "--master_port", str(port), str(script)],
                          capture_output=True, text=True, env={**_env(), "CUDA_VISIBLE_DEVICES": ""}, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads((tmp_path / "out.json").read_text("utf-8"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json", "session.py"]   # nothing else written
    assert 0 < got["scored"] < 48                   # the work was shared
    assert [(r["lang"], r["labels"], r["n"], r["acc"]) for r in got["rows"]] == \
        [(r.lang, r.labels, r.n, r.acc) for r in in_memory.rows]
    assert [(s["id"], s["lang"], s["labels"], s["pred"]) for s in got["samples"]] == \
        [(s["id"], s["lang"], s["labels"], s["pred"]) for s in in_memory.samples]
    for a, b in zip(got["samples"], in_memory.samples):
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-5)
