"""`difflm sweep`: a 2x2 grid on the embedded tiny-math model, resume after deleting a point or interrupting
one, and bad values failing before anything is generated."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cli.main import app
from difflm.errors import ConfigError
from difflm.sweep import plan_sweep, run_sweep, split_sweep_args

runner = CliRunner()
BASE = ["-m", "tiny-math", "-p", "What is 2 + 3?", "-p", "Tom has 3 apples and eats one. How many are left?",
        "--gen-length", "12", "--steps", "4", "--batch-size", "1", "-q"]
GRID = ["decode.kernel_size=3,5", "decode.top_k=1,2", "decode.seed=7"]
NAMES = ["kernel_size=3_top_k=1", "kernel_size=3_top_k=2", "kernel_size=5_top_k=1", "kernel_size=5_top_k=2"]


def _sweep(out: Path, *extra: str):
    return runner.invoke(app, ["sweep", *BASE, "-o", str(out), *GRID, *extra])


def _outputs(out: Path) -> dict[str, list[str]]:
    return {n: [r["output"] for r in json.loads((out / f"{n}.json").read_text())] for n in NAMES}


def test_split_sweep_args():
    fixed, swept = split_sweep_args(["decode.steps=64", "decode.kernel_size=32, 64,128",
                                     "decode.suppress_tokens=[1,2]", "a.b=[1,2],[3]", "data.prompt_format='x,y'",
                                     "c=1,2,1"])
    assert fixed == ["decode.steps=64", "decode.suppress_tokens=[1,2]", "data.prompt_format='x,y'"]
    assert swept == {"decode.kernel_size": ["32", "64", "128"], "a.b": ["[1,2]", "[3]"], "c": ["1", "2"]}
    for bad, needle in ((["x=1,,2"], "empty value"), (["x=1", "x=2,3"], "given twice"),
                        (["output=a,b"], "set by the sweep"), (["nokey"], "KEY=VALUE")):
        with pytest.raises(ConfigError, match=needle):
            split_sweep_args(bad)


def test_two_by_two_sweep_writes_one_run_per_point_and_resumes(tmp_path):
    out = tmp_path / "sweep"
    res = _sweep(out)
    assert res.exit_code == 0, res.output
    first = _outputs(out)
    for n in NAMES:
        man = json.loads((out / f"{n}.json.manifest.json").read_text())
        k, top = n.split("_top_k=")
        assert man["sweep_point"] == {"decode.kernel_size": int(k.split("=")[1]), "decode.top_k": int(top)}
        assert man["decode"]["kernel_size"] == man["sweep_point"]["decode.kernel_size"]
        assert man["decode"]["top_k"] == man["sweep_point"]["decode.top_k"]
        assert man["decode"]["seed"] == 7 and man["decode"]["steps"] == 4 and man["items"] == 2
    index = yaml.safe_load((out / "sweep.yaml").read_text())
    assert index["keys"] == ["decode.kernel_size", "decode.top_k"] and index["values"]["decode.top_k"] == [1, 2]
    assert [p["status"] for p in index["points"]] == ["done"] * 4
    # the same point by difflm generate itself: the same records (the sweep runs generate's code path)
    gen = tmp_path / "gen.json"
    assert runner.invoke(app, ["generate", *BASE, "-o", str(gen), "decode.kernel_size=5", "decode.top_k=2",
                               "decode.seed=7"]).exit_code == 0
    assert [r["output"] for r in json.loads(gen.read_text())] == first[NAMES[3]]
    # delete one point: a rerun generates only it, again the same, and leaves the others' files untouched
    stamps = {n: (out / f"{n}.json").stat().st_mtime_ns for n in NAMES}
    (out / f"{NAMES[1]}.json").unlink()
    (out / f"{NAMES[1]}.json.manifest.json").unlink()
    res = _sweep(out)
    assert res.exit_code == 0, res.output
    assert _outputs(out) == first
    for n in NAMES:
        assert ((out / f"{n}.json").stat().st_mtime_ns == stamps[n]) == (n != NAMES[1]), n
    # a finished point made with other settings is refused (exit 2, one line) unless --overwrite
    res = runner.invoke(app, ["sweep", *BASE, "--steps", "8", "-o", str(out), *GRID])
    assert res.exit_code == 2 and "other settings (decode.steps)" in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1


def test_a_half_finished_point_resumes_through_generate(tmp_path):
    from difflm.generation import _all_partials

    out = tmp_path / "sweep"
    args = ["decode.kernel_size=3,5", "decode.gen_length=12", "decode.steps=4", "batch_size=1",
            "model.name=tiny-math", "decode.seed=3"]
    cli = {"data": {"prompts": ["What is 2 + 3?", "What is 4 + 4?"]}}
    full = run_sweep(plan_sweep(None, args, tmp_path / "full", cli_values=cli), tmp_path / "full")

    def stop(recs):
        raise KeyboardInterrupt

    points = plan_sweep(None, args, out, cli_values=cli)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(points[:1], out, on_batch=stop)  # interrupted after the first item of the first point
    assert _all_partials(out / "kernel_size=3.json")
    points = plan_sweep(None, args, out, cli_values=cli)
    assert [p.status for p in points] == ["partial", "todo"]
    seen = {}
    run_sweep(points, out, on_start=lambda total, done: seen.setdefault("first", (total, done)))
    assert seen["first"] == (2, 1)  # one item was already done
    for name in ("kernel_size=3", "kernel_size=5"):  # the resumed point equals the uninterrupted one
        assert [r["output"] for r in json.loads((out / f"{name}.json").read_text())] == [
            r["output"] for r in json.loads((tmp_path / "full" / f"{name}.json").read_text())]
    assert [m["sweep_point"] for m in full] == [{"decode.kernel_size": 3}, {"decode.kernel_size": 5}]


@pytest.mark.parametrize("grid, needle", [
    (["decode.kernel_size=3,0"], "sweep point decode.kernel_size=0: decode.kernel_size: must be >= 1, got 0"),
    (["decode.kernal_size=3,5"], "did you mean 'decode.kernel_size'"),
    (["decode.top_k=1,two"], "decode.top_k=two"),
    (["decode.method=conv,nucleus"], "decode.method=nucleus"),
    (["decode.steps=4"], "nothing to sweep"),
])
def test_a_bad_value_in_any_point_fails_before_generation(tmp_path, grid, needle):
    out = tmp_path / "sweep"
    res = runner.invoke(app, ["sweep", *BASE, "-o", str(out), *grid])
    assert res.exit_code == 2, res.output
    assert needle in res.output and len(res.output.strip().splitlines()) == 1, res.output
    assert not out.exists()  # nothing generated, nothing written
