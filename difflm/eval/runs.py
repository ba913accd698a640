"""Reading `difflm generate` runs: the outputs JSON, its manifest, and the eval results beside it.

A run is the file set `difflm generate -o OUT.json` writes::

    OUT.json                  the records (a JSON list: id, instruction, output, generator, dataset, ...)
    OUT.json.manifest.json    model, decode settings, device, NFE, content tokens, speed, versions
    OUT.json.config.yaml      the resolved recipe

and the results the `difflm eval` commands add next to it::

    OUT.json.gsm8k.json       difflm eval gsm8k    (accuracy, stderr, per-item results)
    OUT.json.alpaca.json      difflm eval alpaca   (win rate, LC win rate, standard errors)
    OUT.json.fluency.json     difflm eval fluency  (repetition, diversity, lengths, position curve)

`find_runs(paths)` accepts output files and folders (every ``*.json`` with a ``.manifest.json`` beside it,
searched recursively).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from difflm.errors import ConfigError

__all__ = ["EVAL_SUFFIXES", "Run", "file_digest", "find_runs", "load_run", "manifest_path", "results_path"]

#: The results files of each eval command, as suffixes of the outputs file name.
EVAL_SUFFIXES = ("gsm8k", "alpaca", "fluency")
_SIDE_SUFFIXES = (".manifest.json", ".config.yaml") + tuple(f".{s}.json" for s in EVAL_SUFFIXES)


def manifest_path(output: str | Path) -> Path:
    output = Path(output)
    return output.with_name(output.name + ".manifest.json")


def results_path(output: str | Path, task: str) -> Path:
    """Where `difflm eval TASK` writes its results for OUT.json: OUT.json.TASK.json."""
    output = Path(output)
    return output.with_name(f"{output.name}.{task}.json")


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes (results files record the digest of the outputs they scored)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file ({what})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: invalid JSON in {what} ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e})") from None


@dataclass
class Run:
    """One generate run: records, manifest (None when absent) and the eval results found beside it."""

    output_path: Path
    records: list[dict]
    manifest: dict | None
    manifest_path: Path | None
    results: dict[str, dict] = field(default_factory=dict)  #: task -> results JSON
    results_paths: dict[str, Path] = field(default_factory=dict)
    #: task -> results file that scored another version of the outputs (its outputs_sha256 differs): ignored
    stale: dict[str, Path] = field(default_factory=dict)
    digest: str = ""  #: sha256 of the outputs file

    @property
    def label(self) -> str:
        """A short name: the generator field when all records share one, else the file stem."""
        gens = {r.get("generator") for r in self.records}
        if len(gens) == 1 and None not in gens:
            return str(next(iter(gens)))
        return self.output_path.stem

    def settings(self) -> dict[str, Any]:
        """The manifest fields that say what was run (for results files and reports)."""
        m = self.manifest or {}
        decode = dict(m.get("decode") or {})
        return {
            "model": m.get("model"),
            "adapter": m.get("adapter"),
            "method": decode.get("method"),
            "steps": decode.get("steps"),
            "gen_length": decode.get("gen_length"),
            "block_length": decode.get("block_length"),
            "kernel_size": decode.get("kernel_size"),
            "top_k": decode.get("top_k"),
            "temperature": decode.get("temperature"),
            "eos_fill": decode.get("eos_fill"),
            "seed": m.get("seed", decode.get("seed")),
            "prompt_format": m.get("prompt_format"),
            "device": m.get("device"),
        }


def load_run(output: str | Path, require_manifest: bool = False) -> Run:
    """Load OUT.json (a JSON list of records with ``output``), its manifest and any eval results.

    Raises ConfigError for a missing or malformed file (records must be objects with a string
    ``output``), and for a missing manifest when `require_manifest`.
    """
    path = Path(output)
    if path.is_dir():
        raise ConfigError(f"{path} is a folder; give the outputs JSON written by difflm generate", key="outputs")
    data = _read_json(path, "generate outputs")
    if not isinstance(data, list):
        raise ConfigError(f"{path}: expected a JSON list of records (difflm generate output), got {type(data).__name__}")
    for i, r in enumerate(data):
        if not isinstance(r, dict) or not isinstance(r.get("output"), str):
            raise ConfigError(f"{path}: record {i} has no string 'output' (is this a difflm generate output?)")
    mpath = manifest_path(path)
    manifest = _read_json(mpath, "run manifest") if mpath.is_file() else None
    if manifest is None and require_manifest:
        raise ConfigError(f"{path}: no manifest beside it ({mpath.name}); was it written by difflm generate?")
    run = Run(path, data, manifest, mpath if manifest is not None else None, digest=file_digest(path))
    for task in EVAL_SUFFIXES:
        rp = results_path(path, task)
        if rp.is_file():
            res = _read_json(rp, f"{task} results")
            if isinstance(res, dict) and res.get("outputs_sha256") not in (None, run.digest):
                run.stale[task] = rp
                continue
            run.results[task] = res
            run.results_paths[task] = rp
    return run


def _is_outputs_file(p: Path) -> bool:
    return p.suffix == ".json" and not p.name.endswith(_SIDE_SUFFIXES) and manifest_path(p).is_file()


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Output files named in `paths`, and those found in folders (recursively: each ``*.json`` with a
    manifest beside it), in the order given (sorted within a folder), without duplicates."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            hits = sorted(q for q in p.rglob("*.json") if _is_outputs_file(q))
            if not hits:
                raise ConfigError(f"{p}: no difflm generate outputs (OUT.json with OUT.json.manifest.json) in the folder")
            found.extend(hits)
        elif p.is_file():
            found.append(p)
        else:
            raise ConfigError(f"{p}: no such file or folder", key="runs")
    out, seen = [], set()
    for p in found:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out
