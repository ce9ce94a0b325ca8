"""The main job end to end on a tiny budget: every stage makes what the next one uses, the report, reuse."""

import json
import re

import pytest

from core.io import read_json

TINY = {
    "classifier": {"epochs": 0.5, "width": 8},
    "teacher": {"train_steps": 2, "batch_size": 16, "purify_steps": 4,
                "unet": {"block_out_channels": [8, 16], "attention": [False, True], "norm_num_groups": 4}},
    "progressive": {"steps_per_round": 1, "batch_size": 8},
    "consistency": {"train_steps": 2, "batch_size": 8},
    "recover": {"ipc": 2, "iterations": 2, "batch_size": 20},
    "relabel": {"epochs": 2},
    "distilled_train": {"epochs": 2, "width": 8},
    "harness": {"budget": {"n": 8, "evals": 2, "steps": {"pgd-eot": 1, "bpda-eot": 1}, "sweep_n": 8,
                           "check_n": 8, "batch_size": 8},
                "teacher": {"n": 4}, "teacher_elsewhere": {"n": 4, "evals": 1, "eot": 1, "attacks": ["bpda-eot"],
                                                           "steps": {"bpda-eot": 1}}},
    "certify": {"examples": 4, "n0": 5, "n": 20, "batch": 25, "attack_n": 20},
    "latency": {"batch_sizes": [1, 4], "warmup": 0, "repeats": 1},
}
DEFENSES = ["undefended", "teacher", "progressive-1", "progressive-2", "progressive-4", "consistency-1",
            "consistency-2", "consistency-4"]


@pytest.mark.slow
def test_fast_quickstart_runs_every_stage_and_reuses_them(tmp_path, capsys):
    from eval.quickstart import quickstart, quickstart_config

    out = tmp_path / "q"
    cfg = quickstart_config(fast=True, changes=TINY)
    report = quickstart(out, fast=True, cfg=cfg)
    for name in ("report.md", "report.json", "robust_vs_latency.png", "robust_vs_eps.png", "purification_grid.png",
                 "training_curves.png"):
        assert (out / name).is_file(), name
    assert json.loads((out / "report.json").read_text())["rows"] == report["rows"]

    # the standard classifier behind every defense, the distilled-data ones behind `elsewhere`; the teacher
    # faces the students' attacks behind the standard classifier and a marked BPDA bound elsewhere
    rows = {(r["classifier"], r["defense"]): r for r in report["rows"]}
    elsewhere = ["undefended", "teacher", "progressive-1", "consistency-1", "consistency-4"]
    assert sorted(rows) == sorted([("standard", d) for d in DEFENSES] +
                                  [(c, d) for c in ("sre2l", "guard") for d in elsewhere])
    for (clf, d), r in rows.items():
        elsewhere_teacher = d == "teacher" and clf != "standard"
        expected = {"pgd"} if d == "undefended" else {"bpda-eot"} if elsewhere_teacher else {"pgd-eot", "bpda-eot"}
        assert set(r["attacks"]) == expected, (clf, d)
        assert r["ms_per_image"] > 0
        # "all attacks": the examples correct clean and under every attack in every evaluation, recounted from
        # the per-example records the harness left beside the report
        ex = json.loads((out / "eval" / clf / d / "report.json").read_text())["per_example"]
        survived = [all(all(ex[k][i]) for k in ex if k != "label") for i in range(len(ex["label"]))]
        assert r["all_attacks"] == pytest.approx(sum(survived) / len(survived)), (clf, d)
        assert r["evals"] == (1 if d == "undefended" or elsewhere_teacher else 2)
        assert bool(r["weaker"]) == elsewhere_teacher, (clf, d, r["weaker"])
    assert rows["standard", "teacher"]["examples"] == 4 and rows["standard", "consistency-1"]["examples"] == 8
    shared = report["shared"]["standard"]
    assert shared["examples"] == 4 and set(shared["rows"]) == set(DEFENSES) - {"undefended"}
    for c in ("sre2l", "guard"):
        assert "teacher" not in report["pareto"][c]  # a weaker attack never makes the front
    assert {r["nfe"] for (c, d), r in rows.items() if d.endswith("-4")} == {4}
    assert rows["standard", "consistency-1"]["sweep"] and not rows["standard", "progressive-1"]["sweep"]

    # each stage used what the one before made
    teacher = out / "teacher" / "purifier"
    for kind, steps in (("progressive", (4, 2, 1)), ("consistency", (1, 2, 4))):
        for k in steps:
            meta = read_json(out / kind / "students" / f"steps-{k}" / "purifier.json")
            assert meta["nfe"] == k and meta["source"]["teacher"] == str(teacher)
    sre2l, guard = read_json(out / "sre2l" / "pipeline.json"), read_json(out / "guard" / "pipeline.json")
    assert sre2l["squeezed_classifier"] == str(out / "classifier" / "classifier")  # SRe2L recovers from it
    assert not (out / "sre2l" / "squeeze").exists()
    assert guard["squeezed_classifier"] == str(out / "guard" / "squeeze" / "classifier")
    assert read_json(out / "guard" / "squeeze" / "train.json")["objective"] == "guard"
    for name, clf in (("standard", out / "classifier" / "classifier"), ("sre2l", sre2l["classifier"]),
                      ("guard", guard["classifier"])):
        import yaml

        ecfg = yaml.safe_load((out / "eval" / name / "config.yaml").read_text())
        assert ecfg["classifier"] == str(clf)
        purifiers = [d["purifier"] for d in ecfg["defenses"]]
        assert purifiers[1] == str(teacher) and purifiers[0] == "none"
        assert len(purifiers) == (8 if name == "standard" else 5)
    front = report["pareto"]["standard"]
    assert front and set(front) <= set(DEFENSES)
    assert [rows["standard", d]["ms_per_image"] for d in front] == sorted(rows["standard", d]["ms_per_image"]
                                                                         for d in front)  # fastest first
    text = (out / "report.md").read_text()
    assert "| guard | consistency-4 |" in text and "Pareto front" in text
    assert "| guard | teacher * |" in text and "same 4 examples" in text
    # whether the budget converged: the doubled-steps reruns, read paired, one line per checked row
    assert "Did this budget converge?" in text
    assert re.search(r"- standard / consistency-1: pgd-eot .* \(\d+ examples, \d+ broken only by the doubled run", text)

    # certificates: DDS and the 1-step students behind the standard classifier, Gaussian noise bare and before a
    # classifier trained with that noise, all at the teacher's sigma, on the same images
    cert = report["certify"]
    assert list(cert["defenses"]) == ["gaussian", "gaussian-noise-trained", "dds", "progressive-1", "consistency-1"]
    sigma = {round(r["sigma"], 3) for r in cert["defenses"].values()}
    assert sigma == {0.169} and cert["examples"] == 4 and cert["n"] == 20
    assert cert["defenses"]["dds"]["nfe"] == 1 and cert["defenses"]["gaussian"]["nfe"] == 0
    assert read_json(out / "classifier-noise" / "classifier" / "meta.json")["noise_sd"] == pytest.approx(0.1694, 1e-3)
    assert (out / "certify" / "certified_vs_radius.png").is_file() and "## Certified robustness" in text
    assert cert["attack"] == {"steps": 2, "votes": 4, "n": 20} and "The attack beside the certificate" in text

    # a rerun reuses every stage, every attacked batch and every certificate
    lines = {p: p.read_text() for p in [*(out / "eval").rglob("examples.jsonl"), *(out / "certify").rglob("*.jsonl")]}
    capsys.readouterr()
    again = quickstart(out, fast=True, cfg=cfg)
    printed = capsys.readouterr().out
    assert printed.count("unchanged: reusing") == 13  # 5 training stages, 3 + 4 pipeline stages, latency
    assert {p: p.read_text() for p in lines} == lines
    assert again["rows"] == report["rows"]
    timed = ("seconds_per_image", "draws_per_second", "batch_draws_per_second")
    assert all({k: v for k, v in again["certify"]["defenses"][d].items() if k not in timed} ==
               {k: v for k, v in cert["defenses"][d].items() if k not in timed} for d in cert["defenses"])


def test_quickstart_refuses_bad_budgets_before_work(tmp_path):
    from core.config import ConfigError
    from eval.quickstart import quickstart, quickstart_config

    with pytest.raises(ConfigError, match="harness.nn"):
        quickstart_config(overrides=["harness.nn=3"])
    with pytest.raises(ValueError, match="power of 2"):
        quickstart(tmp_path / "q", cfg=quickstart_config(changes={"progressive": {"start_steps": 6}}))
    with pytest.raises(ValueError, match="student_steps"):
        quickstart(tmp_path / "q", cfg=quickstart_config(changes={"student_steps": [3]}))
    with pytest.raises(ValueError, match="ipc"):
        quickstart(tmp_path / "q", cfg=quickstart_config(changes={"recover": {"ipc": 0}}))
    with pytest.raises(ValueError, match="n0"):
        quickstart(tmp_path / "q", cfg=quickstart_config(changes={"certify": {"n0": 1000, "n": 100}}))
    assert not (tmp_path / "q").exists()


def test_a_pretrained_teacher_is_opened_with_the_configs_purification_and_saved_once(tmp_path):
    from eval.quickstart import pretrained_teacher, quickstart_config
    from purify import load_purifier

    from .conftest import scheduler_config, tiny_unet

    bare_unet_teacher = tmp_path / "bare"  # the google/ddpm-cifar10-32 layout
    tiny_unet().save_pretrained(bare_unet_teacher, safe_serialization=True)
    (bare_unet_teacher / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "DDPMScheduler", **scheduler_config()}))

    cfg = quickstart_config(changes={"teacher_from": str(bare_unet_teacher),
                                     "teacher": {"t_star": 0.2, "purify_steps": 7, "mode": "ode"}})
    folder = pretrained_teacher(cfg, tmp_path / "teacher")
    p = load_purifier(folder)
    assert (p.t_star, p.steps, p.mode) == (0.2, 7, "ode")
    assert pretrained_teacher(cfg, tmp_path / "teacher") == folder  # reused
    other = quickstart_config(changes={"teacher_from": str(bare_unet_teacher), "teacher": {"purify_steps": 9}})
    with pytest.raises(FileExistsError, match="a pretrained teacher made with another mode, steps, t_star"):
        pretrained_teacher(other, tmp_path / "teacher")


@pytest.mark.parametrize("dataset", ["cifar10", "tiny-imagenet", "imagenette", "imagenet"])
def test_shipped_quickstart_configs_load(dataset):
    from distill.progressive import rounds
    from eval.quickstart import quickstart_config, stage_configs

    cfg = quickstart_config(path=f"configs/{dataset}/quickstart.yaml")
    stages = stage_configs(cfg)
    assert set(cfg.student_steps) <= set(rounds(stages["progressive"]))
    assert stages["classifier"].objective == "ce" and stages["robust_squeeze"].objective == "guard"
    assert stages["robust_squeeze"].arch == stages["classifier"].arch  # SRe2L and GUARD squeeze the same network
    assert {s.dataset for s in stages.values()} == {cfg.dataset}


@pytest.mark.slow
def test_quickstart_under_accelerate_launch_with_two_processes(tmp_path):
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
           "no", "--dynamo_backend", "no", "-m", "eval", "quickstart", "--fast", "--out", str(tmp_path / "q"),
           "--config", str(tmp_path / "tiny.yaml")]
    subprocess.run(cmd, check=True, timeout=600)
    assert read_json(tmp_path / "q" / "teacher" / "train.json")["processes"] == 2
    report = read_json(tmp_path / "q" / "report.json")
    assert len(report["rows"]) == len(DEFENSES) + 2 * 5  # the distilled-data classifiers: `elsewhere` only
