"""SRe2L end to end (squeeze, recover, relabel, train), with any squeeze objective (GUARD: objective guard)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from core.checkpoint import classifier_meta
from core.config import replace, save_config, to_dict
from core.errors import InputError
from core.io import atomic_write_json, read_json
from core.runs import run_stage

from .condense import CondenseConfig, condense
from .condense import check as check_condense
from .objectives import get_objective
from .recover import RecoverConfig, recover
from .relabel import RelabelConfig, relabel
from .squeeze import SqueezeConfig, train_squeeze
from .train import TrainConfig, train_distilled


@dataclass
class PipelineConfig:
    """One config for the four stages; the folders that link them are filled in by the pipeline."""

    dataset: str = "digits"
    data_root: str | None = None
    squeezed: str | None = None  # a classifier folder to recover from instead of squeezing (stage 1 skipped)
    # "sre2l": squeeze, recover, relabel, train; "dc": condense (DC, gradient matching), then train on hard labels
    method: str = "sre2l"
    # set: one seed for a whole run (each stage's seed; relabel's and train's crops from 42 + seed, FKD's 42 at 0)
    seed: int | None = None
    squeeze: SqueezeConfig = field(default_factory=SqueezeConfig)
    condense: CondenseConfig = field(default_factory=CondenseConfig)
    recover: RecoverConfig = field(default_factory=RecoverConfig)
    relabel: RelabelConfig = field(default_factory=RelabelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def stage_configs(cfg: PipelineConfig, out: Path) -> dict:
    """Each stage's config with the dataset and the previous stages' folders filled in."""
    data = {"dataset": cfg.dataset, "data_root": cfg.data_root}
    if cfg.seed is not None:
        seed, crops = {"seed": cfg.seed}, RelabelConfig.seed + cfg.seed
        cfg = replace(cfg, {"squeeze": seed, "condense": seed, "recover": seed, "relabel": {"seed": crops},
                            "train": {**seed, "crop_seed": crops}})
    clf = cfg.squeezed or str(out / "squeeze" / "classifier")
    distilled = str(out / "recover" / "distilled")
    online = cfg.train.soft_labels == "online"
    if cfg.method == "dc":
        distilled = str(out / "condense" / "distilled")
        return {"condense": replace(cfg.condense, data),
                "train": replace(cfg.train, {**data, "distilled": distilled, "teacher": "", "soft_labels": "hard"})}
    return {
        "squeeze": replace(cfg.squeeze, data),
        "recover": replace(cfg.recover, {"classifier": clf}),
        "relabel": replace(cfg.relabel, {"distilled": distilled, "classifier": clf}),
        "train": replace(cfg.train, {**data, "distilled": distilled, "teacher": clf,
                                     "soft_labels": "online" if online else str(out / "relabel")}),
    }


def pipeline(cfg: PipelineConfig, out: str | Path) -> dict:
    """Run (or reuse, or resume) the four stages into OUT/{squeeze,recover,relabel,train}; OUT/pipeline.json."""
    out = Path(out)
    if cfg.method not in ("sre2l", "dc"):
        raise InputError(f"method must be sre2l or dc, got {cfg.method!r}")
    stages = stage_configs(cfg, out)
    if cfg.method == "dc":
        return _dc_pipeline(cfg, stages, out)
    if stages["recover"].ipc < 1:
        raise InputError(f"recover.ipc must be a positive integer, got {stages['recover'].ipc}")
    get_objective(cfg.squeeze.objective)  # an unknown name fails here, before any stage runs
    if cfg.squeezed and not (Path(cfg.squeezed) / "config.json").is_file():
        raise FileNotFoundError(f"squeezed: {cfg.squeezed} is not a classifier folder (config.json missing)")
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    if cfg.squeezed:
        print(f"stage 1/4: squeeze skipped, recovering from {cfg.squeezed}")
        clf = Path(cfg.squeezed)
    else:
        print(f"stage 1/4: squeeze ({cfg.squeeze.objective})")
        clf = run_stage(out / "squeeze", stages["squeeze"], train_squeeze, "classifier")
    print(f"stage 2/4: recover ({stages['recover'].ipc} images per class)")
    distilled = run_stage(out / "recover", stages["recover"], lambda c, o, resume: recover(c, o), "distilled",
                          done="recover.json", inputs={"squeezed classifier": clf})
    if stages["train"].soft_labels != "online":
        print("stage 3/4: relabel (FKD soft labels)")
        run_stage(out / "relabel", stages["relabel"], lambda c, o, resume: relabel(c, o),
                  "soft_labels.safetensors", done="soft_labels.json",
                  inputs={"squeezed classifier": clf, "distilled data": distilled})
    print("stage 4/4: train a classifier on the distilled data")
    student = run_stage(out / "train", stages["train"], train_distilled, "classifier",
                        inputs={"squeezed classifier": clf, "distilled data": distilled})
    result = {"objective": cfg.squeeze.objective, "ipc": stages["recover"].ipc, "dataset": cfg.dataset,
              "squeezed_classifier": str(clf), "distilled": str(distilled), "classifier": str(student),
              "squeeze_test_accuracy": classifier_meta(clf).get("test_accuracy"),
              "test_accuracy": read_json(out / "train" / "train.json")["test_accuracy"],
              "config": to_dict(cfg)}
    atomic_write_json(out / "pipeline.json", result)
    return result


def _dc_pipeline(cfg: PipelineConfig, stages: dict, out: Path) -> dict:
    """DC: OUT/condense (the synthetic set), then OUT/train (a classifier on it, hard labels)."""
    check_condense(stages["condense"])
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    print(f"stage 1/2: condense (DC, {stages['condense'].ipc} images per class, objective {cfg.condense.objective})")
    distilled = run_stage(out / "condense", stages["condense"], lambda c, o, resume: condense(c, o), "distilled",
                          done="condense.json")
    print("stage 2/2: train a classifier on the condensed data (hard labels)")
    student = run_stage(out / "train", stages["train"], train_distilled, "classifier",
                        inputs={"distilled data": distilled})
    result = {"method": "dc", "objective": cfg.condense.objective, "ipc": stages["condense"].ipc,
              "dataset": cfg.dataset, "squeezed_classifier": None, "distilled": str(distilled),
              "classifier": str(student), "squeeze_test_accuracy": None,
              "test_accuracy": read_json(out / "train" / "train.json")["test_accuracy"], "config": to_dict(cfg)}
    atomic_write_json(out / "pipeline.json", result)
    return result
