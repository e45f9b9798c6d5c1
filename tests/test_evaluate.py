"""`polyalign evaluate` end to end on tiny models: output files, resume after a kill, truncation."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from toydata import CLASSES, REVIEWS, expected_prompt, toy

from polyalign import cli
from polyalign.evaluation import evaluate as evaluate_mod
from polyalign.evaluation.scoring import Scorer
from testdevice import DEVICE

ROW_KEYS = {"task", "lang", "labels", "scoring", "n", "acc", "ci_low", "ci_high", "ties", "truncated"}
SAMPLE_KEYS = {"id", "task", "lang", "prompt", "choices", "scores", "pred", "gold", "correct"}


def run(*argv) -> int:
    return cli.main(["evaluate", "--dtype", "fp32", "--device", DEVICE, "--no-progress", *map(str, argv)])


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text("utf-8").splitlines()]


def sample_files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted((out / "samples").rglob("*")) if p.is_file()}


@pytest.fixture
def count_scored(monkeypatch):
    """Counts the items that Scorer.score computes (every item of every batch it is given)."""
    calls = []
    real = Scorer.score

    def counting(self, group, batch, states=None):
        calls.append((group.lang, group.mode, [group.items[i].item["id"] for i in batch]))
        return real(self, group, batch, states)

    monkeypatch.setattr(Scorer, "score", counting)
    return calls


# --------------------------------------------------------------------------- end to end
def test_end_to_end_outputs(tmp_path, tiny_llama_path, capsys):
    task, data = toy(tmp_path)
    out = tmp_path / "run"
    assert run("--model", tiny_llama_path, "--tasks", task, "--data", data, "--langs", "en,de",
               "--labels", "english,native", "--output", out, "--batch-tokens", 160) == 0
    printed = capsys.readouterr().out
    assert "toy_polarity" in printed and "acc" in printed

    results = json.loads((out / "results.json").read_text("utf-8"))
    assert {(r["lang"], r["labels"]) for r in results["rows"]} == {
        (lang, mode) for lang in ("en", "de") for mode in ("english", "native")}
    for key in ("averages", "model", "config", "versions", "git", "timing"):
        assert key in results, key
    assert results["model"]["name"] == tiny_llama_path
    assert results["config"]["scoring"] == "paper" and results["config"]["langs"] == "en,de"
    assert "torch" in results["versions"] and "transformers" in results["versions"]
    timing = results["timing"]
    assert timing["model_load_s"] > 0 and timing["scoring_s"] > 0
    assert timing["items_per_s"] > 0 and timing["tokens_per_s"] > 0

    for row in results["rows"]:
        assert ROW_KEYS <= set(row)
        assert row["task"] == "toy_polarity" and row["scoring"] == "paper" and row["n"] == 12
        samples = lines(out / "samples" / "toy_polarity" / row["labels"] / f"{row['lang']}.jsonl")
        assert len(samples) == 12
        assert row["acc"] == pytest.approx(sum(s["correct"] for s in samples) / 12)
        assert row["ci_low"] <= row["acc"] <= row["ci_high"] and row["ci_high"] - row["ci_low"] > 0.1
        assert row["ties"] == sum(s["tied"] for s in samples) and row["truncated"] == 0
        # One line per item, in data order, with the exact prompt and one score per choice.
        assert [s["id"] for s in samples] == [f"r{i:02d}" for i in range(12)]
        for i, s in enumerate(samples):
            assert SAMPLE_KEYS <= set(s)
            assert (s["task"], s["lang"]) == ("toy_polarity", row["lang"])
            assert s["prompt"] == expected_prompt(row["lang"], REVIEWS[row["lang"]][i], row["labels"])
            if row["labels"] == "native" and row["lang"] == "de":
                assert s["choices"] == ["positiv", "negativ"]
            else:
                assert s["choices"] == ["positive", "negative"]
            assert len(s["scores"]) == 2 and len(set(s["scores"])) == 2
            assert s["pred"] == CLASSES[max(range(2), key=lambda k: s["scores"][k])]
            assert s["gold"] == CLASSES[i % 2]
            assert s["correct"] == (s["pred"] == s["gold"])

    for a in results["averages"]:
        mine = [r["acc"] for r in results["rows"] if r["labels"] == a["labels"]]
        assert a["acc"] == pytest.approx(sum(mine) / len(mine))
    assert {(a["labels"], a["langs"]) for a in results["averages"]} >= {("english", "all"), ("native", "all")}
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]

    # The stored scores belong to the stored prompt (no mix-up between batch slots and items).
    from polyalign.labels import label_plan
    from polyalign.models import load_model
    from polyalign.evaluation.scoring import naive_scores

    lm = load_model(tiny_llama_path, dtype="fp32", device=DEVICE)
    plan = label_plan(lm.tokenizer, CLASSES, ["positiv", "negativ"])
    for s in lines(out / "samples/toy_polarity/native/de.jsonl"):
        assert s["scores"] == pytest.approx(naive_scores(lm.model, lm.tokenizer, plan, s["prompt"], "paper"),
                                            abs=1e-5)


# --------------------------------------------------------------------------- resume
def _args(model, task, data, out, *extra):
    return ("--model", model, "--tasks", task, "--data", data, "--langs", "en,de", "--output", out,
            "--batch-tokens", 160, *extra)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_llama_path):
    """An uninterrupted run; tests copy it or compare with it, never write into it."""
    tmp_path = tmp_path_factory.mktemp("reference")
    task, data = toy(tmp_path)
    out = tmp_path / "reference"
    assert run(*_args(tiny_llama_path, task, data, out)) == 0
    return task, data, out


def test_resume_after_kill_between_batches(tmp_path, tiny_llama_path, reference, monkeypatch, count_scored):
    task, data, ref = reference
    out = tmp_path / "killed"
    real_append, written = evaluate_mod.append_lines, []

    def append_then_die(path, records):
        real_append(path, records)
        written.extend(records)
        if len(written) >= 5:
            raise KeyboardInterrupt  # a kill right after a batch reached the disk

    monkeypatch.setattr(evaluate_mod, "append_lines", append_then_die)
    assert run(*_args(tiny_llama_path, task, data, out)) == 130
    monkeypatch.setattr(evaluate_mod, "append_lines", real_append)
    assert 5 <= len(written) < 12
    assert len(lines(out / "samples/toy_polarity/english/en.jsonl")) == len(written)

    count_scored.clear()
    assert run(*_args(tiny_llama_path, task, data, out)) == 0
    # Finished items are not recomputed: only the rest of en and all of de.
    assert sum(len(ids) for lang, _, ids in count_scored if lang == "en") == 12 - len(written)
    assert sum(len(ids) for lang, _, ids in count_scored if lang == "de") == 12
    assert sample_files(out) == sample_files(ref)

    count_scored.clear()
    assert run(*_args(tiny_llama_path, task, data, out)) == 0  # all done: nothing to score
    assert count_scored == []
    assert sample_files(out) == sample_files(ref)


def test_resume_after_torn_write_is_byte_identical(tmp_path, tiny_llama_path, reference, count_scored):
    task, data, ref = reference
    out = tmp_path / "torn"
    shutil.copytree(ref, out)
    en = out / "samples/toy_polarity/english/en.jsonl"
    kept = en.read_bytes().splitlines(keepends=True)
    # Lose lines 3 and 6, and leave the last line half written, as a kill during a write would.
    torn = kept[:2] + kept[3:5] + kept[6:11] + [kept[11][: len(kept[11]) // 2]]
    en.write_bytes(b"".join(torn))
    lost = {json.loads(kept[i])["id"] for i in (2, 5, 11)}
    (out / "results.json").unlink()

    count_scored.clear()
    assert run(*_args(tiny_llama_path, task, data, out)) == 0
    assert sample_files(out) == sample_files(ref)
    rescored = [ids for lang, _, ids in count_scored if lang == "en"]
    assert lost <= {i for ids in rescored for i in ids}
    # Only batches holding a lost item are run again (whole, so that their numbers are identical).
    assert all(lost & set(ids) for ids in rescored), rescored
    assert sum(map(len, rescored)) < 12
    assert not [c for c in count_scored if c[0] == "de"]
    results = json.loads((out / "results.json").read_text("utf-8"))
    assert [r["n"] for r in results["rows"]] == [12, 12]


def test_resume_merges_the_part_files_of_a_killed_multi_process_run(tmp_path, tiny_llama_path, reference,
                                                                    count_scored):
    """A multi-process run killed mid-language leaves per-rank files; a plain rerun takes them in."""
    task, data, ref = reference
    out = tmp_path / "parts"
    shutil.copytree(ref, out)
    folder = out / "samples/toy_polarity/english"
    kept = (folder / "de.jsonl").read_bytes().splitlines(keepends=True)
    (folder / "de.jsonl").unlink()
    (folder / "de.rank0.jsonl").write_bytes(b"".join(kept[0:12:2]))
    (folder / "de.rank1.jsonl").write_bytes(b"".join(kept[1:9:2]) + kept[9][:40])  # rank 1 died mid-write
    (out / "results.json").unlink()

    count_scored.clear()
    assert run(*_args(tiny_llama_path, task, data, out)) == 0
    assert sample_files(out) == sample_files(ref)  # merged in file order, the part files gone
    assert {i for _, _, ids in count_scored for i in ids} >= {"r09", "r11"}
    assert not [c for c in count_scored if c[0] == "en"]


# --------------------------------------------------------------------------- edited data, subsets, options
def _edit_data(data: str, lang: str, changes: dict[int, dict]) -> None:
    path = Path(data.format(lang=lang))
    recs = [json.loads(x) for x in path.read_text("utf-8").splitlines()]
    for i, change in changes.items():
        recs[i].update(change)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), "utf-8")


def test_rerun_after_the_data_was_edited_rescores_the_edited_language(tmp_path, tiny_llama_path, count_scored,
                                                                       capsys):
    """Before: the fingerprint held the data path only, so a fixed gold label kept its old samples."""
    task, data = toy(tmp_path)
    out = tmp_path / "run"
    assert run(*_args(tiny_llama_path, task, data, out)) == 0
    _edit_data(data, "de", {3: {"label": "positive"}, 6: {"review": "Der Akku hält zwei Tage."}})
    capsys.readouterr()

    count_scored.clear()
    assert run(*_args(tiny_llama_path, task, data, out)) == 0
    assert "toy_polarity/de: the items differ" in capsys.readouterr().err
    assert sum(len(ids) for lang, _, ids in count_scored if lang == "de") == 12     # de again, whole
    assert not [c for c in count_scored if c[0] == "en"]                          # en untouched
    de = lines(out / "samples/toy_polarity/english/de.jsonl")
    assert de[3]["gold"] == "positive" and "zwei Tage" in de[6]["prompt"]

    fresh = tmp_path / "fresh"
    assert run(*_args(tiny_llama_path, task, data, fresh)) == 0
    assert sample_files(out) == sample_files(fresh)
    rows = lambda folder: json.loads((folder / "results.json").read_text("utf-8"))["rows"]  # noqa: E731
    assert rows(out) == rows(fresh)
    count_scored.clear()
    assert run(*_args(tiny_llama_path, task, data, out)) == 0                      # nothing changed now
    assert count_scored == []


def test_kill_edit_kill_resume_gives_the_files_of_a_fresh_run(tmp_path, tiny_llama_path, monkeypatch):
    """A run killed part-way, the data edited, the rescore killed too, then resumed."""
    task, data = toy(tmp_path)
    out = tmp_path / "run"
    real_append = evaluate_mod.append_lines

    def dying_after(n):
        written = []

        def append_then_die(path, records):
            real_append(path, records)
            written.extend(records)
            if len(written) >= n:
                raise KeyboardInterrupt
        return append_then_die

    monkeypatch.setattr(evaluate_mod, "append_lines", dying_after(5))
    assert run(*_args(tiny_llama_path, task, data, out)) == 130
    scored = {s["id"] for s in lines(out / "samples/toy_polarity/english/en.jsonl")}
    fixed = next(i for i in range(12) if f"r{i:02d}" in scored)
    _edit_data(data, "en", {fixed: {"label": "negative" if fixed % 2 == 0 else "positive"}})
    monkeypatch.setattr(evaluate_mod, "append_lines", dying_after(3))
    assert run(*_args(tiny_llama_path, task, data, out)) == 130
    monkeypatch.setattr(evaluate_mod, "append_lines", real_append)
    assert run(*_args(tiny_llama_path, task, data, out)) == 0

    fresh = tmp_path / "fresh"
    assert run(*_args(tiny_llama_path, task, data, fresh)) == 0
    assert sample_files(out) == sample_files(fresh)
    en = lines(out / "samples/toy_polarity/english/en.jsonl")
    assert en[fixed]["gold"] != ["positive", "negative"][fixed % 2]


def test_a_subset_of_languages_keeps_results_json_describing_every_sample(tmp_path, tiny_llama_path):
    """Before: evaluating de alone into a folder that held en and de rewrote results.json with de only."""
    task, data = toy(tmp_path)
    out = tmp_path / "run"
    assert run(*_args(tiny_llama_path, task, data, out)) == 0
    full = json.loads((out / "results.json").read_text("utf-8"))
    args = list(_args(tiny_llama_path, task, data, out))
    args[args.index("en,de")] = "de"
    assert run(*args, "--labels", "native") == 0       # another label mode, one language
    results = json.loads((out / "results.json").read_text("utf-8"))
    keys = [(r["labels"], r["lang"]) for r in results["rows"]]
    assert keys == [("native", "de"), ("english", "de"), ("english", "en")]   # this run's languages first
    assert [r for r in results["rows"] if r["labels"] == "english"] == full["rows"][::-1]
    for row in results["rows"]:   # every row is its samples file, every samples file has its row
        samples = lines(out / "samples/toy_polarity" / row["labels"] / f"{row['lang']}.jsonl")
        assert row["n"] == len(samples) == 12 and row["acc"] == pytest.approx(sum(s["correct"] for s in samples) / 12)
    assert len(results["rows"]) == len(list((out / "samples").rglob("*.jsonl")))
    english_all = [a for a in results["averages"] if a["labels"] == "english" and a["langs"] == "all"]
    assert english_all == [a for a in full["averages"] if a["langs"] == "all"] and english_all[0]["n_langs"] == 2


def test_batch_tokens_is_part_of_the_fingerprint(tmp_path, tiny_llama_path, capsys):
    """--batch-tokens changes scores in the last bits (see README), so a resume must not mix two values."""
    task, data = toy(tmp_path)
    out = tmp_path / "run"
    assert run(*_args(tiny_llama_path, task, data, out)) == 0           # --batch-tokens 160
    capsys.readouterr()
    args = list(_args(tiny_llama_path, task, data, out))
    args[args.index(160)] = 60
    assert run(*args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other settings" in err[0] and "batch_tokens" in err[0] and "60" in err[0]
    recorded = json.loads((out / "run.json").read_text("utf-8"))
    assert recorded["batch_tokens"] == 160 and recorded["device"] == DEVICE.split(":")[0]
    assert recorded["torch_dtype"] == "float32"
    # The default budget is recorded as resolved, so naming it explicitly is the same run.
    other = tmp_path / "default"
    args[args.index(out)] = other
    del args[args.index(60) - 1: args.index(60) + 1]
    assert run(*args) == 0
    from polyalign.engine.runner import PrefixRunner  # noqa: F401  (the budget it resolves to is recorded)
    budget = json.loads((other / "run.json").read_text("utf-8"))["batch_tokens"]
    assert isinstance(budget, int) and budget > 0
    assert run(*args, "--batch-tokens", budget) == 0


def test_a_full_disk_is_one_line_naming_the_file(tmp_path, tiny_llama_path, monkeypatch, capsys):
    """Before: the disk-full message had an empty file name (os.write names none)."""
    import errno
    from polyalign import store

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    task, data = toy(tmp_path)
    out = tmp_path / "run"
    monkeypatch.setattr(store.os, "write", full)
    assert run(*_args(tiny_llama_path, task, data, out)) == 2
    # (Only the error line: the "Loading weights" bar that --no-progress does not yet silence is another item.)
    err = [x for x in capsys.readouterr().err.strip().splitlines() if x.startswith("polyalign")]
    assert len(err) == 1 and "disk full while writing" in err[0]
    assert str(out / "samples/toy_polarity/english/en.jsonl") in err[0]


# --------------------------------------------------------------------------- truncation
@pytest.fixture(scope="module")
def short_context_model(tmp_path_factory, tiny_tokenizer):
    from conftest import make_model
    return str(make_model("llama", tmp_path_factory.mktemp("short"), tiny_tokenizer, max_positions=128))


@pytest.mark.parametrize("rule", ["paper", "sequence"])
def test_long_item_is_truncated_inside_the_item_text(tmp_path, tiny_tokenizer, short_context_model, rule):
    task, _ = toy(tmp_path)
    long_review = " ".join(["The blender is loud but it crushes ice and the jar is easy to clean."] * 12)
    data = tmp_path / "long" / "en.jsonl"
    data.parent.mkdir()
    data.write_text(json.dumps({"id": "long", "review": long_review, "label": "positive"}) + "\n"
                    + json.dumps({"id": "short", "review": "Nice.", "label": "negative"}) + "\n", "utf-8")
    assert len(tiny_tokenizer(expected_prompt("en", long_review))["input_ids"]) > 128
    out = tmp_path / "run"
    assert run("--model", short_context_model, "--tasks", task, "--data", str(data.parent / "{lang}.jsonl"),
               "--langs", "en", "--output", out, "--scoring", rule) == 0
    results = json.loads((out / "results.json").read_text("utf-8"))
    assert results["rows"][0]["truncated"] == 1
    long, short = lines(out / "samples/toy_polarity/english/en.jsonl")
    assert long["truncated"] is True and short["truncated"] is False
    assert short["prompt"] == expected_prompt("en", "Nice.")

    prompt = long["prompt"]
    demos = expected_prompt("en", "")[: -len('Review: \nAnswer: "')]
    assert prompt.startswith(demos + "Review: ")               # the demos are intact
    assert prompt.endswith('\nAnswer: "')                       # so is the answer cue
    kept = prompt[len(demos + "Review: "): -len('\nAnswer: "')]
    assert 10 < len(kept) < len(long_review) and long_review.startswith(kept.rstrip())
    labels = max(len(tiny_tokenizer(w, add_special_tokens=False)["input_ids"]) for w in CLASSES)
    room = 128 - (labels if rule == "sequence" else 0)
    assert len(tiny_tokenizer(prompt)["input_ids"]) <= room
