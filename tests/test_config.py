"""difflm.config: typed recipes, overrides, YAML files, validation, round trips."""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from difflm.config import (
    check,
    dump_yaml,
    from_dict,
    load_recipe,
    parse_overrides,
    save_resolved,
    to_dict,
)
from difflm.errors import ConfigError


class Device(enum.Enum):
    CPU = "cpu"
    CUDA = "cuda"


@dataclass
class Decode:
    steps: int = field(default=128, metadata={"help": "denoising steps", "min": 1})
    top_k: int | None = field(default=20, metadata={"min": 1})
    temperature: float = field(default=1.0, metadata={"min": 0.0, "max": 10.0})
    sampler: Literal["conv", "topk", "llada"] = "conv"
    remasking: str = field(default="low_confidence", metadata={"choices": ["low_confidence", "random"]})
    eos_fill: bool = True
    stop_ids: list[int] = field(default_factory=list)
    t_on: float = 0.55
    t_off: float = 0.05

    def validate(self) -> None:
        if self.t_off >= self.t_on:
            raise ConfigError(f"must be < t_on ({self.t_on}), got {self.t_off}", key="t_off")


@dataclass
class Model:
    name: str  # required
    device: Device = Device.CPU
    adapter: Path | None = None


@dataclass
class Recipe:
    model: Model
    decode: Decode = field(default_factory=Decode)
    prompts: list[str] = field(default_factory=lambda: ["hi"])
    seed: int = 0
    lr: float = 2.5e-5
    tags: dict[str, int] = field(default_factory=dict)

    def validate(self) -> None:
        if self.seed < 0:
            raise ConfigError("must be >= 0", key="seed")


@dataclass
class Unkeyed:
    x: int = 0

    def validate(self) -> None:
        if self.x == 13:
            raise ValueError("unlucky")


@dataclass
class Outer:
    inner: Unkeyed = field(default_factory=Unkeyed)


def err(fn, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    return str(info.value)


# --- from_dict: building and types ------------------------------------------------------------


def test_nested_defaults_and_values():
    cfg = from_dict(Recipe, {"model": {"name": "tiny"}, "decode": {"steps": 64, "sampler": "llada"}})
    assert cfg.model.name == "tiny" and cfg.model.device is Device.CPU
    assert cfg.decode.steps == 64 and cfg.decode.sampler == "llada"
    assert cfg.decode.top_k == 20 and cfg.prompts == ["hi"]


def test_missing_required_key():
    assert err(from_dict, Recipe, {}) == "model: required key is missing"
    assert err(from_dict, Recipe, {"model": {}}) == "model.name: required key is missing"


def test_wrong_types_name_the_dotted_key():
    assert err(from_dict, Recipe, {"model": {"name": "m"}, "decode": {"steps": "abc"}}) == (
        "decode.steps: expected int, got 'abc'"
    )
    assert "decode.steps: expected int, got 64.0" in err(
        from_dict, Recipe, {"model": {"name": "m"}, "decode": {"steps": 64.0}}
    )
    assert err(from_dict, Recipe, {"model": {"name": "m"}, "decode": 5}) == (
        "decode: expected a mapping of keys, got 5"
    )
    assert err(from_dict, Recipe, {"model": {"name": ["a"]}}) == "model.name: expected str, got ['a']"


def test_int_promoted_to_float_and_numeric_strings():
    cfg = from_dict(Recipe, {"model": {"name": "m"}, "lr": 1, "decode": {"temperature": 0}})
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert isinstance(cfg.decode.temperature, float)
    assert from_dict(Recipe, {"model": {"name": "m"}, "lr": "1e-5"}).lr == 1e-5
    assert "lr: expected float, got 'fast'" in err(from_dict, Recipe, {"model": {"name": "m"}, "lr": "fast"})
    assert "lr: expected float, got True" in err(from_dict, Recipe, {"model": {"name": "m"}, "lr": True})


def test_bool_is_strict():
    base = {"model": {"name": "m"}}
    for ok, want in [(True, True), (False, False), ("true", True), ("False", False)]:
        assert from_dict(Recipe, {**base, "decode": {"eos_fill": ok}}).decode.eos_fill is want
    for bad in (1, 0, "yes", "1", None):
        assert err(from_dict, Recipe, {**base, "decode": {"eos_fill": bad}}).startswith(
            "decode.eos_fill: expected bool, got"
        )
    # and a bool is not an int
    assert err(from_dict, Recipe, {**base, "seed": True}) == "seed: expected int, got True"


def test_optional():
    base = {"model": {"name": "m"}}
    assert from_dict(Recipe, {**base, "decode": {"top_k": None}}).decode.top_k is None
    assert from_dict(Recipe, {**base, "decode": {"top_k": 5}}).decode.top_k == 5
    assert err(from_dict, Recipe, {**base, "decode": {"top_k": "x"}}) == "decode.top_k: expected int, got 'x'"
    assert err(from_dict, Recipe, {**base, "decode": {"steps": None}}) == "decode.steps: expected int, got None"
    cfg = from_dict(Recipe, {"model": {"name": "m", "adapter": "out/lora"}})
    assert cfg.model.adapter == Path("out/lora")


def test_literal_and_enum():
    base = {"model": {"name": "m"}}
    msg = err(from_dict, Recipe, {**base, "decode": {"sampler": "cnv"}})
    assert msg == "decode.sampler: must be one of 'conv', 'topk', 'llada', got 'cnv' (did you mean 'conv'?)"
    assert from_dict(Recipe, {"model": {"name": "m", "device": "cuda"}}).model.device is Device.CUDA
    assert from_dict(Recipe, {"model": {"name": "m", "device": "CUDA"}}).model.device is Device.CUDA
    assert err(from_dict, Recipe, {"model": {"name": "m", "device": "tpu"}}) == (
        "model.device: must be one of 'cpu', 'cuda', got 'tpu'"
    )


def test_list_and_dict_types():
    base = {"model": {"name": "m"}}
    cfg = from_dict(Recipe, {**base, "decode": {"stop_ids": [1, 2]}, "prompts": ["a", "b"], "tags": {"x": 1}})
    assert cfg.decode.stop_ids == [1, 2] and cfg.prompts == ["a", "b"] and cfg.tags == {"x": 1}
    assert err(from_dict, Recipe, {**base, "decode": {"stop_ids": [1, "b"]}}) == (
        "decode.stop_ids[1]: expected int, got 'b'"
    )
    assert err(from_dict, Recipe, {**base, "decode": {"stop_ids": 3}}) == (
        "decode.stop_ids: expected list[int], got 3"
    )
    assert err(from_dict, Recipe, {**base, "prompts": [None]}) == "prompts[0]: expected str, got None"
    assert err(from_dict, Recipe, {**base, "tags": {"x": "y"}}) == "tags.x: expected int, got 'y'"


def test_str_accepts_yaml_numbers():
    assert from_dict(Recipe, {"model": {"name": 2024}}).model.name == "2024"
    assert err(from_dict, Recipe, {"model": {"name": True}}) == "model.name: expected str, got True"


def test_unknown_key_suggests_the_closest():
    msg = err(from_dict, Recipe, {"model": {"name": "m"}, "decode": {"stpes": 3}})
    assert msg.startswith("unknown key 'decode.stpes' (did you mean 'decode.steps'?); allowed: steps, top_k")
    msg = err(from_dict, Recipe, {"model": {"name": "m"}, "zzz": 1})
    assert msg == "unknown key 'zzz'; allowed: model, decode, prompts, seed, lr, tags"


def test_metadata_min_max_choices():
    base = {"model": {"name": "m"}}
    assert err(from_dict, Recipe, {**base, "decode": {"top_k": 0}}) == "decode.top_k: must be >= 1, got 0"
    assert err(from_dict, Recipe, {**base, "decode": {"temperature": 11}}) == (
        "decode.temperature: must be <= 10.0, got 11.0"
    )
    assert err(from_dict, Recipe, {**base, "decode": {"remasking": "lowest"}}) == (
        "decode.remasking: must be one of 'low_confidence', 'random', got 'lowest'"
    )


def test_validate_chaining_with_dotted_keys():
    base = {"model": {"name": "m"}}
    assert err(from_dict, Recipe, {**base, "decode": {"t_on": 0.55, "t_off": 0.9}}) == (
        "decode.t_off: must be < t_on (0.55), got 0.9"
    )
    assert err(from_dict, Recipe, {**base, "seed": -1}) == "seed: must be >= 0"
    # a plain ValueError without key gets the nested object's key
    assert err(from_dict, Outer, {"inner": {"x": 13}}) == "inner: unlucky"
    # defaults that are never mentioned are validated too
    cfg = from_dict(Recipe, base)
    cfg.decode.t_off = 0.9
    assert err(check, cfg) == "decode.t_off: must be < t_on (0.55), got 0.9"
    # the prefix argument
    assert err(from_dict, Decode, {"top_k": 0}, prefix="gen.decode") == "gen.decode.top_k: must be >= 1, got 0"


def test_round_trip_to_dict_from_dict(tmp_path):
    cfg = from_dict(
        Recipe,
        {"model": {"name": "m", "device": "cuda", "adapter": "a/b"}, "decode": {"stop_ids": [7]}, "lr": 1e-5},
    )
    data = to_dict(cfg)
    assert data["model"] == {"name": "m", "device": "cuda", "adapter": "a/b"}
    assert from_dict(Recipe, data) == cfg
    path = tmp_path / "sub" / "resolved.yaml"
    save_resolved(cfg, path)
    assert path.read_text() == dump_yaml(cfg)
    assert load_recipe(Recipe, path) == cfg
    assert [p.name for p in path.parent.iterdir()] == ["resolved.yaml"]  # no temp file left


# --- overrides --------------------------------------------------------------------------------


def test_parse_overrides_values_and_nesting():
    got = parse_overrides(
        ["decode.steps=64", "model.name=foo", "x.y=null", "a=0.5", "b=true", "c=[1, 2]", "d=1e-5", "e=", "f=a=b"]
    )
    assert got == {
        "decode": {"steps": 64},
        "model": {"name": "foo"},
        "x": {"y": None},
        "a": 0.5,
        "b": True,
        "c": [1, 2],
        "d": 1e-5,
        "e": "",
        "f": "a=b",
    }
    assert parse_overrides(["a.b=1", "a.c=2", "a.b=3"]) == {"a": {"b": 3, "c": 2}}
    assert parse_overrides(None) == {}


@pytest.mark.parametrize("bad", ["decode.steps", "=3", "a..b=1", ".a=1"])
def test_parse_overrides_bad_syntax_names_the_argument(bad):
    assert f"bad override {bad!r}: expected KEY=VALUE" in err(parse_overrides, [bad])


def test_parse_overrides_bad_yaml_and_conflicts():
    assert "bad value in override 'c=[1, 2'" in err(parse_overrides, ["c=[1, 2"])
    assert "override 'a.b=2' conflicts with a=..." in err(parse_overrides, ["a=1", "a.b=2"])


# --- load_recipe -----------------------------------------------------------------------------


def test_load_recipe_precedence(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model:\n  name: from-file\ndecode:\n  steps: 10\n  top_k: 3\nlr: 1e-5\n")
    cfg = load_recipe(Recipe, str(path))
    assert (cfg.model.name, cfg.decode.steps, cfg.decode.top_k, cfg.lr) == ("from-file", 10, 3, 1e-5)
    cfg = load_recipe(
        Recipe,
        path,
        ["decode.steps=64"],
        cli_values={"decode": {"steps": 32, "top_k": 5}, "model.name": "cli", "seed": None},
    )
    assert cfg.decode.steps == 64  # override beats option beats file
    assert cfg.decode.top_k == 5 and cfg.model.name == "cli"
    assert cfg.seed == 0  # None in cli_values means "not given"
    assert load_recipe(Recipe, None, ["model.name=x"]).model.name == "x"
    assert "decode.steps: expected int, got 'abc'" in err(load_recipe, Recipe, path, ["decode.steps=abc"])


def test_load_recipe_file_errors(tmp_path):
    missing = tmp_path / "nope.yaml"
    assert err(load_recipe, Recipe, missing) == f"recipe file not found: {missing}"
    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  name: [unclosed\n")
    msg = err(load_recipe, Recipe, broken)
    assert msg.startswith(f"{broken}: invalid YAML (line ")
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    assert err(load_recipe, Recipe, listy) == f"{listy}: the top level must be a mapping of keys, got list"
    assert "cannot read recipe file" in err(load_recipe, Recipe, tmp_path)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_recipe(Decode, empty) == Decode()


def test_yaml_dates_stay_strings(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model:\n  name: 2024-01-02\n")
    assert load_recipe(Recipe, path).model.name == "2024-01-02"


def test_save_resolved_replaces_atomically(tmp_path, monkeypatch):
    path = tmp_path / "cfg.yaml"
    path.write_text("old\n")
    calls = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (calls.append((a, b)), real(a, b)))
    save_resolved(Decode(steps=7), path)
    assert calls and os.path.dirname(calls[0][0]) == str(tmp_path) and str(calls[0][1]) == str(path)
    assert load_recipe(Decode, path).steps == 7


def test_config_imports_without_typer_or_rich():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['typer'] = None; sys.modules['rich'] = None; "
        "import difflm.config; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


@pytest.mark.parametrize("text,key,line,first", [
    ("seed: 1\nmodel:\n  name: a\nseed: 2\n", "seed", 4, 1),                              # top level
    ("model:\n  name: a\ndecode:\n  steps: 4\n  top_k: 2\n  steps: 8\n", "steps", 6, 4),  # nested
    ("model:\n  name: a\ntags:\n  x: 1\n  x: 1\n", "x", 5, 4),                           # same value twice
    ("model: {name: a, name: b}\n", "name", 1, 1),                                        # flow mapping
], ids=["top-level", "nested", "same-value", "flow"])
def test_duplicate_yaml_key_is_refused_naming_key_file_and_line(tmp_path, text, key, line, first):
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    msg = err(load_recipe, Recipe, path)
    assert "\n" not in msg and msg.startswith(f"{path}: invalid YAML (line {line}, ")
    assert f"duplicate key '{key}' (first given on line {first})" in msg


def test_yaml_merge_key_may_be_overridden(tmp_path):
    from difflm.config import load_yaml

    path = tmp_path / "merge.yaml"
    path.write_text("model:\n  name: a\ndecode:\n  <<: {steps: 4, top_k: 2}\n  steps: 8\n")
    assert load_yaml(path)["decode"] == {"steps": 8, "top_k": 2}
    assert load_recipe(Recipe, path).decode.steps == 8


def test_duplicate_yaml_key_fails_the_cli_with_one_line(tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    path = tmp_path / "gen.yaml"
    path.write_text(f"model:\n  name: {tmp_path / 'no-model'}\ndecode:\n  method: llada\n  steps: 4\n  gen_length: 8\n"
                    "  steps: 8\ndata:\n  prompts: [hi]\n")
    res = CliRunner().invoke(app, ["generate", "-r", str(path), "-o", str(tmp_path / "o.json"), "-q"])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "duplicate key 'steps'" in lines[0] and "line 7" in lines[0], lines
    assert "Traceback" not in res.output and not (tmp_path / "o.json").exists()
