"""The main job's orchestration: the six stages, each reused when unchanged and resumed when interrupted."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from core.checkpoint import load_classifier
from core.config import replace, save_config, to_dict
from core.errors import InputError
from core.io import atomic_write_json, atomic_write_text, read_json
from core.runs import process_state, run_stage, same_inputs_or_fail, same_or_fail
from core.zoo import is_named
from distill.consistency import train_consistency
from distill.progressive import rounds, train_progressive
from distill.teacher import train_teacher
from purify import load_purifier
from robust_data.pipeline import PipelineConfig, pipeline
from robust_data.squeeze import train_squeeze

from ..bench.latency import benchmark, device_name, time_module
from ..certify import CertifyConfig, Smoothing, purifier_sigma, run_certify
from ..robustness import run_robustness
from .config import QuickstartConfig, eval_config, quickstart_config, stage_configs
from .report import build_report, figures, render


def measure_latency(cfg: QuickstartConfig, purifiers: dict[str, Path], classifiers: dict[str, Path],
                    folder: Path) -> dict:
    """Every purifier and every classifier alone at each batch size; reused when nothing changed."""
    lat = cfg.latency
    settings = {**to_dict(lat), "machine": device_name("cuda" if torch.cuda.is_available() else "cpu")}
    same_inputs_or_fail(folder, {**purifiers, **{f"{k} classifier": v for k, v in classifiers.items()}})
    done = folder / "latency.json"
    if same_or_fail(folder / "settings.json", settings, "latency timings") and done.is_file():
        print(f"[{folder.name}] unchanged: reusing {done}")
        return read_json(done)
    loaded = {k: load_purifier(v) for k, v in purifiers.items()}
    shape = (loaded["teacher"].channels, *loaded["teacher"].image_size)
    rows = benchmark(loaded, None, lat.batch_sizes, lat.warmup, lat.repeats)
    device = torch.device(rows[0]["device"])
    for name, d in classifiers.items():
        clf = load_classifier(d, device)
        for b in lat.batch_sizes:
            x = torch.rand(b, *shape, generator=torch.Generator().manual_seed(cfg.seed)).to(device)
            r = time_module(clf, x, lat.warmup, lat.repeats)
            rows.append({"variant": "plain", "device": str(device), "purifier": "none", "classifier": name,
                         "batch_size": b, "nfe": 0, **r, "images_per_s": b / r["median_s"],
                         "ms_per_image": 1000 * r["median_s"] / b})
    result = {"settings": settings, "rows": rows}
    atomic_write_json(done, result)
    return result

def pretrained_teacher(cfg: QuickstartConfig, folder: Path) -> Path:
    """`teacher_from` opened as a DiffPure purifier with the config's t_star / steps / mode, saved once to
    FOLDER/purifier so that every later stage reads one local folder."""
    product, source = folder / "purifier", folder / "pretrained.json"
    settings = {"teacher_from": cfg.teacher_from, "t_star": cfg.teacher.t_star, "steps": cfg.teacher.purify_steps,
                "mode": cfg.teacher.mode}
    if same_or_fail(source, settings, "a pretrained teacher", write=False):
        print(f"[{folder.name}] unchanged: reusing {product}")
        return product
    if process_state().is_main_process:
        p = load_purifier(cfg.teacher_from, t_star=cfg.teacher.t_star, steps=cfg.teacher.purify_steps,
                          mode=cfg.teacher.mode)
        p.save(product)
        atomic_write_json(folder / "train.json", {"seconds": 0.0, "pretrained": cfg.teacher_from,
                                                  "unet_parameters": sum(t.numel() for t in p.unet.parameters())})
        atomic_write_json(source, settings)
    process_state().wait_for_everyone()
    return product

def certify_stage(cfg: QuickstartConfig, out: Path, clf: Path, teacher: Path, purifiers: dict, stages: dict) -> dict:
    """Cohen's CERTIFY of the standard classifier behind DDS (the teacher's one-shot denoiser) and the 1-step
    students, bare under Gaussian noise of the teacher's sigma, and of a classifier trained with that noise."""
    sigma = round(purifier_sigma(load_purifier(teacher)), 4)
    defenses = [{"purifier": "none", "sigma": sigma, "label": "gaussian"}]
    if not cfg.classifier_from:  # the job trains its classifier: train Cohen's baseline beside it
        noisy = run_stage(out / "classifier-noise", replace(stages["classifier"], {"noise_sd": sigma}), train_squeeze,
                          "classifier")
        defenses.append({"purifier": "none", "sigma": sigma, "label": "gaussian-noise-trained",
                         "classifier": str(noisy)})
    defenses.append({"purifier": str(teacher), "steps": 1, "mode": "ode", "label": "dds"})
    defenses += [{"purifier": str(folder), "label": label} for label, folder in purifiers.items()
                 if label.endswith("-1")]
    c = cfg.certify
    cert = CertifyConfig(dataset=cfg.dataset, data_root=cfg.data_root, classifier=str(clf), defenses=defenses,
                         examples=c.examples, n0=c.n0, n=c.n, alpha=c.alpha, batch=c.batch, seed=cfg.seed,
                         attack_steps=c.attack_steps, attack_votes=c.attack_votes, attack_n=c.attack_n)
    # the job owns this folder: each row's records and attacks carry their own settings and are reused only when
    # those match (else refused by name), so a changed budget (an older job's folder) need not refuse the whole
    return run_certify(cert, out / "certify", rows_decide=True)


def quickstart(out: str | Path = "runs/quickstart", fast: bool = False, cfg: QuickstartConfig | None = None) -> dict:
    """Run (reuse, resume) the six stages into OUT and write OUT/report.{md,json} and the plots."""
    cfg = cfg or quickstart_config(fast)
    out = Path(out)
    stages = stage_configs(cfg)
    check(cfg, stages)
    if process_state().is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    clock, t_start = {}, time.perf_counter()

    def timed(name, fn):
        t0 = time.perf_counter()
        result = fn()
        clock[name] = round(time.perf_counter() - t0, 1)
        return result

    print("stage 1/6: the standard classifier and the DiffPure teacher")
    clf, teacher = models_stage(cfg, out, stages, timed)
    print("stage 2/6: progressive and consistency students")
    purifiers = students_stage(cfg, out, stages, teacher, timed)
    print(f"stage 3/6: SRe2L and {cfg.robust_objective} distilled data ({cfg.recover.ipc} images per class)")
    classifiers, pipelines = data_stage(cfg, out, stages, clf, timed)
    print("stage 4/6: every classifier bare and behind every purifier, standard and adaptive attacks")
    evals = {}
    for name, folder in classifiers.items():
        print(f"[eval] classifier: {name}")
        same_inputs_or_fail(out / "eval" / name, {"classifier": folder, **purifiers})
        evals[name] = timed(f"eval {name}", lambda: run_robustness(
            eval_config(cfg, folder, purifiers, standard=name == "standard"), out / "eval" / name))
    print("stage 5/6: certified robustness (randomized smoothing) of DDS, the 1-step students and Gaussian noise")
    certified = timed("certify", lambda: certify_stage(cfg, out, clf, teacher, purifiers, stages))
    if not process_state().is_main_process:  # under `accelerate launch`: the main process times and reports
        return {}
    print("stage 6/6: latency of every defense")
    latency = timed("latency", lambda: measure_latency(cfg, purifiers, classifiers, out / "latency"))

    report = build_report(cfg, out, fast, classifiers, purifiers, evals, latency, pipelines)
    report["certify"] = certified
    report["seconds"] = {"total": round(time.perf_counter() - t_start, 1), **clock}
    figures(cfg, out, report, evals, purifiers)
    atomic_write_json(out / "report.json", report, sort_keys=False)
    atomic_write_text(out / "report.md", render(report))
    print(render(report))
    return report


def check(cfg: QuickstartConfig, stages: dict) -> None:
    """Every budget that would fail hours into the job, refused before any training."""
    plan = rounds(stages["progressive"])
    if not cfg.student_steps or set(cfg.student_steps) - set(plan):
        raise InputError(f"student_steps {cfg.student_steps} must be progressive rounds of "
                         f"start_steps {cfg.progressive.start_steps}: {plan}")
    if cfg.recover.ipc < 1:
        raise InputError(f"recover.ipc must be a positive integer, got {cfg.recover.ipc}")
    c = cfg.certify
    Smoothing(c.n0, c.n, c.alpha, c.batch).check()
    if min(c.examples, c.attack_votes, c.attack_n) < 1 or c.attack_steps < 0:
        raise InputError(f"certify.examples, attack_votes and attack_n must be >= 1 and certify.attack_steps >= 0, "
                         f"got {c.examples}, {c.attack_votes}, {c.attack_n}, {c.attack_steps}")


def models_stage(cfg: QuickstartConfig, out: Path, stages: dict, timed) -> tuple:
    """Stage 1: the standard classifier (trained, or `classifier_from`) and the teacher (trained, or `teacher_from`)."""
    if cfg.classifier_from:
        clf = cfg.classifier_from if is_named(cfg.classifier_from) else Path(cfg.classifier_from)
        load_classifier(clf)  # a wrong folder fails here, with the reason
    else:
        clf = timed("classifier", lambda: run_stage(out / "classifier", stages["classifier"], train_squeeze,
                                                    "classifier"))
    if cfg.teacher_from:
        teacher = timed("teacher", lambda: pretrained_teacher(cfg, out / "teacher"))
    else:
        teacher = timed("teacher", lambda: run_stage(out / "teacher", stages["teacher"], train_teacher, "purifier"))
    return clf, teacher


def students_stage(cfg: QuickstartConfig, out: Path, stages: dict, teacher: Path, timed) -> dict[str, Path]:
    """Stage 2: progressive and consistency students; returns every purifier by label, the teacher first."""
    for kind, train in (("progressive", train_progressive), ("consistency", train_consistency)):
        timed(kind, lambda: run_stage(out / kind, stages[kind], lambda c, o, resume: train(c, teacher, o, resume),
                                      "students", inputs={"teacher": teacher}))
    purifiers = {"teacher": teacher}
    for kind in ("progressive", "consistency"):
        purifiers.update({f"{kind}-{k}": out / kind / "students" / f"steps-{k}" for k in sorted(cfg.student_steps)})
    return purifiers


def data_stage(cfg: QuickstartConfig, out: Path, stages: dict, clf, timed) -> tuple[dict, dict]:
    """Stage 3: SRe2L data recovered from the standard classifier and robust data from a robust-squeezed one, a
    classifier trained on each; returns the three classifiers and the two pipelines' results."""
    shared = {"dataset": cfg.dataset, "data_root": cfg.data_root, "recover": to_dict(cfg.recover),
              "relabel": to_dict(cfg.relabel), "train": to_dict(stages["distilled_train"])}
    sre2l = timed("sre2l", lambda: pipeline(replace(PipelineConfig(), {
        **shared, "squeezed": str(clf), "squeeze": to_dict(stages["classifier"])}), out / "sre2l"))
    robust = timed(cfg.robust_objective, lambda: pipeline(replace(PipelineConfig(), {
        **shared, "squeeze": to_dict(stages["robust_squeeze"])}), out / cfg.robust_objective))
    classifiers = {"standard": clf, "sre2l": Path(sre2l["classifier"]),
                   f"{cfg.robust_objective}": Path(robust["classifier"])}
    return classifiers, {"sre2l": sre2l, "robust": robust}
