"""The pre-trained ablation recipe (``benchmarks/ablation.py --recipe pretrained``) end to end at a tiny size."""
from __future__ import annotations

import json

import pytest
import torch

from dcnv2.experiments.ablation import format_seed_table, run_name, run_pretrained_ablation


@pytest.mark.slow  # crop pre-training and two detectors end to end, then the reuse run: ~20 s on 2 cores
def test_pretrained_recipe_runs_writes_table_and_reuses_finished_runs(tmp_path):
    torch.set_num_threads(1)
    kw = dict(iters=2, pretrain_iters=1, num_train=12, num_val=4, image_size=64, progress=False)
    logs = []
    first = run_pretrained_ablation(["mdconv-c3c5-mdpool", "dcnv2"], [0], tmp_path, log=logs.append, **kw)
    assert set(first[0]) == {"mdconv-c3c5-mdpool", "dcnv2"}
    for name, r in first[0].items():
        stamp = tmp_path / "runs" / "seed0" / name / "result.json"
        saved = json.loads(stamp.read_text())
        assert saved["iterations"] == 2 and saved["pretrain_iters"] == 1 and saved["threads"] == 1
        assert 0.0 <= saved["metrics"]["bbox"]["AP"] <= 1.0
        assert saved["machine"]["isa"] == torch.backends.cpu.get_cpu_capability() and saved["machine"]["torch"]
        assert (tmp_path / "runs" / "seed0" / name / name / "model_final.pth").exists()
    # the two presets have the same trunk: one crop pre-training, reused by the second
    assert len(list((tmp_path / "pretrain").iterdir())) == 1
    assert any("reusing the crop pre-training" in line for line in logs)

    logs.clear()
    again = run_pretrained_ablation(["mdconv-c3c5-mdpool", "dcnv2"], [0], tmp_path, log=logs.append, **kw)
    assert not any("training (" in line for line in logs), logs
    assert sum("reusing" in line and "result.json" in line for line in logs) == 2
    assert again[0]["dcnv2"]["metrics"] == first[0]["dcnv2"]["metrics"]

    logs.clear()  # report only: what is finished, nothing trained
    report = run_pretrained_ablation(["regular", "dcnv2"], [0], tmp_path, log=logs.append, train_missing=False, **kw)
    assert list(report[0]) == ["dcnv2"] and any("regular: not run yet" in line for line in logs)
    assert not (tmp_path / "runs" / "seed0" / "regular").exists()

    table = format_seed_table(again)
    assert "| dcnv2 |" in table and "| mdconv-c3c5-mdpool |" in table and "AP seed 0" in table


def test_run_names_say_what_a_mimicking_variant_changes():
    assert run_name("dcnv2") == "dcnv2"
    assert run_name("dcnv2", {"cls_weight": 0.0, "mimic_weight": 0.3}) == "dcnv2[cls_weight=0,mimic_weight=0.3]"
    assert run_name("regular", {"cls_weight": 0.0}) == "regular"  # no mimicking branch to change


def test_seed_table_reports_missing_seeds_instead_of_padding():
    def result(ap):
        return {"metrics": {"bbox": {"AP": ap, "AP50": ap}}, "pretrain": {"accuracy": 0.5}}

    table = format_seed_table({0: {"a": result(0.4)}, 1: {"a": result(0.5)}, 2: {}})
    row = next(line for line in table.splitlines() if line.startswith("| a |"))
    assert "| 40.0 | 50.0 | – | 45.0 ± 5.0 |" in row and "| 2 |" in row
