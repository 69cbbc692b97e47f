"""Every command the Makefile and the README give still runs as written, and the README's links hold.

Benchmark commands parse with their script's options (``parse_args`` is stopped right after it
succeeds); ``python -m lensexp.<tool>`` commands compose with Hydra. A renamed or removed option
otherwise surfaces only when a user runs ``make bench`` (which passed a ``--compile`` that
``shard_throughput.py`` never had) or copies a command from the README.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import shlex
import sys

import pytest

from lensexp.paths import PROJECT_ROOT

CMD = re.compile(r"python (benchmarks/\w+\.py)((?:[^`\n#]|\\\n)*)")


class _Parsed(Exception):
    pass


def _no_exec(*args):
    raise AssertionError(f"the script re-executed itself before parsing its options: {args[1]}")


FENCED = re.compile(r"^```[a-z]*\n(.*?)^```", re.S | re.M)


def _find(pattern: re.Pattern, start: str) -> list[tuple[str, str, str]]:
    """(where, name, arguments) of each match of ``pattern`` in the Makefile recipes, the README's
    code blocks and its inline code (inline code that begins with ``start``)."""
    make = (PROJECT_ROOT / "Makefile").read_text().replace("\\\n", " ")
    found = [("Makefile", m.group(1), m.group(2)) for m in pattern.finditer(make)]
    readme = (PROJECT_ROOT / "README.md").read_text()
    for block in FENCED.findall(readme):
        found += [("README block", m.group(1), m.group(2)) for m in pattern.finditer(block.replace("\\\n", " "))]
    for code in re.findall(f"`({re.escape(start)}[^`]*)`", FENCED.sub("", readme)):
        found += [("README inline", m.group(1), m.group(2)) for m in pattern.finditer(" ".join(code.split()))]
    return found


def documented_commands() -> list[tuple[str, str, list[str]]]:
    """(where, script, argv) for each ``python benchmarks/X.py ...`` in the Makefile recipes, the
    README's code blocks and its inline code; commands with placeholders (``...``, ``[--opt]``)
    are left out."""
    out = []
    for where, script, args in _find(CMD, "python benchmarks/"):
        if "..." in args or "[" in args:
            continue
        out.append((where, script, shlex.split(args.replace("$(BIN)/", ""))))
    return out


COMMANDS = documented_commands()


def test_the_documents_give_benchmark_commands():
    scripts = {s for _, s, _ in COMMANDS}
    assert {"benchmarks/shard_throughput.py", "benchmarks/kappa_lookup.py", "benchmarks/real_lenses.py"} <= scripts


@pytest.mark.parametrize(("where", "script", "argv"), COMMANDS, ids=[f"{w}:{s} {' '.join(a)}" for w, s, a in COMMANDS])
def test_a_documented_benchmark_command_parses(where, script, argv, monkeypatch):
    monkeypatch.syspath_prepend(str(PROJECT_ROOT / "benchmarks"))
    name = script.removeprefix("benchmarks/").removesuffix(".py")
    sys.modules.pop(name, None)
    mod = importlib.import_module(name)
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        original(self, args, namespace)  # exits with status 2 on an unknown or malformed option
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr(mod, "ensure_allocator_env", lambda: None, raising=False)  # it re-executes the script
    monkeypatch.setattr(os, "execve", _no_exec)
    monkeypatch.setattr(sys, "argv", [script, *argv])
    with pytest.raises(_Parsed):
        mod.main()


ENTRY = re.compile(r"python -m lensexp\.(\w+)((?:[^`\n#|]|\\\n)*)")


def documented_entry_points() -> list[tuple[str, str, list[str]]]:
    """(where, command, overrides) for each ``python -m lensexp.<command> ...`` with a Hydra config in
    the Makefile recipes and the README (code blocks and inline code); commands with placeholders or
    make/shell variables are left out, a multirun's sweeps are expanded one value at a time."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    out = []
    for where, name, args in _find(ENTRY, "python -m lensexp"):
        if not (PROJECT_ROOT / "conf" / f"{name}.yaml").is_file() or re.search(r"\.\.\.|\$|\[--|<|[A-Z]{3,}=", args):
            continue
        argv = [a for a in shlex.split(args) if a not in ("-m", "--multirun")]
        parsed = parser.parse_overrides(argv)
        fixed = [a for a, o in zip(argv, parsed) if not o.is_sweep_override()]
        sweeps = [o for o in parsed if o.is_sweep_override()]
        if not sweeps:
            out.append((where, name, argv))
        for o in sweeps:  # each value of each sweep once, the other sweeps at their first value
            firsts = [f"{s.get_key_element()}={next(iter(s.sweep_string_iterator()))}" for s in sweeps if s is not o]
            for value in o.sweep_string_iterator():
                out.append((where, name, [*fixed, *firsts, f"{o.get_key_element()}={value}"]))
    return out


ENTRIES = documented_entry_points()


def test_the_documents_give_entry_point_commands():
    names = {n for _, n, _ in ENTRIES}
    assert {"train", "simulate", "predict", "fit", "calibrate", "lookup"} <= names


@pytest.mark.parametrize(("where", "name", "overrides"), ENTRIES, ids=[f"{w}:{n} {' '.join(o)}" for w, n, o in ENTRIES])
def test_a_documented_command_composes(where, name, overrides):
    """The command's config composes from conf/ with its overrides (hydra.* ones included), as
    ``hydra.main`` would compose it before the job starts."""
    from hydra import compose, initialize_config_dir

    from lensexp.config import CONF_DIR

    if any(o.startswith("hparams_search=") for o in overrides):
        pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="Optuna sweeper: lensexp[sweep]")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        compose(config_name=name, overrides=overrides, return_hydra_config=True)


def _github_slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation but '-' and '_' dropped,
    spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_the_readme_links_point_at_its_headings():
    readme = (PROJECT_ROOT / "README.md").read_text()
    body = FENCED.sub("", readme)
    anchors = {_github_slug(h) for h in re.findall(r"^#{1,6} (.+)$", body, re.M)}
    links = set(re.findall(r"\]\(#([^)]+)\)", body))
    assert links and not links - anchors, sorted(links - anchors)
    files = set(re.findall(r"\]\(([^)#:]+)\)", body))
    assert not [f for f in files if not (PROJECT_ROOT / f).exists()]
