"""VaRM through mergekit on tiny Llama checkpoints, checked against an independent numpy VaRM."""

from __future__ import annotations

import csv
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner, Result
from mergekit.merge_methods import TensorGroup, get
from numeric import approx_at_scale, assert_close_at_scale
from varm_fixtures import (
    VOCAB,
    by_hand_matrix_weights,
    by_hand_merge,
    by_hand_scores,
    group_name,
    load_numpy,
    make_base,
    make_target,
    make_tied_family,
    make_wide_target,
    save_model,
    tiny_config,
)

from varm_merge import method
from varm_merge.cli import fill_placeholders, main
from varm_merge.weights import CSV_NAME, JSON_NAME, PNG_NAME, distinct_names

REPO = Path(__file__).resolve().parent.parent
ZEROED = ("model.norm.weight", "model.layers.1.input_layernorm.weight")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("varm_models")
    base = make_base(root / "base")
    make_target(root / "t1", base, seed=1)
    make_target(root / "t2", base, seed=2, zero=ZEROED)
    make_wide_target(root / "wide", base, seed=3, extra=8)
    nan = make_target(root / "nan", base, seed=4)
    nan["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")
    save_model(root / "nan", nan, tiny_config())
    shutil.copytree(root / "base", root / "base_copy")
    return {p.name: p for p in root.iterdir()}


def write_config(path: Path, base: Path | None, targets: list[Path], **extra) -> Path:
    config = {"merge_method": "varm", "models": [{"model": str(t)} for t in targets], "dtype": "float32"}
    if base is not None:
        config["base_model"] = str(base)
    for key, value in extra.items():
        config[key] = value
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def invoke(args: list[str]) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)


def run_ok(config: Path, out: Path, *options: str) -> dict[str, np.ndarray]:
    result = invoke(["run", config, out, "--quiet", *options])
    assert result.exit_code == 0, (result.output, result.exception)
    return load_numpy(out)


def run_error(config: Path, out: Path) -> str:
    result = invoke(["run", config, out, "--quiet"])
    assert result.exit_code != 0
    return str(result.exception) + result.output


def assert_same(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert sorted(actual) == sorted(expected)
    for name in expected:
        assert_close_at_scale(actual[name], expected[name], dtype="float32", msg=name)


@pytest.mark.parametrize(
    ("granularity", "priors"),
    [("matrix", None), ("element", None), ("matrix", [0.5, 2.0]), ("element", [3.0, 1.0])],
)
def test_run_matches_by_hand(models, tmp_path, granularity, priors):
    targets = [models["t1"], models["t2"]]
    config = write_config(
        tmp_path / "c.yml", models["base"], targets, parameters={"granularity": granularity}
    )
    if priors:
        data = yaml.safe_load(config.read_text())
        for entry, prior in zip(data["models"], priors, strict=True):
            entry["parameters"] = {"weight": prior}
        config.write_text(yaml.safe_dump(data))
    merged = run_ok(config, tmp_path / "out")
    expected = by_hand_merge(
        load_numpy(models["base"]), [load_numpy(t) for t in targets], granularity, priors
    )
    assert_same(merged, expected)


def test_default_granularity_is_matrix(models, tmp_path):
    targets = [models["t1"], models["t2"]]
    merged = run_ok(write_config(tmp_path / "c.yml", models["base"], targets), tmp_path / "out")
    expected = by_hand_merge(load_numpy(models["base"]), [load_numpy(t) for t in targets], "matrix")
    assert_same(merged, expected)


@pytest.mark.parametrize("granularity", ["layer", "model"])
def test_grouped_granularities_run_two_passes(models, tmp_path, granularity):
    targets = [models["t1"], models["t2"]]
    config = write_config(
        tmp_path / "c.yml", models["base"], targets, parameters={"granularity": granularity}
    )
    out = tmp_path / "out"
    merged = run_ok(config, out)
    expected = by_hand_merge(load_numpy(models["base"]), [load_numpy(t) for t in targets], granularity)
    assert_same(merged, expected)
    stats = json.loads((out / "varm_weights" / JSON_NAME).read_text())
    assert stats["granularity"] == granularity
    saved = yaml.safe_load((out / "mergekit_config.yml").read_text())
    assert saved["parameters"]["statistics"] == str((out / "varm_weights" / JSON_NAME).resolve())


def test_explicit_statistics_file(models, tmp_path):
    """The documented manual route: `varm-merge weights`, then `statistics:` in the config."""
    targets = [models["t1"], models["t2"]]
    analysis = tmp_path / "analysis"
    args = ["weights", "--base", models["base"], "--out", analysis, "--granularity", "layer", "--no-heatmap"]
    result = invoke(args + [a for t in targets for a in ("--model", t)])
    assert result.exit_code == 0, result.output
    params = {"granularity": "layer", "statistics": str(analysis / JSON_NAME)}
    merged = run_ok(
        write_config(tmp_path / "c.yml", models["base"], targets, parameters=params), tmp_path / "o"
    )
    expected = by_hand_merge(load_numpy(models["base"]), [load_numpy(t) for t in targets], "layer")
    assert_same(merged, expected)
    assert not (tmp_path / "o" / "varm_weights").exists()

    params["granularity"] = "model"
    message = run_error(
        write_config(tmp_path / "m.yml", models["base"], targets, parameters=params), tmp_path / "x"
    )
    assert "'layer' statistics" in message


@pytest.mark.parametrize("granularity", ["matrix", "element", "layer"])
def test_single_target_returns_that_target(models, tmp_path, granularity):
    config = write_config(
        tmp_path / "c.yml", models["base"], [models["t1"]], parameters={"granularity": granularity}
    )
    assert_same(run_ok(config, tmp_path / "out"), load_numpy(models["t1"]))


@pytest.mark.parametrize("granularity", ["matrix", "layer"])
def test_tied_embeddings(tmp_path, granularity):
    """SmolLM2-style checkpoints without lm_head: mergekit skips it, VaRM merges the rest."""
    base, *targets = make_tied_family(tmp_path / "models")
    config = write_config(tmp_path / "c.yml", base, targets, parameters={"granularity": granularity})
    merged = run_ok(config, tmp_path / "out")
    assert "lm_head.weight" not in merged
    assert_same(merged, by_hand_merge(load_numpy(base), [load_numpy(t) for t in targets], granularity))


def test_weights_command_agrees_with_merge(models, tmp_path):
    targets = [models["t1"], models["t2"]]
    out = tmp_path / "w"
    result = invoke(
        ["weights", "--base", models["base"], "--out", out] + [a for t in targets for a in ("--model", t)]
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / JSON_NAME).read_text())
    base, tgt = load_numpy(models["base"]), [load_numpy(t) for t in targets]
    assert sorted(report["tensors"]) == sorted(base)
    for name, entry in report["tensors"].items():
        assert sum(entry["weights"]) == pytest.approx(1.0, abs=1e-12)
        expected = by_hand_matrix_weights(base[name], [t[name] for t in tgt], np.ones(2))
        assert_close_at_scale(entry["weights"], expected, dtype="float32", msg=name)

    # The merge is exactly base + sum_k w_k delta_k with the reported weights.
    merged = run_ok(write_config(tmp_path / "c.yml", models["base"], targets), tmp_path / "out")
    for name, entry in report["tensors"].items():
        rebuilt = base[name] + sum(
            w * (t[name] - base[name]) for w, t in zip(entry["weights"], tgt, strict=True)
        )
        assert_close_at_scale(merged[name], rebuilt, dtype="float32", msg=name)

    with open(out / CSV_NAME, newline="") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == len(base) * len(targets)
    q_rows = [r for r in rows if r["tensor"] == "model.layers.1.self_attn.q_proj.weight"]
    assert [r["layer"] for r in q_rows] == ["1", "1"]
    assert {r["matrix"] for r in q_rows} == {"self_attn.q_proj.weight"}
    assert [float(r["weight"]) for r in q_rows] == pytest.approx(
        report["tensors"]["model.layers.1.self_attn.q_proj.weight"]["weights"]
    )
    assert (out / PNG_NAME).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_weights_command_priors(models, tmp_path):
    targets = [models["t1"], models["t2"]]
    args = [
        "weights",
        "--base",
        models["base"],
        "--out",
        tmp_path,
        "--no-heatmap",
        "--prior",
        "0.25",
        "--prior",
        "4",
    ]
    assert invoke(args + [a for t in targets for a in ("--model", t)]).exit_code == 0
    report = json.loads((tmp_path / JSON_NAME).read_text())
    base, tgt = load_numpy(models["base"]), [load_numpy(t) for t in targets]
    name = "model.layers.0.mlp.down_proj.weight"
    expected = by_hand_matrix_weights(base[name], [t[name] for t in tgt], np.array([0.25, 4.0]))
    np.testing.assert_allclose(report["tensors"][name]["weights"], expected, rtol=1e-6)
    bad = invoke(
        [
            "weights",
            "--base",
            models["base"],
            "--out",
            tmp_path,
            "--model",
            models["t1"],
            "--prior",
            "1",
            "--prior",
            "2",
        ]
    )
    assert bad.exit_code != 0 and "--prior" in bad.output


def test_all_zero_deltas_fall_back_to_uniform_and_warn_once(models, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(method, "_warned_uniform", False)
    targets = [models["t2"], models["base_copy"]]
    with caplog.at_level(logging.WARNING, logger="varm_merge.method"):
        merged = run_ok(write_config(tmp_path / "c.yml", models["base"], targets), tmp_path / "out")
    # base_copy never moves, so t2 takes every tensor; where t2 is also still, both deltas are 0.
    assert_same(merged, load_numpy(models["t2"]))
    warnings = [r for r in caplog.records if r.name == "varm_merge.method"]
    assert len(warnings) == 1 and "zero deltas" in warnings[0].getMessage()
    assert any(name in warnings[0].getMessage() for name in ZEROED)


def test_uniform_fallback_uses_priors_and_epsilon(monkeypatch):
    monkeypatch.setattr(method, "_warned_uniform", True)
    base = torch.zeros(3, 4)
    small = [base + 1e-4, base + 2e-4]
    group = TensorGroup.from_tensors([base, *small], base_index=0, name="w")
    varm = get("varm")
    (below,) = varm((group,), parameters={"weight": [1.0, 3.0], "epsilon": 1.0})
    torch.testing.assert_close(below, base + 0.25 * 1e-4 + 0.75 * 2e-4)
    (above,) = varm((group,), parameters={"weight": [1.0, 3.0], "epsilon": 0.0})
    w = np.array([1e-8, 3 * 4e-8]) / (1e-8 + 3 * 4e-8)
    torch.testing.assert_close(above, base + float(w[0] * 1e-4 + w[1] * 2e-4))


@pytest.mark.parametrize("granularity", ["matrix", "element"])
def test_fallback_threshold_scales_with_the_sum_of_priors(monkeypatch, granularity: str) -> None:
    """The fallback test is `sum_k p_k s_k <= epsilon * sum_k p_k`, not `<= epsilon`.

    Priors [1, 3] make the two thresholds differ by 4x. Deltas 1e-4 and 2e-4 times a per-element
    factor a give sum_k p_k s_k = 1.3e-7 a^2: with epsilon 6.5e-8 the documented rule falls back
    where a^2 <= 2, comparing with epsilon alone only where a^2 <= 0.5; a = 1 tells them apart.
    """
    monkeypatch.setattr(method, "_warned_uniform", True)
    priors, epsilon = [1.0, 3.0], 6.5e-8
    factor = torch.tensor([[1.0, 10.0], [0.5, 3.0]]) if granularity == "element" else torch.ones(2, 2)
    base = torch.zeros(2, 2, dtype=torch.float64)
    targets = [base + 1e-4 * factor, base + 2e-4 * factor]
    group = TensorGroup.from_tensors([base, *targets], base_index=0, name="w")
    params = {"weight": priors, "epsilon": epsilon, "granularity": granularity}
    (merged,) = get("varm")((group,), parameters=params)
    expected = by_hand_merge({"w": base.numpy()}, [{"w": t.numpy()} for t in targets], granularity,
                             priors, epsilon)["w"]  # fmt: skip
    np.testing.assert_allclose(merged.numpy(), expected, rtol=1e-9)
    # Where the rule falls back, the merge is the prior-weighted mean delta (0.25, 0.75): 1.75e-4 a.
    fallback = (1.3e-7 * factor.double() ** 2 <= epsilon * sum(priors)).numpy()
    assert fallback[0, 0] and (granularity == "matrix" or not fallback[0, 1])
    np.testing.assert_allclose(merged.numpy()[fallback], (1.75e-4 * factor.double()).numpy()[fallback])


@pytest.mark.parametrize("granularity", ["matrix", "layer", "model"])
def test_weights_report_matches_statistics_read_from_the_safetensors(
    models, tmp_path, granularity: str
) -> None:
    """`varm-merge weights`: mean squared deltas, group scores and weights, JSON and CSV, against
    numpy over the checkpoint files (layer/model groups mix tensors of different sizes, so an
    unweighted mean of per-tensor means would not pass)."""
    targets = [models["t1"], models["t2"]]
    priors = np.array([1.0, 3.0])
    args = [
        "weights",
        "--base",
        models["base"],
        "--out",
        tmp_path,
        "--no-heatmap",
        "--granularity",
        granularity,
    ]
    args += [a for t, p in zip(targets, priors, strict=True) for a in ("--model", t, "--prior", p)]
    result = invoke(args)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / JSON_NAME).read_text())
    base, tgt = load_numpy(models["base"]), [load_numpy(t) for t in targets]
    scores = by_hand_scores(base, tgt, granularity)
    assert sorted(report["tensors"]) == sorted(base)
    groups: dict[str, set[str]] = {}
    for name, entry in report["tensors"].items():
        mean_sq = [np.mean((t[name] - base[name]) ** 2) for t in tgt]
        assert_close_at_scale(entry["mean_sq_delta"], mean_sq, dtype="float32", msg=name)
        assert_close_at_scale(entry["scores"], scores[name], dtype="float32", msg=name)
        weights = priors * scores[name] / np.sum(priors * scores[name])
        assert_close_at_scale(entry["weights"], weights, dtype="float32", msg=name)
        groups.setdefault(entry["group"], set()).add(name)
    # The reported groups are the README's: every tensor of one group, and nothing else.
    by_hand_groups: dict[str, set[str]] = {}
    for name in base:
        by_hand_groups.setdefault(group_name(name, granularity), set()).add(name)
    assert sorted(map(sorted, groups.values())) == sorted(map(sorted, by_hand_groups.values()))

    with open(tmp_path / CSV_NAME, newline="") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == len(base) * len(targets)
    for row in rows:
        k = [str(t) for t in targets].index(row["model"])
        name = row["tensor"]
        assert float(row["mean_sq_delta"]) == approx_at_scale(
            np.mean((tgt[k][name] - base[name]) ** 2), dtype="float32"
        )
        assert float(row["score"]) == approx_at_scale(scores[name][k], dtype="float32")
        assert float(row["prior"]) == priors[k]


def test_vocabulary_axis_goes_through_mergekit_tokenizer_handling(models, tmp_path):
    targets = [models["t1"], models["wide"]]
    config = write_config(tmp_path / "c.yml", models["base"], targets)
    assert "Tensor size mismatch" in run_error(config, tmp_path / "bad")

    config = write_config(tmp_path / "t.yml", models["base"], targets, tokenizer={"source": "base"})
    merged = run_ok(config, tmp_path / "out")
    # tokenizer source = base keeps the base vocabulary: the wide target's extra rows are dropped.
    wide = {name: t[:VOCAB] if t.shape[0] > VOCAB else t for name, t in load_numpy(models["wide"]).items()}
    expected = by_hand_merge(load_numpy(models["base"]), [load_numpy(models["t1"]), wide], "matrix")
    assert_same(merged, expected)

    args = ["weights", "--base", models["base"], "--model", models["wide"], "--out", tmp_path / "w"]
    result = invoke(args)
    assert result.exit_code != 0 and "has shape" in result.output


def test_bad_inputs_give_clear_errors(models, tmp_path):
    targets = [models["t1"], models["t2"]]
    unknown = write_config(tmp_path / "u.yml", models["base"], targets, parameters={"granularity": "row"})
    assert "'matrix', 'element', 'layer' or 'model'" in run_error(unknown, tmp_path / "o1")

    no_base = write_config(tmp_path / "n.yml", None, targets)
    assert "requires a base input" in run_error(no_base, tmp_path / "o2")

    nan = write_config(tmp_path / "nan.yml", models["base"], [models["t1"], models["nan"]])
    assert "NaN or Inf" in run_error(nan, tmp_path / "o3")
    result = invoke(["weights", "--base", models["base"], "--model", models["nan"], "--out", tmp_path / "w"])
    assert result.exit_code != 0 and "NaN or Inf" in result.output

    negative = write_config(tmp_path / "neg.yml", models["base"], targets)
    data = yaml.safe_load(negative.read_text())
    data["models"][0]["parameters"] = {"weight": -1.0}
    negative.write_text(yaml.safe_dump(data))
    assert "greater than or equal to 0" in run_error(negative, tmp_path / "o4")


def test_kernel_rejects_what_it_cannot_merge():
    varm = get("varm")
    ints = TensorGroup.from_tensors([torch.arange(4), torch.arange(4) + 1], base_index=0, name="ids")
    with pytest.raises(TypeError, match="not floating point"):
        varm((ints,))
    floats = TensorGroup.from_tensors([torch.zeros(2), torch.ones(2)], base_index=0, name="w")
    with pytest.raises(ValueError, match="not all 0"):
        varm((floats,), parameters={"weight": [0.0]})
    with pytest.raises(ValueError, match="needs scores across tensors"):
        varm((floats,), parameters={"granularity": "layer"})
    with pytest.raises(ValueError, match="base input"):
        varm((TensorGroup.from_tensors([torch.zeros(2), torch.ones(2)], name="w"),))


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "merge_configs").glob("*.yml")))
def test_every_shipped_config_runs(models, tmp_path, name):
    config = tmp_path / f"{name}.yml"
    args = ["config", name, "--pivot", models["base"], "--target", models["t1"], "--target", models["t2"]]
    result = invoke([*args, "-o", config])
    assert result.exit_code == 0, result.output
    assert "PIVOT_MODEL" not in config.read_text() and "TARGET_MODEL" not in config.read_text()
    merged = run_ok(config, tmp_path / "out", "--random-seed", "0")
    base = load_numpy(models["base"])
    assert sorted(merged) == sorted(base)
    assert all(np.isfinite(t).all() for t in merged.values())


def test_shipped_list_is_complete():
    shipped = {p.stem for p in (REPO / "merge_configs").glob("*.yml")}
    assert shipped >= {"varm", "slerp", "task_arithmetic", "ties", "dare_linear", "sce", "linear"}


def test_fill_placeholders_quotes_paths_and_counts_targets():
    text = (REPO / "merge_configs" / "varm.yml").read_text()
    odd = 'dir with "quotes": and #hash'
    filled = yaml.safe_load(fill_placeholders(text, odd, [odd + "1", odd + "2"]))
    assert filled["base_model"] == odd
    assert [m["model"] for m in filled["models"]] == [odd + "1", odd + "2"]
    with pytest.raises(ValueError, match="placeholders for 2 targets"):
        fill_placeholders(text, "p", ["a"])


def test_python_dash_m_is_run(models, tmp_path):
    """A fresh process: `python -m varm_merge` registers `varm` before mergekit parses the config."""
    targets = [models["t1"], models["t2"]]
    config = write_config(tmp_path / "c.yml", models["base"], targets)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "varm_merge", str(config), str(out), "--quiet"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = by_hand_merge(load_numpy(models["base"]), [load_numpy(t) for t in targets], "matrix")
    assert_same(load_numpy(out), expected)


def test_heatmap_panels_are_named_by_what_tells_the_models_apart() -> None:
    trained = ["/runs/demo/train/target-a-1f2e/model", "/runs/demo/train/target-b-9c0d/model"]
    assert distinct_names(trained) == ["target-a-1f2e/model", "target-b-9c0d/model"]
    assert distinct_names(["models/first", "models/second"]) == ["first", "second"]
