"""A corpus of bad inputs, tried as a careless or hostile user would, and the share that get a
clear message: exit code 2, no traceback, one line that names the subject (the key, file or flag).

    python benchmarks/bad_inputs.py [--data-dir ../shared/data] [--fuzz 200]

Each case writes what it needs (a config, a data file, a damaged run directory) under a temporary
folder and runs the command line in-process. `--fuzz N` adds N seeded random mutations of the
tests' config (a wrong type or a non-finite number for a numeric or boolean key), run through
`aslora run`. tests/test_bad_input_corpus.py walks the same corpus.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from data_dir import add_data_dir
from rich.console import Console
from rich.table import Table
from typer.testing import CliRunner

from aslora.cli import app
from aslora.config import load_config

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "tests" / "base.toml"


@dataclass(frozen=True)
class BadInput:
    """One bad input: `args(folder)` writes what it needs there and returns the command line."""

    name: str
    subject: str  # what the message must name
    args: Callable[[Path], list[str]]


@dataclass(frozen=True)
class Outcome:
    case: BadInput
    exit_code: int
    message: str

    @property
    def clear(self) -> bool:
        lines = [line for line in self.message.splitlines() if line.strip()]
        return (
            self.exit_code == 2 and "Traceback" not in self.message and len(lines) <= 3
            and self.case.subject.lower() in " ".join(self.message.split()).lower()
        )


def _config_with(folder: Path, data_dir: Path, line: str, section: str | None) -> Path:
    """The tests' config with `line` added to `section` (or at the top), pointed at the data."""
    text = BASE.read_text()
    key = line.split("=", 1)[0].strip()
    header = f"[{section}]" if section else None
    start = text.index(header) + len(header) if header and header in text else (0 if header is None else None)
    if start is None:
        text += f"\n{header}\n{line}\n"
    else:
        end = text.find("\n[", start)
        end = len(text) if end < 0 else end
        block = text[start:end]
        existing = re.search(rf"^{re.escape(key)} = .*$", block, flags=re.MULTILINE) if key else None
        block = (block[: existing.start()] + line + block[existing.end() :] if existing
                 else ("\n" + line + block if header else line + "\n" + block))
        text = text[:start] + block + text[end:]
    path = folder / "bad.toml"
    path.write_text(text.replace("[data]", f"[data]\ndir = {json.dumps(str(data_dir))}", 1))
    return path


def _run_with(data_dir: Path, line: str, section: str | None) -> Callable[[Path], list[str]]:
    return lambda folder: ["run", str(_config_with(folder, data_dir, line, section)), "--output-dir", str(folder / "runs")]


def _glue(data_dir: Path, edit: Callable[[list[str]], list[str]]) -> Callable[[Path], list[str]]:
    """A run on an SST-2 copy whose train.tsv went through `edit`."""
    def args(folder: Path) -> list[str]:
        sst2 = folder / "glue" / "SST-2"
        sst2.mkdir(parents=True)
        rows = (data_dir / "glue" / "SST-2" / "train.tsv").read_text().splitlines()[:60]
        (sst2 / "train.tsv").write_text("\n".join(edit(rows)) + "\n")
        (sst2 / "dev.tsv").write_text((data_dir / "glue" / "SST-2" / "dev.tsv").read_text())
        return ["run", str(BASE), "--data-dir", str(folder), "--output-dir", str(folder / "runs")]
    return args


def _with_row(rows: list[str], index: int, row: str) -> list[str]:
    return [*rows[:index], row, *rows[index + 1 :]]


_TEMPLATE: list[Path] = []  # one finished run per process, copied for every case that damages one


def _finished_run(folder: Path) -> Path:
    """A copy of a finished 2-round synthetic run, to damage."""
    if not _TEMPLATE:
        runs = Path(tempfile.mkdtemp(prefix="aslora-bad-inputs-")) / "runs"
        result = CliRunner().invoke(app, ["run", str(REPO / "configs" / "synthetic.toml"), "--rounds", "2",
                                          "--output-dir", str(runs)])
        assert result.exit_code == 0, result.output
        _TEMPLATE.append(next(runs.iterdir()))
    return Path(shutil.copytree(_TEMPLATE[0], folder / "runs" / _TEMPLATE[0].name))


def _damaged(damage: Callable[[Path], None], *extra: str) -> Callable[[Path], list[str]]:
    def args(folder: Path) -> list[str]:
        run = _finished_run(folder)
        damage(run)
        return ["run", "--resume", str(run), *extra]
    return args


def _edit_config(run: Path) -> None:
    stored = json.loads((run / "config.json").read_text())
    stored["config"]["privacy"]["epsilon"] = 10.0
    (run / "config.json").write_text(json.dumps(stored))


def _truncate_tensors(run: Path) -> None:
    tensors = next(run.glob("checkpoint-*.safetensors"))
    tensors.write_bytes(tensors.read_bytes()[:100])


def corpus(data_dir: Path) -> list[BadInput]:
    """Every hand-made bad input, each with the subject its message must name."""
    privacy = [
        ("epsilon 0", "epsilon", ["--epsilon", "0"]),
        ("epsilon nan", "epsilon", ["--epsilon", "nan"]),
        ("epsilon inf", "epsilon", ["--epsilon", "inf"]),
        ("epsilon 1e-9", "epsilon", ["--epsilon", "1e-9", "--steps", "10"]),
        ("sigma -1", "sigma", ["--sigma", "-1", "--steps", "10"]),
        ("sigma nan", "sigma", ["--sigma", "nan", "--sample-rate", "0.01", "--steps", "10"]),
        ("sample rate 1.5", "sample rate", ["--epsilon", "3", "--sample-rate", "1.5"]),
        ("sample rate nan", "sample rate", ["--epsilon", "3", "--sample-rate", "nan"]),
        ("delta 2", "delta", ["--epsilon", "3", "--delta", "2"]),
        ("steps 0", "steps", ["--epsilon", "3", "--steps", "0"]),
        ("accountant gdp", "accountant", ["--epsilon", "3", "--accountant", "gdp"]),
        ("neither epsilon nor sigma", "--epsilon", []),
    ]
    config = [
        ("seed -1", "seed", "seed = -1", None),
        ("rounds true", "federation.rounds", "rounds = true", "federation"),
        ("enabled 'yes'", "privacy.enabled", 'enabled = "yes"', "privacy"),
        ("epsilon inf", "privacy.epsilon", "epsilon = inf", "privacy"),
        ("lr inf", "optim.lr", "lr = inf", "optim"),
        ("clip nan", "privacy.clip", "clip = nan", "privacy"),
        ("delta 0.5", "privacy.delta", "delta = 0.5", "privacy"),
        ("rank 1000", "lora.r", "r = 1000", "lora"),
        ("unknown key", "learning_rate", "learning_rate = 0.1", "optim"),
        ("unknown method", "method", 'method = "fedprox"', None),
        ("pooling max", "model.pooling", 'pooling = "max"', "model"),
        ("head module score", "head_modules", 'head_modules = ["score"]', "lora"),
        ("negative micro-batch", "micro_batch_size", "micro_batch_size = -1", "optim"),
        ("block 9 of 6", "lora.layers", "layers = [9]", "lora"),
        ("score share 0", "score_clip_share", "score_clip_share = 0.0", "selection"),
        ("dropout 1.5", "model.dropout", "dropout = 1.5", "model"),
        ("missing model", "model.name", 'name = "/no/such/model-folder"', "model"),
        ("string for a float", "optim.lr", 'lr = "0.1"', "optim"),
        ("float for an int", "federation.local_steps", "local_steps = 2.5", "federation"),
    ]
    cases = [BadInput(f"privacy: {name}", subject, lambda _, a=args: ["privacy", *a]) for name, subject, args in privacy]
    cases += [BadInput(f"config: {name}", subject, _run_with(data_dir, line, section))
              for name, subject, line, section in config]
    cases += [
        BadInput("config: not TOML", "bad.toml", lambda f: ["run", str(_write(f / "bad.toml", "[model\nname ="))]),
        BadInput("config: binary", "bad.toml", lambda f: ["run", str(_write(f / "bad.toml", bytes(range(128, 256))))]),
        BadInput("config: missing file", "nothing.toml", lambda f: ["run", str(f / "nothing.toml")]),
        BadInput("data: no data folder", "train.tsv", lambda f: ["run", str(BASE), "--data-dir", str(f / "none"),
                                                                  "--output-dir", str(f / "runs")]),
        BadInput("data: a stray field", "train.tsv", _glue(data_dir, lambda r: _with_row(r, 5, r[5] + "\tstray"))),
        BadInput("data: header only", "train.tsv", _glue(data_dir, lambda r: r[:1])),
        BadInput("data: a float label", "label", _glue(data_dir, lambda r: _with_row(r, 7, r[7].rsplit("\t", 1)[0] + "\t0.5"))),
        BadInput("data: an empty text", "empty text", _glue(data_dir, lambda r: _with_row(r, 3, "\t1"))),
        BadInput("compare: --seeds 0", "--seeds", lambda _: ["compare", str(BASE), "--seeds", "0"]),
        BadInput("compare: --methods ,", "method", lambda _: ["compare", str(BASE), "--methods", ","]),
        BadInput("run: --engine bogus", "--engine", lambda f: ["run", str(_config_with(f, data_dir, "", None)),
                                                              "--engine", "bogus", "--output-dir", str(f / "runs")]),
        BadInput("run: no config", "CONFIG", lambda _: ["run"]),
        BadInput("resume: not a run", "not a run directory", lambda f: ["run", "--resume", str(f)]),
        BadInput("resume: with --epsilon", "--epsilon", _damaged(lambda run: None, "--epsilon", "10")),
        BadInput("resume: checkpoint {}", "checkpoint.json",
                 _damaged(lambda run: (run / "checkpoint.json").write_text("{}"))),
        BadInput("resume: truncated tensors", "checkpoint.json", _damaged(_truncate_tensors)),
        BadInput("resume: edited config.json", "privacy.epsilon", _damaged(_edit_config)),
        BadInput("resume: metrics without a checkpoint", "checkpoint.json",
                 _damaged(lambda run: (run / "checkpoint.json").unlink())),
        BadInput("resume: --rounds below the plan", "--rounds", _damaged(lambda run: None, "--rounds", "1")),
        BadInput("output: a file in the way", "runs", lambda f: ["run", str(REPO / "configs" / "synthetic.toml"),
                                                                 "--output-dir", str(_write(f / "runs", "x"))]),
    ]
    return cases


def _write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return path


# Keys whose value is a number or a boolean: a string, a list or a non-finite number is always wrong there.
def numeric_keys() -> list[tuple[str, str]]:
    """(section or '', key) of every numeric or boolean setting of the tests' config."""
    raw = load_config(BASE).model_dump(mode="json")
    keys = [("", k) for k, v in raw.items() if isinstance(v, int | float) and not isinstance(v, dict)]
    for section, body in raw.items():
        if isinstance(body, dict) and section != "per_method":
            keys += [(section, k) for k, v in body.items() if isinstance(v, int | float)]
    return keys


WRONG_VALUES = ['"3"', '"true"', "[1, 2]", "{ a = 1 }", "nan", "inf", "-inf", '""']


def fuzzed(data_dir: Path, n: int, seed: int = 0) -> list[BadInput]:
    """`n` seeded mutations: one numeric or boolean key set to a value of the wrong type."""
    rng = random.Random(seed)
    keys = numeric_keys()
    return [mutation(data_dir, *rng.choice(keys), rng.choice(WRONG_VALUES)) for _ in range(n)]


def mutation(data_dir: Path, section: str, key: str, value: str) -> BadInput:
    """The tests' config with `key` of `section` ('' = top level) set to the TOML text `value`;
    a non-finite number is a valid float, so a boolean key gets a string instead."""
    default = load_config(BASE).model_dump(mode="json")
    if value in ("nan", "inf", "-inf") and isinstance(default[section][key] if section else default[key], bool):
        value = '"yes"'
    subject = f"{section}.{key}" if section else key
    return BadInput(f"fuzz: {subject} = {value}", subject, _run_with(data_dir, f"{key} = {value}", section or None))


def attempt(case: BadInput, folder: Path) -> Outcome:
    folder.mkdir(parents=True, exist_ok=True)
    result = CliRunner().invoke(app, case.args(folder))
    text = result.output + ("".join(_traceback(result)) if result.exception and result.exit_code != 2 else "")
    return Outcome(case, result.exit_code, text)


def _traceback(result: object) -> list[str]:
    import traceback

    exc = result.exception  # type: ignore[attr-defined]
    if exc is None or isinstance(exc, SystemExit):
        return []
    return ["Traceback (most recent call last):\n", *traceback.format_exception(exc)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fuzz", type=int, default=200, help="seeded random config mutations to add")
    add_data_dir(parser)
    args = parser.parse_args()
    data_dir = Path(args.data_dir)
    cases = corpus(data_dir) + fuzzed(data_dir, args.fuzz)
    with tempfile.TemporaryDirectory() as tmp:
        outcomes = [attempt(case, Path(tmp) / f"case{i}") for i, case in enumerate(cases)]
    unclear = [o for o in outcomes if not o.clear]
    table = Table(title="bad inputs without a clear message" if unclear else "every bad input got a clear message")
    for column in ("case", "exit", "message"):
        table.add_column(column)
    for o in unclear:
        table.add_row(o.case.name, str(o.exit_code), re.sub(r"\s+", " ", o.message)[:200])
    console = Console(width=200)
    console.print(table)
    hand = [o for o in outcomes if not o.case.name.startswith("fuzz:")]
    for label, group in (("hand-made corpus", hand), ("fuzzed configs", [o for o in outcomes if o not in hand])):
        clear = sum(o.clear for o in group)
        console.print(f"{label}: {len(group)} bad inputs, {clear} with a clear message ({100 * clear / max(len(group), 1):.1f} %)")


if __name__ == "__main__":
    main()
