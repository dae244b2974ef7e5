"""examples/finetune_transformer.py runs end to end in a tiny configuration (a few DP steps)."""

from __future__ import annotations

import math
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "examples"))
import finetune_transformer  # noqa: E402


@pytest.mark.parametrize("model, lora", [("bert", False), ("gpt2", True)])
def test_finetune_transformer_runs_and_reports_a_finite_epsilon(capsys, model, lora):
    argv = ["--model", model, "--steps", "3", "--pretrain-steps", "2", "--batch-size", "16", "--epsilon", "4",
            "--device", "cpu", "--quiet"] + (["--lora"] if lora else [])
    summary = finetune_transformer.main(argv)
    printed = capsys.readouterr().out
    assert "done: test accuracy" in printed and "at epsilon" in printed
    # The noise was calibrated for exactly these 3 steps: the run spends the target, not more.
    assert math.isfinite(summary["epsilon"]) and 3.9 <= summary["epsilon"] <= 4.0 + 1e-6
    assert summary["noise_multiplier"] > 0 and summary["steps"] == 3
    assert len(summary["history"]["loss"]) == 3 and all(math.isfinite(x) for x in summary["history"]["loss"])
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    if lora:  # only the adapters and the new head train
        assert summary["trainable_parameters"] < 10_000
    else:
        assert summary["trainable_parameters"] > 100_000


def test_lora_trains_only_adapters_and_head():
    model = finetune_transformer.build_model("gpt2", 5)
    head = finetune_transformer.new_head(model, "gpt2", 5)
    params = finetune_transformer.trainable_params(finetune_transformer.add_lora(model, "gpt2", 4, head))
    assert params and all(("lora_" in name) or ("modules_to_save" in name) for name in params), sorted(params)
