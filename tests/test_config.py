"""polyalign.config: the command line generated from each command's config dataclass, mappings read
into them with one-line errors, and `polyalign run` calling the work functions without a command line."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

import pytest

from polyalign import cli, config as C
from polyalign.errors import PolyalignError


@dataclass
class Toy:
    name: str = C.option("x", help="a name")
    count: int = C.option(3, help="a count")
    rate: float = C.option(0.5, help="a rate")
    limit: int | None = C.option(None, help="optional")
    fast: bool = C.option(False, help="off by default")
    progress: bool = C.option(True, help="on by default")
    targets: list[str] = C.option(["q", "v"], help="a list")
    mode: str = C.option("a", choices=("a", "b", "long-name"), help="a choice")
    dirs: list[str] = C.option([], repeatable=True, help="repeatable")
    routing: dict | None = C.option(None, cli=False, help="a mapping, from mappings only")
    plain: dict = dataclasses.field(default_factory=dict)      # not an option: Python only


def toy_parser() -> argparse.ArgumentParser:
    p = cli._Parser(prog="toy")
    C.add_arguments(p, Toy)
    return p


def parse(*argv) -> Toy:
    return C.from_args(Toy, toy_parser().parse_args(list(argv)))


# ----------------------------------------------------------------------------- the command line
def _required_argv(cls) -> list[str]:
    """Values for the options the command line requires, and what they set."""
    argv = []
    for s in C.specs(cls):
        if s.required and s.positional:
            argv.append("somewhere")
        elif s.required:
            argv += [C.flag_of(s), "zh" if s.name == "sources" else "somewhere"]
    return argv


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_every_option_is_on_the_command_line_with_the_dataclass_default(name):
    cls, work = cli.COMMANDS[name].load()
    assert callable(work)
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    dests = {a.dest: a for a in sub._actions}
    for s in C.specs(cls):
        if not s.cli:       # read from mappings only (polyalign run sets it)
            assert s.name not in dests, f"{name}: option {s.name} is cli=False but has an argument"
            continue
        assert s.name in dests, f"{name}: option {s.name} has no argument"
        action = dests[s.name]
        if not s.positional:
            assert C.flag_of(s) in action.option_strings
        if s.choices and not s.is_list:
            assert list(action.choices) == list(s.choices)
        assert action.default is argparse.SUPPRESS      # the default lives in the dataclass alone
    # An option left out of the command line takes the dataclass's default.
    args = parser.parse_args([name, *_required_argv(cls)])
    cfg = C.from_args(cls, args)
    given = C.given(args, cls)
    for s in C.specs(cls):
        if s.name not in given:
            assert getattr(cfg, s.name) == s.default, (name, s.name)
    assert given <= {s.name for s in C.specs(cls) if s.required}


def test_scoring_and_label_choices_come_from_the_registries():
    from polyalign.analysis.lens import LensConfig
    from polyalign.evaluation.evaluate import EvalConfig
    from polyalign.evaluation.scoring import RULES
    from polyalign.tasks import LABEL_MODES
    from polyalign.training.train import SCHEDULERS, TrainConfig

    assert C.spec(EvalConfig, "scoring").choices == tuple(RULES)
    assert C.spec(LensConfig, "labels").choices == tuple(LABEL_MODES)
    assert C.spec(TrainConfig, "scheduler").choices == tuple(SCHEDULERS)


def test_generated_flags_types_and_defaults():
    assert parse() == Toy()
    cfg = parse("--name", "y", "--count", "7", "--rate", "1e-3", "--limit", "4", "--fast", "--no-progress",
                "--targets", "q, k ,v", "--mode", "long-name", "--dirs", "a,b", "--dirs", "c")
    assert cfg == Toy("y", 7, 1e-3, 4, True, False, ["q", "k", "v"], "long-name", ["a,b", "c"])
    assert cfg.plain == {}
    assert not any(name in a.dest for a in toy_parser()._actions for name in ("plain", "routing"))


def test_a_dict_option_comes_from_mappings_only():
    assert C.from_mapping(Toy, {"routing": {"a": [1]}}).routing == {"a": [1]}
    assert C.from_mapping(Toy, {"routing": None}).routing is None
    with pytest.raises(C.BadValue, match=r"^toy\.routing: expected a mapping, got 'x'$"):
        C.from_mapping(Toy, {"routing": "x"}, "toy")

    @dataclass
    class OnTheCommandLine:
        routing: dict | None = C.option(None, help="cannot be a flag")
    with pytest.raises(TypeError, match="cli=False"):
        C.specs(OnTheCommandLine)


@pytest.mark.parametrize("argv", [["--count", "x"], ["--mode", "c"], ["--no-fast"], ["--progress"]])
def test_command_line_errors_are_one_line_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        parse(*argv)
    assert e.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_a_comma_list_is_checked_against_its_choices():
    @dataclass
    class Modes:
        modes: list[str] = C.option(["a"], choices=("a", "b"), help="modes")
    p = cli._Parser(prog="m")
    C.add_arguments(p, Modes)
    assert C.from_args(Modes, p.parse_args(["--modes", "b,a"])).modes == ["b", "a"]
    with pytest.raises(PolyalignError, match=r"--modes must be one of a, b, got 'c'"):
        C.from_args(Modes, p.parse_args(["--modes", "a,c"]))


# ----------------------------------------------------------------------------- mappings
def test_mapping_values_are_converted_by_type():
    cfg = C.from_mapping(Toy, {"name": 12, "count": "4", "rate": "1e-4", "limit": None, "fast": "yes",
                               "progress": "off", "targets": "a,b", "dirs": ["x", "y"]}, "toy")
    assert cfg == Toy("12", 4, 1e-4, None, True, False, ["a", "b"], "a", ["x", "y"])
    assert C.from_mapping(Toy, {"count": 2.0, "targets": ["q"]}).count == 2
    base = Toy(name="kept")
    assert C.from_mapping(Toy, {"count": 1}, base=base) == Toy(name="kept", count=1)
    assert base.count == 3                                    # the base itself is left alone


@pytest.mark.parametrize("mapping, message", [
    ({"cuont": 1}, "unknown key toy.cuont; did you mean 'count'?"),
    ({"zzzzzz": 1}, "unknown key toy.zzzzzz; valid keys: count, dirs, fast, limit, mode, name, progress, rate, routing, targets"),
    ({"plain": {}}, "unknown key toy.plain"),
    ({"count": 2.5}, "toy.count: expected a whole number, got 2.5"),
    ({"count": "three"}, "toy.count: expected a whole number, got 'three'"),
    ({"count": True}, "toy.count: expected a whole number, got True"),
    ({"count": None}, "toy.count: expected a whole number, got None"),
    ({"rate": "fast"}, "toy.rate: expected a number, got 'fast'"),
    ({"fast": "maybe"}, "toy.fast: expected true or false, got 'maybe'"),
    ({"name": ["a"]}, "toy.name: expected a string, got ['a']"),
    ({"targets": []}, "toy.targets: expected a list"),
    ({"mode": "lon-name"}, "toy.mode must be one of a, b, long-name, got 'lon-name'; did you mean 'long-name'?"),
])
def test_mapping_errors_are_one_line_and_name_the_key(mapping, message):
    with pytest.raises(PolyalignError) as e:
        C.from_mapping(Toy, mapping, "toy")
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_mapping_keys_can_be_restricted_and_located():
    with pytest.raises(PolyalignError, match=r"^unknown key count; did you mean 'counts'"):
        C.from_mapping(Toy, {"count": 1}, keys=["counts", "name"])
    with pytest.raises(PolyalignError, match=r"^setting rate: expected a number"):
        C.from_mapping(Toy, {"rate": "x"}, locate=lambda k: f"setting {k}")
    with pytest.raises(PolyalignError, match=r"^toy must be a mapping, got list"):
        C.from_mapping(Toy, [1], "toy")


def test_train_layers_keep_their_precedence(tmp_path):
    from polyalign.training import train as T

    f = tmp_path / "c.yaml"
    f.write_text("model: from-file\nlr: 2.0e-4\n")
    hp = T.resolve_config(T.TrainConfig(config=str(f)))
    assert hp["model"] == "from-file" and hp["lr"] == 2e-4
    hp = T.resolve_config(T.TrainConfig(config=str(f), model="flag", overrides=["lr=3e-4"]))
    assert hp["model"] == "flag" and hp["lr"] == 3e-4
    # The defaults are the paper's, as config.yaml writes them (whole numbers stay whole).
    assert T.resolve_config(T.TrainConfig()) == T.defaults()
    assert T.defaults()["epochs"] == 3 and isinstance(T.defaults()["epochs"], int)
    assert list(T.defaults())[:4] == ["model", "dtype", "device", "chat_template"]


# ----------------------------------------------------------------------------- polyalign run
def test_run_calls_the_work_functions_without_a_command_line(tmp_path, monkeypatch):
    """The steps get config objects; no argv is built and nothing is parsed while the run runs."""
    import test_experiment as TE

    from polyalign.experiment import run as X

    def no_parsing(self, *a, **k):
        raise AssertionError("argparse was used during the run")
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", no_parsing)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", no_parsing)
    real = X.run_command
    seen = []

    class Commands(TE.FakeCommands):
        def __call__(self, cmd, cfg):
            cls, _ = cli.COMMANDS[cmd].load()
            assert type(cfg) is cls
            seen.append(cmd)
            if cmd == "prepare":                  # the real one (the bundled question pool, no model)
                self.calls.append((cmd, cfg))
                return real(cmd, dataclasses.replace(cfg, progress=False))
            return super().__call__(cmd, cfg)

    exp = TE.validate(TE.base_raw())
    monkeypatch.setattr(X, "run_command", Commands())
    X.run_experiment(exp, str(tmp_path / "run"), check_models=False, report=False)
    assert seen.count("prepare") == 2 and "train" in seen and "lens" in seen
