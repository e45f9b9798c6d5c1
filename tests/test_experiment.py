"""`polyalign run`: the experiment format, validation, the step plan and its cache, resume and errors.

The step commands are faked here (they write the artefacts the real ones write), except in the
last test, which runs the real evaluator on a tiny model, so these tests need none of prepare,
train, lens or geometry to exist.
"""
from __future__ import annotations

import csv
import errno
import json
import sys
from importlib.resources import files
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from polyalign.experiment import run as X
from polyalign.errors import PolyalignError

ROOT = Path(__file__).resolve().parents[1]
REAL_CALL = X.run_command
LANGS3 = ["en", "de", "zh"]


def base_raw(**over) -> dict:
    raw = {
        "name": "t",
        "model": "tiny",
        # Trained on Amazon-review questions (the bundled pool), tested on SNLI: the cross-task layout.
        "settings": [{"sources": ["zh", "de"], "target": "en", "task": "amazon_polarity", "per_language": 4},
                     {"name": "sw-en", "sources": ["sw"], "task": "amazon_polarity", "per_language": 4}],
        "train": {"epochs": 1},
        "eval": {"tasks": ["snli"], "langs": LANGS3, "labels": ["english"], "limit": 3},
        "analyses": {"lens": {"task": "snli", "langs": ["zh"], "limit": 3, "settings": ["zhde-en"]},
                     "geometry": {"task": "snli", "langs": ["en", "de"], "limit": 3}},
        "report": {"bootstrap": 200},
    }
    raw.update(over)
    return raw


def validate(raw, **kw):
    kw.setdefault("check_data", False)
    return X.validate(raw, **kw)


# ----------------------------------------------------------------------------- format and validation
def test_valid_file_and_defaults():
    exp = validate(base_raw())
    assert exp.name == "t" and exp.output == "runs/t"
    assert [s.name for s in exp.settings] == ["zhde-en", "sw-en"]
    assert exp.settings[0].label == "zh/de ⇒ en" and exp.settings[0].seen == ["zh", "de", "en"]
    assert exp.eval["scoring"] == "paper" and exp.lens["labels"] == "native"
    assert exp.geometry["settings"] == ["zhde-en", "sw-en"]      # default: every setting


@pytest.mark.parametrize("raw, key, hint", [
    ({"evall": {}}, "evall", "eval"),
    ({"eval": {"tasks": ["snli"], "limt": 3}}, "eval.limt", "limit"),
    ({"settings": [{"sorces": ["zh"]}]}, "settings.0.sorces", "sources"),
    ({"analyses": {"lense": {}}}, "analyses.lense", "lens"),
    ({"analyses": {"lens": {"langz": ["zh"]}}}, "analyses.lens.langz", "langs"),
    ({"report": {"bootstraps": 10}}, "report.bootstraps", "bootstrap"),
])
def test_unknown_key_names_key_and_nearest(raw, key, hint):
    full = base_raw()
    for k, v in raw.items():
        full[k] = v
    with pytest.raises(PolyalignError) as e:
        validate(full)
    msg = str(e.value)
    assert f"unknown key {key}" in msg and f"did you mean {hint!r}" in msg and "\n" not in msg


def _task_file(tmp_path: Path, langs: list[str]) -> str:
    """A copy of the bundled snli task with only some languages."""
    raw = yaml.safe_load(files("polyalign").joinpath("resources/tasks/snli.yaml").read_text("utf-8"))
    raw["languages"] = {k: v for k, v in raw["languages"].items() if str(k) in langs}
    path = tmp_path / "small_snli.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True), "utf-8")
    return str(path)


def test_setting_language_the_task_lacks(tmp_path):
    task = _task_file(tmp_path, ["en", "de"])
    raw = base_raw(settings=[{"sources": ["zh", "de"], "task": task, "data": str(tmp_path)}])
    with pytest.raises(PolyalignError, match=r"setting zhde-en: task 'snli' has no prompt data for zh"):
        validate(raw)


def test_eval_language_the_task_lacks(tmp_path):
    task = _task_file(tmp_path, ["en", "de"])
    raw = base_raw(eval={"tasks": [task], "langs": ["en", "sw"], "data": str(tmp_path)}, settings=[], analyses={})
    with pytest.raises(PolyalignError, match=r"eval: task 'snli' has no prompt data for sw"):
        validate(raw)


@pytest.mark.parametrize("setting, pattern", [
    ({"sources": ["zz"]}, r"unknown language 'zz'"),
    ({"sources": ["en"], "target": "en"}, r"target en is also a source"),
    ({"sources": []}, r"expected a list of language codes"),
    ({"sources": ["zh"], "task": "nope"}, r"unknown task 'nope'"),
    ({"sources": ["zh"], "per_language": -1}, r"positive whole number"),
    ({"sources": ["zh"], "task": "snli", "data": "/does/not/exist"}, r"question data path not found"),
])
def test_bad_settings(setting, pattern):
    with pytest.raises(PolyalignError, match=pattern):
        validate(base_raw(settings=[setting], analyses={}), check_data=True)


def test_bundled_question_pool_must_cover_the_setting():
    # The bundled SNLI task has no bundled question pool: say so before any work starts.
    pool = files("polyalign").joinpath("resources/questions/snli")
    if pool.is_dir():
        pytest.skip("a bundled snli question pool exists now")
    raw = base_raw()
    raw["settings"][0]["task"] = "snli"
    with pytest.raises(PolyalignError, match=r"setting zhde-en: the bundled question pool of snli lacks"):
        validate(raw, check_data=True)
    validate(base_raw(), check_data=True)   # the Amazon pool has zh, de, sw and en


def test_other_bad_input():
    with pytest.raises(PolyalignError, match="no model"):
        validate({k: v for k, v in base_raw().items() if k != "model"}, check_data=False)
    with pytest.raises(PolyalignError, match="two settings are named"):
        validate(base_raw(settings=[{"sources": ["zh"], "task": "snli"}] * 2, analyses={}), check_data=False)
    with pytest.raises(PolyalignError, match=r"analyses.lens.settings: no setting named 'zhde'.*'zhde-en'"):
        raw = base_raw()
        raw["analyses"]["lens"]["settings"] = ["zhde"]
        validate(raw, check_data=False)
    with pytest.raises(PolyalignError, match="eval.labels: unknown label mode 'nativ'.*'native'"):
        validate(base_raw(eval={"tasks": ["snli"], "labels": ["nativ"]}), check_data=False)


def test_norwegian_survives_yaml():
    raw = yaml.safe_load("eval: {tasks: [snli], langs: [en, no]}")
    exp = validate(base_raw(eval=raw["eval"], settings=[], analyses={}))
    assert exp.eval["langs"] == ["en", "no"]


# ----------------------------------------------------------------------------- overrides
def test_overrides(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(base_raw()), "utf-8")
    exp = X.load_experiment(str(path), ["eval.limit=5", "settings.zhde-en.per_language=7", "settings.1.target=zh",
                                        "train.lr=1e-4", "eval.langs=[en, de]", "output=elsewhere"])
    assert exp.eval["limit"] == 5 and exp.eval["langs"] == ["en", "de"]
    assert exp.settings[0].per_language == 7 and exp.settings[1].target == "zh"
    assert exp.train == {"epochs": 1, "lr": 1e-4} and exp.output == "elsewhere"
    with pytest.raises(PolyalignError, match=r"unknown key eval.limi.*'limit'"):
        X.load_experiment(str(path), ["eval.limi=5"])
    with pytest.raises(PolyalignError, match=r"no item named 'zhd'.*'zhde-en'"):
        X.load_experiment(str(path), ["settings.zhd.per_language=5"])
    with pytest.raises(PolyalignError, match="not key=value"):
        X.load_experiment(str(path), ["eval.limit"])


def test_bad_yaml_is_one_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: [unclosed\nmodel: x\n", "utf-8")
    with pytest.raises(PolyalignError) as e:
        X.load_experiment(str(path))
    assert "not valid YAML" in str(e.value) and "\n" not in str(e.value)


# ----------------------------------------------------------------------------- examples and the demo
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def test_there_are_examples():
    assert len(EXAMPLES) >= 5


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_examples_validate(path):
    text = path.read_text("utf-8")
    assert "hardware" in yaml.safe_load(text), "each example states the hardware it expects"
    exp = X.load_experiment(str(path), check_data=False)
    steps = X.plan(exp)
    assert steps and len({s.key for s in steps}) == len(steps)
    # Each step carries its command's config, built (and checked) from the file's options.
    from polyalign.cli import COMMANDS
    for st in steps:
        cls, _ = COMMANDS[X.COMMAND_OF[st.kind]].load()
        assert isinstance(st.config, cls), st.label


def test_demo_validates():
    bundled = files("polyalign").joinpath("resources/data/amazon_polarity/zh.jsonl")
    exp = X.load_experiment(demo=True, check_data=bundled.is_file())
    assert exp.models[0].name == "gemma-3-270m" and exp.output == "runs/demo"
    assert [s.label for s in exp.settings] == ["zh/de ⇒ en"]
    assert len(exp.eval["langs"]) == 20 and exp.lens and exp.geometry
    kinds = [s.kind for s in X.plan(exp)]
    assert kinds == ["eval", "prepare", "train", "eval", "lens", "geometry"]


# ----------------------------------------------------------------------------- the plan and its cache
def keys(exp):
    return {s.label: s.key for s in X.plan(exp)}


def test_changing_one_setting_changes_only_its_steps():
    before = keys(validate(base_raw()))
    raw = base_raw()
    raw["settings"][1]["per_language"] = 9          # sw-en changes
    after = keys(validate(raw))
    changed = {label for label in before if before[label] != after.get(label)}
    assert changed == {"prepare sw-en", "train sw-en", "eval sw-en snli", "geometry base vs zhde-en, sw-en"}
    # A training override changes training and what follows, not data preparation or the base.
    raw = base_raw(train={"epochs": 2})
    after = keys(validate(raw))
    changed = {label for label in before if before[label] != after.get(label)}
    assert "prepare zhde-en" not in changed and "eval base snli" not in changed
    assert {"train zhde-en", "train sw-en", "eval zhde-en snli"} <= changed


def test_eval_batch_tokens_names_its_own_eval_folders():
    """Before: eval.batch_tokens was in no step key, so a changed budget kept the old scores as done."""
    plain = {s.label: s for s in X.plan(validate(base_raw()))}
    raw = base_raw()
    raw["eval"]["batch_tokens"] = 512
    other = {s.label: s for s in X.plan(validate(raw))}
    for label, st in plain.items():
        if st.kind == "eval":
            assert other[label].folder_key != st.folder_key and other[label].key != st.key, label
        elif st.kind in ("prepare", "train"):
            assert other[label].key == st.key, label


def test_more_eval_languages_reuse_the_eval_folder():
    a = {s.label: s for s in X.plan(validate(base_raw()))}
    raw = base_raw()
    raw["eval"]["langs"] = LANGS3 + ["sw"]
    b = {s.label: s for s in X.plan(validate(raw))}
    step_a, step_b = a["eval base snli"], b["eval base snli"]
    assert step_a.key != step_b.key and step_a.folder_key == step_b.folder_key


# ----------------------------------------------------------------------------- running, with fake step commands
class FakeCommands:
    """Stands in for the step commands' work functions: writes the artefacts each real one writes.
    A call is recorded as (command, config)."""

    def __init__(self, fail_on: str | None = None, exc: BaseException | None = None, real_eval: bool = False):
        self.calls: list[list[str]] = []
        self.fail_on, self.exc, self.real_eval = fail_on, exc, real_eval

    def __call__(self, cmd: str, cfg) -> None:
        self.calls.append((cmd, cfg))
        out = Path(cfg.output)
        out.mkdir(parents=True, exist_ok=True)
        if self.fail_on and self.fail_on == cmd:
            raise self.exc
        if cmd == "prepare":
            (out / "train.jsonl").write_text('{"input": "x", "output": "y"}\n', "utf-8")
            (out / "manifest.json").write_text("{}", "utf-8")
        elif cmd == "train":
            (out / "adapter_config.json").write_text("{}", "utf-8")
            (out / "train_log.jsonl").write_text('{"step": 1, "epoch": 1.0, "loss": 2.0, "lr": 0.1}\n', "utf-8")
        elif cmd == "evaluate":
            if self.real_eval:
                return REAL_CALL(cmd, cfg)
            langs, task = cfg.langs.split(","), cfg.tasks
            rows = []
            for lang in langs:
                samples = [{"id": str(i), "pred": "x", "gold": "x", "correct": (i + len(lang)) % 2 == 0}
                           for i in range(4)]
                p = out / "samples" / task / "english" / f"{lang}.jsonl"
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_text("".join(json.dumps(s) + "\n" for s in samples), "utf-8")
                rows.append({"task": task, "lang": lang, "labels": "english", "scoring": "paper", "n": 4,
                             "acc": sum(s["correct"] for s in samples) / 4})
            (out / "results.json").write_text(json.dumps({"rows": rows, "averages": []}), "utf-8")
        elif cmd in ("lens", "geometry"):
            for a in cfg.compare_adapter:
                assert (Path(a) / "adapter_config.json").exists()
            (out / "summary.json").write_text("{}", "utf-8")


@pytest.fixture
def run_dir(tmp_path):
    return tmp_path / "run"


def _run(exp, run_dir, fake, monkeypatch, **kw):
    monkeypatch.setattr(X, "run_command", fake)
    return X.run_experiment(exp, str(run_dir), check_models=False, out=sys.stdout, **kw)


@pytest.mark.slow
def test_run_skips_finished_steps_and_recomputes_only_what_changed(run_dir, monkeypatch, capsys):
    exp = validate(base_raw())
    fake = FakeCommands()
    _run(exp, run_dir, fake, monkeypatch)
    assert [c[0] for c in fake.calls] == ["evaluate", "prepare", "train", "evaluate", "prepare", "train",
                                          "evaluate", "lens", "geometry"]
    out = capsys.readouterr().out
    assert "[1/9] eval base snli" in out and "ETA" in out and "█" in out
    assert out.strip().splitlines()[-1] == str(run_dir / "report.html")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert all(s["status"] == "done" for s in manifest["steps"])
    for s in manifest["steps"]:
        assert (run_dir / s["dir"] / "done.json").exists()
    lens = [c for c in fake.calls if c[0] == "lens"][0]
    assert lens[1].compare_adapter[0].endswith("adapters/zhde-en")

    fake2 = FakeCommands()
    _run(exp, run_dir, fake2, monkeypatch)
    assert fake2.calls == []
    assert "done earlier" in capsys.readouterr().out

    raw = base_raw()
    raw["settings"][1]["per_language"] = 9
    fake3 = FakeCommands()
    _run(validate(raw), run_dir, fake3, monkeypatch)
    assert [c[0] for c in fake3.calls] == ["prepare", "train", "evaluate", "geometry"]
    assert fake3.calls[0][1].sources == "sw"


@pytest.mark.slow
def test_failed_step_leaves_a_resumable_run(run_dir, monkeypatch):
    exp = validate(base_raw())
    fake = FakeCommands(fail_on="train", exc=PolyalignError("no space for the optimizer"))
    with pytest.raises(PolyalignError) as e:
        _run(exp, run_dir, fake, monkeypatch)
    assert "[3/9] train zhde-en failed: no space for the optimizer" in str(e.value)
    assert "rerun" in str(e.value)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert [s["status"] for s in manifest["steps"]][:3] == ["done", "done", "failed"]
    fake2 = FakeCommands()
    _run(exp, run_dir, fake2, monkeypatch)
    assert [c[0] for c in fake2.calls][:2] == ["train", "evaluate"]    # base eval and prepare were kept
    assert "prepare" in [c[0] for c in fake2.calls]                      # only sw-en's own prepare


@pytest.mark.slow
def test_a_step_whose_outputs_went_missing_is_run_again(run_dir, monkeypatch, capsys):
    """Before: done.json alone made a step done, so a deleted results.json (or adapter) was never rebuilt."""
    exp = validate(base_raw())
    _run(exp, run_dir, FakeCommands(), monkeypatch)
    steps = {st.label: st for st in X.plan(exp)}
    (steps["eval base snli"].folder(run_dir) / "results.json").unlink()
    (steps["train sw-en"].folder(run_dir) / "adapter_config.json").unlink()
    (steps["eval zhde-en snli"].folder(run_dir) / "results.json").write_text('{"rows": [', "utf-8")   # cut short
    capsys.readouterr()
    X.run_experiment(exp, str(run_dir), report=False, dry_run=True, check_models=False, out=sys.stdout)
    listing = capsys.readouterr().out
    assert "results.json is missing or unreadable" in listing and "adapter" in listing

    fake = FakeCommands()
    _run(exp, run_dir, fake, monkeypatch)
    again = [(c[0], c[1].output) for c in fake.calls]
    assert sorted(again) == sorted([("evaluate", str(steps["eval base snli"].folder(run_dir))),
                                    ("train", str(steps["train sw-en"].folder(run_dir))),
                                    ("evaluate", str(steps["eval zhde-en snli"].folder(run_dir)))])
    assert "running it again" in capsys.readouterr().out
    fake = FakeCommands()
    _run(exp, run_dir, fake, monkeypatch)
    assert fake.calls == []


@pytest.mark.slow
def test_a_step_that_ends_without_its_outputs_is_not_marked_done(run_dir, monkeypatch):
    class NoSummary(FakeCommands):
        def __call__(self, cmd, cfg):
            super().__call__(cmd, cfg)
            if cmd == "geometry":
                (Path(cfg.output) / "summary.json").unlink()

    exp = validate(base_raw())
    with pytest.raises(PolyalignError, match="summary.json is missing"):
        _run(exp, run_dir, NoSummary(), monkeypatch)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert [s["status"] for s in manifest["steps"] if s["kind"] == "geometry"] == ["failed"]


@pytest.mark.slow
def test_disk_full_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    from polyalign import cli

    path = tmp_path / "exp.yaml"
    raw = base_raw(output=str(tmp_path / "run"))
    for s in raw["settings"]:
        s["data"] = str(tmp_path)
    path.write_text(yaml.safe_dump(raw), "utf-8")
    fake = FakeCommands(fail_on="prepare", exc=OSError(errno.ENOSPC, "No space left on device", "x.jsonl"))
    monkeypatch.setattr(X, "run_command", fake)
    monkeypatch.setattr(X, "preflight", lambda exp, steps, run: None)
    assert cli.main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "disk full" in err[0] and "[2/9] prepare zhde-en" in err[0]
    # The run resumes from there.
    fake2 = FakeCommands()
    monkeypatch.setattr(X, "run_command", fake2)
    assert cli.main(["run", str(path), "--no-report"]) == 0
    assert fake2.calls[0][0] == "prepare"


def test_cli_bad_file_and_model(tmp_path, capsys):
    from polyalign import cli

    path = tmp_path / "exp.yaml"
    raw = base_raw(output=str(tmp_path / "run"))
    raw["eval"]["limitt"] = 3
    path.write_text(yaml.safe_dump(raw), "utf-8")
    assert cli.main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown key eval.limitt" in err and "'limit'" in err
    raw = base_raw(output=str(tmp_path / "run"), model=str(tmp_path / "no-such-model"))
    path.write_text(yaml.safe_dump(raw), "utf-8")
    assert cli.main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model folder not found" in err
    assert not (tmp_path / "run" / "steps").exists()       # nothing started


def test_dry_run_lists_steps(tmp_path, capsys):
    exp = validate(base_raw())
    X.run_experiment(exp, str(tmp_path / "run"), dry_run=True, out=sys.stdout)
    out = capsys.readouterr().out
    assert "[9/9] geometry base vs zhde-en, sw-en" in out and "pending" in out
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- with the real evaluator
def _tiny_adapter(model_path: str, folder: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_path)
    peft = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))
    peft.save_pretrained(folder)


def test_real_commands_end_to_end(tmp_path, tiny_llama_path, monkeypatch):
    """The real evaluator, and the real prepare and train where this installation has them."""
    from polyalign.cli import COMMANDS

    raw = base_raw(model=tiny_llama_path, dtype="fp32", device="cpu",
                   settings=[{"sources": ["zh", "de"], "task": "amazon_polarity", "per_language": 8,
                              "prepare": {"val_size": 2}}],
                   train={"max_steps": 2, "batch_size": 4, "micro_batch_size": 4, "eval_steps": 1},
                   eval={"tasks": ["snli"], "langs": ["en", "zh"], "limit": 3}, analyses={})
    exp = validate(raw, check_data=True)
    real = {"evaluate", "prepare", "train"} & set(COMMANDS)

    class Fake(FakeCommands):
        def __call__(self, cmd, cfg):
            if cmd in real:
                self.calls.append((cmd, cfg))
                return REAL_CALL(cmd, cfg)
            if cmd == "train":
                self.calls.append((cmd, cfg))
                _tiny_adapter(tiny_llama_path, Path(cfg.output))
                return None
            return super().__call__(cmd, cfg)

    import transformers
    parsed = []            # every step loads the model; the run parses its tokenizer once
    parse = transformers.AutoTokenizer.from_pretrained
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda path, *a, **k: (parsed.append(str(path)), parse(path, *a, **k))[1])
    fake = Fake()
    run = _run(exp, tmp_path / "run", fake, monkeypatch)
    assert parsed.count(str(tiny_llama_path)) == 1, parsed
    manifest = json.loads((run / "manifest.json").read_text())
    evals = [s for s in manifest["steps"] if s["kind"] == "eval"]
    for s in evals:
        res = json.loads((run / s["dir"] / "results.json").read_text())
        assert {r["lang"] for r in res["rows"]} == {"en", "zh"} and all(r["n"] == 3 for r in res["rows"])
    adapter_eval = json.loads((run / evals[1]["dir"] / "results.json").read_text())
    assert adapter_eval["model"]["adapter"]
    md = (run / "report.md").read_text()
    assert "zh/de ⇒ en" in md and "| en | zh | Avg |" in md.replace("model / setting | ", "")
    if "train" in real:
        assert "## Training" in md and (run / manifest["steps"][2]["dir"] / "train_log.jsonl").exists()


# ----------------------------------------------------------------------------- issue 14: found at load time
@pytest.mark.parametrize("where, train, pattern", [
    ("top", {"lr": "fast"}, r"^train: setting lr: expected a number, got 'fast'"),
    ("top", {"max_steps": 2.5}, r"^train: setting max_steps: expected a whole number"),
    ("top", {"max_steps": -1}, r"^train: max_steps must be 0 \(off\) or positive"),
    ("setting", {"lr": "fast"}, r"^setting zhde-en: train: setting lr: expected a number"),
    ("model", {"warmup_ratio": 1.5}, r"^model tiny: train: warmup_ratio must be in \[0, 1\)"),
])
def test_bad_training_values_fail_at_load_time(tmp_path, capsys, where, train, pattern):
    """They passed validation and --dry-run and failed only at the train step, after the base evaluation."""
    from polyalign import cli

    raw = base_raw(output=str(tmp_path / "run"))
    if where == "top":
        raw["train"] = {**raw["train"], **train}
    elif where == "setting":
        raw["settings"][0]["train"] = train
    else:
        raw["model"] = {"name": "tiny", "train": train}
    with pytest.raises(PolyalignError, match=pattern):
        validate(raw)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(raw), "utf-8")
    assert cli.main(["run", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train" in err
    assert not (tmp_path / "run").exists()


def test_good_training_values_still_pass():
    raw = base_raw(train={"lr": "1e-4", "max_steps": 3, "lora_target": ["q_proj"], "gradient_checkpointing": True})
    raw["settings"][1]["train"] = {"epochs": 0.5}
    validate(raw)


def test_dry_run_fails_on_a_missing_model_folder(tmp_path, capsys):
    from polyalign import cli

    raw = base_raw(output=str(tmp_path / "run"), model=str(tmp_path / "no-such-model"))
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(raw), "utf-8")
    assert cli.main(["run", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model folder not found" in err and "no-such-model" in err
    assert not (tmp_path / "run").exists()


def test_unknown_hub_model_offline_is_quick(monkeypatch):
    """The preflight asks the hub; without a network it asks the local cache alone, at once."""
    import time

    import transformers  # noqa: F401 - its import alone takes seconds

    from polyalign import hf
    monkeypatch.setattr(hf, "hub_reachable", lambda timeout=3.0: False)
    started = time.time()
    with pytest.raises(PolyalignError, match=r"cannot load model 'polyalign-no-such-org/no-such-model-0'.*offline"):
        X.check_model("polyalign-no-such-org/no-such-model-0")
    assert time.time() - started < 10


def test_the_library_run_prints_nothing_it_logs(tmp_path, capsys, caplog):
    """Without a stream, run_experiment writes nothing to stdout/stderr: its lines go to logging."""
    import logging
    exp = validate(base_raw())
    with caplog.at_level(logging.INFO, logger="polyalign"):
        X.run_experiment(exp, str(tmp_path / "run"), dry_run=True)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    assert any("[9/9] geometry base vs zhde-en, sw-en" in r.getMessage() for r in caplog.records)


# ----------------------------------------------------------------------------- issue 15: eval forwards feed geometry
def _feeds(raw) -> dict:
    return {s.label: (s.feeds.label if s.feeds else None) for s in X.plan(validate(raw)) if s.kind == "eval"}


def test_eval_steps_feed_the_geometry_step_that_scores_their_prompts():
    geo = "geometry base vs zhde-en, sw-en"
    assert _feeds(base_raw()) == {"eval base snli": geo, "eval zhde-en snli": geo, "eval sw-en snli": geo}

    def with_geometry(**over):
        raw = base_raw()
        raw["analyses"]["geometry"].update(over)
        return raw
    assert set(_feeds(with_geometry(settings=["sw-en"])).values()) == {"geometry base vs sw-en", None}
    assert _feeds(with_geometry(settings=["sw-en"]))["eval zhde-en snli"] is None     # not compared there
    assert _feeds(with_geometry(langs=["en", "sw"]))["eval base snli"] == geo         # en is evaluated: shared
    for other in (dict(options={"labels": "native"}), dict(limit=4), dict(langs=["sw", "ms"]),
                  dict(task="amazon_polarity"), dict(options={"max_length": 64}), dict(options={"dtype": "fp32"}),
                  dict(options={"recompute": True})):
        assert set(_feeds(with_geometry(**other)).values()) == {None}, other
    # Feeding changes no step key: an experiment without geometry keeps its eval folders.
    without = base_raw()
    del without["analyses"]["geometry"]
    assert {k: v for k, v in keys(validate(base_raw())).items() if k.startswith("eval")} == \
           {k: v for k, v in keys(validate(without)).items() if k.startswith("eval")}


def test_a_real_run_computes_no_geometry_forward(tmp_path, tiny_llama_path, monkeypatch):
    """Real evaluate and geometry steps: the geometry step finds every state cached by the eval steps,
    loads no model and runs no forward, and its outputs are those of a geometry that computes them."""
    import numpy as np

    from polyalign.analysis import geometry
    from polyalign.experiment.plan import step_config

    raw = base_raw(model=tiny_llama_path, dtype="fp32", device="cpu",
                   settings=[{"sources": ["zh", "de"], "task": "amazon_polarity", "per_language": 4}],
                   eval={"tasks": ["snli"], "langs": ["en", "de", "zh"], "limit": 4, "calibration": "none"},
                   analyses={"geometry": {"task": "snli", "langs": ["en", "zh"], "limit": 3}})
    exp = validate(raw, check_data=True)

    def no_forward(*a, **k):
        raise AssertionError("the geometry step should have found every state cached")

    class Fake(FakeCommands):
        def __call__(self, cmd, cfg):
            if cmd == "train":
                self.calls.append((cmd, cfg))
                return _tiny_adapter(tiny_llama_path, Path(cfg.output))
            if cmd == "geometry":
                self.calls.append((cmd, cfg))
                with monkeypatch.context() as m:
                    m.setattr(geometry, "collect_states", no_forward)
                    m.setattr("polyalign.models.load_model", no_forward)
                    return REAL_CALL(cmd, cfg)
            if cmd == "evaluate":
                self.calls.append((cmd, cfg))
                return REAL_CALL(cmd, cfg)
            return super().__call__(cmd, cfg)

    run = _run(exp, tmp_path / "run", Fake(), monkeypatch, report=False)
    geo_step = next(s for s in X.plan(exp) if s.kind == "geometry")
    shared = geo_step.folder(run)
    assert sorted(p.relative_to(shared / "states").as_posix() for p in (shared / "states").rglob("*.npz")) == \
           ["base/en.npz", "base/zh.npz", "zhde-en/en.npz", "zhde-en/zh.npz"]
    alone = geometry.run_geometry(replace(step_config(geo_step, run), output=str(tmp_path / "alone")))
    together = json.loads((shared / "summary.json").read_text())
    assert together["per_layer"].keys() == alone.summary["per_layer"].keys()
    for name in ("pearson.csv", "alignment.csv", "mexa.csv"):
        a, b = (list(csv.DictReader(open(folder / name, encoding="utf-8"))) for folder in (shared, tmp_path / "alone"))
        assert len(a) == len(b) and len(a) > 0, name
        for ra, rb in zip(a, b):
            assert ra.keys() == rb.keys()
            for col in ra:
                if col in ("model", "layer", "lang", "lang_a", "lang_b"):
                    assert ra[col] == rb[col], (name, col)
                else:   # mean pooling, fp32: the states agree to ~1e-6 (test_geometry), the statistics so
                    np.testing.assert_allclose(float(ra[col]), float(rb[col]), atol=1e-4, err_msg=f"{name} {col}")
    for f in ("base/en.npz", "zhde-en/zh.npz"):
        with np.load(shared / "states" / f) as x, np.load(tmp_path / "alone" / "states" / f) as y:
            np.testing.assert_allclose(x["mean"], y["mean"], rtol=1e-5, atol=1e-5)
