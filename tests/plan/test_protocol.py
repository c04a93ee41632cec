"""Replicates, sweeps and the choice on validation (finegrained.plan.protocol)."""

from __future__ import annotations

import pytest

from finegrained.errors import ConfigError, DataError
from finegrained.plan import protocol as P
from finegrained.plan.schema import validate_config
from finegrained.plan.variants import parse_variant


def config(**extra):
    return validate_config({"dataset": {"demo": {"num_classes": 3}},
                            "train": {"seed": 0}, **extra})


def test_variant_round_trip_and_canonical_order():
    assert P.format_variant({"lr": 0.003, "seed": 1}) == "+seed=1+lr=0.003"
    assert P.format_variant({"weight_decay": 1e-05}) == "+weight_decay=1e-05"
    assert parse_variant("+weight_decay=1e-05") == {"weight_decay": 1e-05}
    assert parse_variant("+epochs=10") == {"epochs": 10}
    assert isinstance(parse_variant("+epochs=10")["epochs"], int)
    assert P.join_variants("+lr=0.01", "+seed=2") == "+seed=2+lr=0.01"
    assert P.join_variants("", "") == ""
    with pytest.raises(ConfigError, match="both set"):
        P.join_variants("+lr=0.01", "+lr=0.1")
    with pytest.raises(ConfigError, match="not a number"):
        parse_variant("+lr=abc")


def test_replicates_keep_the_plain_path_for_train_seed():
    assert P.replicate_variants(config()) == [""]
    assert P.replicate_variants(config(seeds=[0, 1, 2])) == ["", "+seed=1", "+seed=2"]
    run_config = config(seeds=[3, 0])
    run_config["train"]["seed"] = 3
    assert P.replicate_variants(run_config) == ["", "+seed=0"]


def test_sweep_grid_times_replicates():
    run_config = config(seeds=[0, 1],
                        sweep={"full_finetune": {"lr": [0.01, 0.1], "epochs": [2, 4]}})
    assert P.sweep_variants(run_config, "full_finetune") == [
        "+lr=0.01+epochs=2", "+lr=0.01+epochs=4", "+lr=0.1+epochs=2", "+lr=0.1+epochs=4"]
    assert P.sweep_variants(run_config, "scratch") == [""]
    jobs = P.train_variants(run_config, "full_finetune")
    assert len(jobs) == 8 and len(set(jobs)) == 8
    assert "+seed=1+lr=0.1+epochs=4" in jobs and "+lr=0.01+epochs=2" in jobs
    assert P.train_variants(run_config, "scratch") == ["", "+seed=1"]


def test_evaluation_reads_the_chosen_point_of_its_replicate():
    selection = {"chosen": "+lr=0.1"}
    assert P.chosen_train_variant(selection, "+seed=1") == "+seed=1+lr=0.1"
    assert P.chosen_train_variant(selection, "") == "+lr=0.1"
    run_config = config(seeds=[0, 1], sweep={"full_finetune": {"lr": [0.01, 0.1]}})
    assert P.is_sweep_point(run_config, "full_finetune", "+seed=1+lr=0.1")
    assert not P.is_sweep_point(run_config, "full_finetune", "+seed=1")
    assert not P.is_sweep_point(run_config, "scratch", "+lr=0.1")


def test_sweep_config_errors():
    with pytest.raises(ConfigError, match="not in regimes"):
        P.check_protocol(config(regimes=["scratch"], sweep={"full_finetune": {"lr": [0.1]}}))
    with pytest.raises(ConfigError, match="l2_grid"):
        P.check_protocol(config(sweep={"linear_probe": {"lr": [0.1]}}))
    with pytest.raises(ConfigError, match="sweep.full_finetune"):
        config(sweep={"full_finetune": {"arch": [1]}})
    with pytest.raises(ConfigError, match="seeds"):
        config(seeds=[1, 1])


def summary(variant, top1, loss=1.0, select_by="val_top1"):
    return {"variant": variant, "best_val_top1": top1, "best_val_loss": loss,
            "select_by": select_by}


def test_select_maximises_the_mean_over_replicates():
    selection = P.select("full_finetune", {
        "+lr=0.01": [summary("+lr=0.01", 0.9), summary("+seed=1+lr=0.01", 0.5)],   # mean 0.7
        "+lr=0.1": [summary("+lr=0.1", 0.8), summary("+seed=1+lr=0.1", 0.75)],     # mean 0.775
    })
    assert selection["chosen"] == "+lr=0.1" and selection["chosen_overrides"] == {"lr": 0.1}
    assert [c["val_top1_mean"] for c in selection["candidates"]] == pytest.approx([0.7, 0.775])
    assert selection["candidates"][0]["replicates"] == ["+lr=0.01", "+seed=1+lr=0.01"]
    assert selection["select_by"] == "val_top1" and "mean" in selection["rule"]
    assert "top-1" in selection["rule"]


def test_select_by_val_loss_picks_the_lower_mean_loss():
    """Top-1 prefers +lr=0.01, the loss +lr=0.1: each rule picks its own, says which, and
    refuses summaries whose epochs another rule chose."""
    candidates = {
        "+lr=0.01": [summary("+lr=0.01", 0.9, 1.2, "val_loss"),
                     summary("+seed=1+lr=0.01", 0.8, 1.0, "val_loss")],      # 0.85, 1.1
        "+lr=0.1": [summary("+lr=0.1", 0.8, 0.7, "val_loss"),
                    summary("+seed=1+lr=0.1", 0.8, 0.9, "val_loss")],        # 0.80, 0.8
    }
    by_loss = P.select("full_finetune", candidates, "val_loss")
    assert by_loss["chosen"] == "+lr=0.1" and by_loss["select_by"] == "val_loss"
    assert by_loss["rule"].startswith("lowest validation loss")
    assert [c["val_loss_mean"] for c in by_loss["candidates"]] == pytest.approx([1.1, 0.8])
    with pytest.raises(DataError, match="chosen by val_loss, the run selects by val_top1"):
        P.select("full_finetune", candidates, "val_top1")
    relabelled = {k: [{**s, "select_by": "val_top1"} for s in v] for k, v in candidates.items()}
    assert P.select("full_finetune", relabelled, "val_top1")["chosen"] == "+lr=0.01"


def test_select_ties_go_to_lower_loss_then_grid_order():
    tie = P.select("scratch", {"+lr=0.01": [summary("", 0.5, loss=2.0)],
                               "+lr=0.1": [summary("", 0.5, loss=1.0)]})
    assert tie["chosen"] == "+lr=0.1"
    tie = P.select("scratch", {"+lr=0.01": [summary("", 0.5)], "+lr=0.1": [summary("", 0.5)]})
    assert tie["chosen"] == "+lr=0.01"
    nan = P.select("scratch", {"+lr=0.01": [summary("", 0.5, loss=float("nan"))],
                               "+lr=0.1": [summary("", 0.5, loss=3.0)]})
    assert nan["chosen"] == "+lr=0.1"
