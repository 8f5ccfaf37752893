"""`globe fit -m`: a sweep writes one run per combination, each usable as `artifacts=` for export."""

from __future__ import annotations

import json

import torch

from globe.cli.main import main


def test_multirun_sweep_dirs_feed_export(tmp_path, tiny_dirs, capsys):
    model_dir = tiny_dirs["qwen2_moe"][1]
    out = tmp_path / "sweep"
    rc = main(["fit", "-m", f"model.path={model_dir}", f"output_dir={out}", "bank.m_up=2,3", "bank.m_gate=${bank.m_up}",
               "bank.r=4", "sparsity.target_support=1", "train.steps=3", "train.eval_every=1", "train.baselines=false",
               "train.device=cpu"])
    assert rc == 0, capsys.readouterr().err
    runs = sorted(p for p in out.iterdir() if p.is_dir())
    assert len(runs) == 2 and all("=" not in p.name for p in runs)
    ms = [json.loads((p / "summary.json").read_text())["families"]["gate"]["m"] for p in runs]
    assert ms == [2, 3]  # m_gate followed m_up through the interpolation
    exp = tmp_path / "export"
    assert main(["export", f"model.path={model_dir}", f"artifacts={runs[1]}", f"output_dir={exp}",
                 "export.format=dense"]) == 0
    assert (exp / "config.json").is_file()


def test_families_fitted_separately_combine_in_export(tmp_path, tiny_dirs):
    from safetensors.torch import load_file

    model_dir = tiny_dirs["qwen2_moe"][1]
    common = ["bank.m_up=3", "bank.m_gate=3", "bank.r=4", "sparsity.target_support=1", "train.steps=3",
              "train.eval_every=1", "train.baselines=false", "train.device=cpu", f"model.path={model_dir}"]
    for fam in ("up", "gate"):
        assert main(["fit", f"output_dir={tmp_path / fam}", f"train.families=[{fam}]", *common]) == 0
    out = tmp_path / "dense"
    arts = f'artifacts="{tmp_path / "up"},{tmp_path / "gate"}"'
    assert main(["export", f"model.path={model_dir}", arts, f"output_dir={out}", "export.format=dense",
                 "export.dtype=fp32"]) == 0
    new, old = load_file(str(out / "model.safetensors")), load_file(str(model_dir / "model.safetensors"))
    for name in ("up_proj", "gate_proj"):  # both families were replaced by their reconstructions
        key = f"model.layers.0.mlp.experts.1.{name}.weight"
        assert key in new and not torch.equal(new[key], old[key])
    key = "model.layers.0.mlp.experts.1.down_proj.weight"
    assert torch.equal(new[key], old[key])
