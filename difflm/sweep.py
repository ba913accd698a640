"""`difflm sweep`: `difflm generate` over a grid of recipe keys, one output file per point, resumable.

    difflm sweep --recipe recipes/generate-gsm8k.yaml -o runs/sweep-k decode.kernel_size=32,64,128 decode.steps=32,64

Trailing arguments are the generate command's ``KEY=VALUE`` overrides; a value with a top-level comma
(outside brackets and quotes) is a *swept* key: ``KEY=V1,V2,...`` (each value read as YAML, as overrides
are). Several swept keys make their product, in the order given (the last key varies fastest); plain
``KEY=V`` overrides apply to every point. A string value holding a comma is quoted: ``KEY='"a,b"'``.

Each point is a full `GenerateRecipe` (defaults <- recipe file <- options <- fixed overrides <- the point's
values), written by `difflm.generation.run_generate` to ``DIR/<name>.json`` (+ manifest + config), where
<name> joins ``key=value`` for the swept keys (the last part of each dotted key unless two keys share it),
e.g. ``kernel_size=64_steps=32.json``. Each manifest carries ``sweep_point`` ({dotted key: value}).
``DIR/sweep.yaml`` lists the keys, the points, their files and their status.

Every point is built and checked (types, ranges, decoder vs model family, the prompts) before any
generation: a bad value anywhere fails the whole sweep at once. Resume, point by point: a point whose
output and manifest exist with the same ``sweep_point`` and settings is skipped; a half-finished one (its
partial file) resumes inside `run_generate`; a finished point made with other settings is refused unless
``overwrite``. The model is loaded once and shared by all points unless a ``model.*`` key is swept.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from difflm.config import load_recipe, load_yaml, parse_overrides, to_dict
from difflm.errors import ConfigError

__all__ = ["SweepPoint", "plan_sweep", "run_sweep", "split_sweep_args"]

#: recipe keys a sweep may not set (the sweep owns them)
_RESERVED = ("output", "overwrite")
INDEX_NAME = "sweep.yaml"


@dataclass
class SweepPoint:
    index: int
    values: dict[str, Any]  #: dotted key -> value (as YAML read it)
    raw: dict[str, str]  #: dotted key -> the value's text
    name: str  #: the file stem
    recipe: Any  #: GenerateRecipe
    status: str = "todo"  #: todo | partial | done
    manifest: dict | None = field(default=None, repr=False)

    @property
    def output(self) -> Path:
        return Path(self.recipe.output)


def _split_top_level(text: str) -> list[str]:
    """Split at commas outside brackets, braces and quotes."""
    parts, depth, quote, cur = [], 0, None, []
    for ch in text:
        if quote:
            if ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    parts.append("".join(cur))
    return parts


def split_sweep_args(args: Sequence[str]) -> tuple[list[str], dict[str, list[str]]]:
    """(fixed ``KEY=VALUE`` overrides, {swept key: [value texts]}) of the trailing arguments.

    ConfigError for a malformed argument, an empty value in a list, a key given twice, or a reserved key
    (output, overwrite). A value repeated in one key's list is kept once."""
    fixed: list[str] = []
    swept: dict[str, list[str]] = {}
    seen: set[str] = set()
    for arg in args:
        key, sep, text = arg.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"bad argument {arg!r}: expected KEY=VALUE or KEY=V1,V2,... (e.g. decode.kernel_size=32,64)")
        if key in seen:
            raise ConfigError(f"key {key} is given twice; give one KEY=V1,V2,... per key", key=key)
        seen.add(key)
        if key in _RESERVED:
            raise ConfigError(f"{key} is set by the sweep itself (-o DIR, --overwrite); do not pass it as KEY=VALUE",
                              key=key)
        parts = _split_top_level(text)
        if len(parts) == 1:
            parse_overrides([arg])  # the key's syntax and the value's YAML
            fixed.append(arg)
            continue
        vals = [p.strip() for p in parts]
        if any(v == "" for v in vals):
            raise ConfigError(f"{key}: empty value in the list {text!r}", key=key)
        parsed = [json.dumps(parse_overrides([f"{key}={v}"]), sort_keys=True) for v in vals]
        # a value given twice is one point (scripts that scale a grid down may produce repeats)
        swept[key] = [v for i, (v, pv) in enumerate(zip(vals, parsed)) if pv not in parsed[:i]]
    return fixed, swept


def _value(key: str, text: str) -> Any:
    node: Any = parse_overrides([f"{key}={text}"])
    for part in key.split("."):
        node = node[part]
    return node


def _slug(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    return re.sub(r"[^A-Za-z0-9.+-]", "_", text) or "_"


def _point_names(keys: list[str], combos: list[tuple[Any, ...]]) -> list[str]:
    last = [k.rsplit(".", 1)[-1] for k in keys]
    short = [lk if last.count(lk) == 1 else k for k, lk in zip(keys, last)]
    names = ["_".join(f"{s}={_slug(v)}" for s, v in zip(short, combo)) for combo in combos]
    counts: dict[str, int] = {}
    for n in names:
        counts[n] = counts.get(n, 0) + 1
    return [n if counts[n] == 1 else f"{n}-{i}" for i, n in enumerate(names)]


def plan_sweep(
    recipe_path: str | Path | None,
    args: Sequence[str],
    out_dir: str | Path,
    *,
    cli_values: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    check_items: bool = True,
) -> list[SweepPoint]:
    """Every point of the grid as a checked `GenerateRecipe` with its output path and status.

    Raises ConfigError (naming the point) for any bad value, before anything is generated or written."""
    from difflm.generation import GenerateRecipe, check_model_decoder, load_items

    fixed, swept = split_sweep_args(args)
    if not swept:
        raise ConfigError("nothing to sweep: give at least one KEY=V1,V2,... (e.g. decode.kernel_size=32,64,128)")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file; -o takes a folder for the sweep's outputs", key="output")
    keys = list(swept)
    raw_combos = list(itertools.product(*(swept[k] for k in keys)))
    combos = [tuple(_value(k, t) for k, t in zip(keys, combo)) for combo in raw_combos]
    names = _point_names(keys, combos)
    cli = dict(cli_values or {})
    points: list[SweepPoint] = []
    checked_data: set[str] = set()
    for i, (raw, vals, name) in enumerate(zip(raw_combos, combos, names)):
        where = ", ".join(f"{k}={t}" for k, t in zip(keys, raw))
        point_args = fixed + [f"{k}={t}" for k, t in zip(keys, raw)]
        try:
            recipe = load_recipe(GenerateRecipe, recipe_path, point_args,
                                 {**cli, "output": str(out / f"{name}.json"), "overwrite": overwrite})
            check_model_decoder(recipe)
            data_key = json.dumps(to_dict(recipe.data), sort_keys=True)
            if check_items and data_key not in checked_data:
                load_items(recipe.data)
                checked_data.add(data_key)
        except ConfigError as e:
            if recipe_path is not None and str(e).startswith(f"{recipe_path}"):
                raise
            raise ConfigError(f"sweep point {where}: {e}") from None
        p = SweepPoint(i, dict(zip(keys, vals)), dict(zip(keys, raw)), name, recipe)
        p.status = _status(p, overwrite)
        points.append(p)
    return points


def _status(p: SweepPoint, overwrite: bool) -> str:
    """todo | partial | done; ConfigError when a finished point or a partial one has other settings."""
    from difflm.generation import _all_partials, output_paths

    paths = output_paths(p.recipe.output)
    if overwrite:
        return "todo"
    where = f"sweep point {p.name} ({paths['output']})"
    if paths["output"].exists():
        if not paths["manifest"].exists():
            p.recipe.overwrite = True  # written but its manifest never was: generate it again
            return "todo"
        try:
            man = json.loads(paths["manifest"].read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ConfigError(f"{where}: unreadable manifest ({e}); pass --overwrite") from None
        if _norm(man.get("sweep_point")) != _norm(p.values):
            raise ConfigError(f"{where} holds another run (sweep_point {man.get('sweep_point')}); "
                              "use another -o folder or pass --overwrite")
        _check_same(p, paths["config"], where, "was generated")
        p.manifest = man
        return "done"
    if _all_partials(paths["output"]):
        _check_same(p, paths["config"], where, "is half-finished")
        return "partial"
    return "todo"


def _check_same(p: SweepPoint, config: Path, where: str, what: str) -> None:
    from difflm.generation import _RESUME_KEYS

    if not config.exists():
        return
    old, new = load_yaml(config), to_dict(p.recipe)
    diff = [f"{s}.{k}" for s in _RESUME_KEYS for k in new[s] if (old.get(s) or {}).get(k) != new[s][k]]
    if diff:
        raise ConfigError(f"{where} {what} with other settings ({', '.join(diff)}); rerun with the same settings "
                          "or pass --overwrite")


def _norm(v: Any) -> str:
    return json.dumps(v, sort_keys=True)


def write_index(points: Sequence[SweepPoint], out_dir: str | Path) -> Path:
    """DIR/sweep.yaml: the swept keys and every point (name, output, sweep_point, status), atomically."""
    import yaml

    from difflm.io import atomic_write_text

    keys = list(points[0].values) if points else []
    doc = {
        "keys": keys,
        "values": {k: list(dict.fromkeys(_norm(p.values[k]) for p in points)) for k in keys},
        "points": [{"name": p.name, "output": str(p.output), "sweep_point": p.values, "status": p.status}
                   for p in points],
    }
    doc["values"] = {k: [json.loads(v) for v in vs] for k, vs in doc["values"].items()}
    path = Path(out_dir) / INDEX_NAME
    atomic_write_text(path, yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))
    return path


def run_sweep(
    points: Sequence[SweepPoint],
    out_dir: str | Path,
    *,
    load_model: Callable[[Any], Any] | None = None,
    on_point: Callable[[SweepPoint], None] | None = None,
    on_start: Callable[[int, int], None] | None = None,
    on_batch: Callable[[list[dict]], None] | None = None,
) -> list[dict]:
    """Generate every point not done (see the module doc); returns the manifests in point order.

    `load_model(model_section)` loads a model (default `difflm.generation.load_recipe_model`); a model is
    reused while the next point's `model:` section is the same. `on_point(point)` before each point (its
    status says whether it is skipped); on_start / on_batch are run_generate's."""
    from difflm.generation import load_items, load_recipe_model, run_generate

    load = load_model or load_recipe_model
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    write_index(points, out_dir)
    model, model_key = None, None
    items_cache: dict[str, list[dict]] = {}
    manifests: list[dict] = []
    for p in points:
        if on_point:
            on_point(p)
        if p.status == "done":
            manifests.append(p.manifest or {})
            continue
        key = _norm(to_dict(p.recipe.model))
        if model is None or key != model_key:
            model = None  # free the previous one first
            model = load(p.recipe.model)
            model_key = key
        data_key = _norm(to_dict(p.recipe.data))
        if data_key not in items_cache:
            items_cache[data_key] = load_items(p.recipe.data)
        _, man = run_generate(p.recipe, model=model, items=items_cache[data_key], on_start=on_start,
                              on_batch=on_batch, manifest_extra={"sweep_point": p.values})
        p.status, p.manifest = "done", man
        manifests.append(man)
        write_index(points, out_dir)
    return manifests
