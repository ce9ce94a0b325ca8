"""Records that cannot lie (issue 21): attack records keyed on what was measured, the strongest candidate of a
stochastic suite, recover's chunks across resumes and process counts, ordinary inputs, torn logs, DiffPure's
step variance for self-trained teachers."""

import json

import pytest
import torch
import torch.nn as nn

from core.errors import InputError
from core.io import module_digest, read_jsonl
from eval import Defended, evaluate
from eval.attacks import Strongest
from purify import ConsistencyStudent

from .conftest import digits_cnn, scheduler_config, tiny_unet

KW = dict(attacks=["pgd"], eps=0.1, steps={"pgd": 3}, check_steps=False, progress=None)


@pytest.fixture(scope="module")
def data():
    from core.datasets import load_dataset, to_tensors

    return to_tensors(load_dataset("digits", "test")[0], 16)


# 1. records keyed on content ----------------------------------------------------------------------------------

def test_a_different_model_evaluated_into_the_same_folder_is_refused_not_given_the_first_ones_report(data, tmp_path):
    x, y = data
    good, bad = digits_cnn(), nn.Sequential(nn.Flatten(), nn.Linear(256, 10))  # same layout of records, other model
    first = evaluate(good, x, y, out=tmp_path / "e", **KW)
    assert evaluate(good, x, y, out=tmp_path / "e", **KW)["clean"] == first["clean"]  # the same model resumes
    with pytest.raises(FileExistsError, match="model"):
        evaluate(bad, x, y, out=tmp_path / "e", **KW)
    retrained = digits_cnn(steps=5)  # the same architecture "retrained into the same folder": other weights
    with pytest.raises(FileExistsError, match="model"):
        evaluate(retrained, x, y, out=tmp_path / "e", **KW)
    with pytest.raises(FileExistsError, match="images"):  # other examples under the same labels
        evaluate(good, (x + 0.01).clamp(0, 1), y, out=tmp_path / "e", **KW)


def test_a_purifier_with_other_weights_or_t_star_has_another_digest():
    clf = digits_cnn(steps=1)
    a = ConsistencyStudent(tiny_unet(1, 16, 0), scheduler_config(), 0.1, 1)
    assert module_digest(Defended(a, clf)) == module_digest(Defended(
        ConsistencyStudent(tiny_unet(1, 16, 0), scheduler_config(), 0.1, 1, seed=7), clf))  # the seed is not content
    assert module_digest(Defended(a, clf)) != module_digest(Defended(
        ConsistencyStudent(tiny_unet(1, 16, 1), scheduler_config(), 0.1, 1), clf))
    assert module_digest(Defended(a, clf)) != module_digest(Defended(
        ConsistencyStudent(tiny_unet(1, 16, 0), scheduler_config(), 0.05, 1), clf))
    assert module_digest(Defended(a, clf)) != module_digest(Defended(a, clf, votes=3))


class Noise(nn.Module):
    """A user's own defense set by a plain attribute: no weights, no config(), no extra_repr."""

    def __init__(self, sigma: float, seed: int = 0):
        super().__init__()
        self.sigma, self.gen = sigma, torch.Generator().manual_seed(seed)

    def manual_seed(self, seed):
        self.gen = torch.Generator().manual_seed(seed)
        return self

    def forward(self, x):
        return (x + self.sigma * torch.randn(x.shape, generator=self.gen)).clamp(0, 1)


def test_a_defense_set_by_a_plain_attribute_is_keyed_on_it(data, tmp_path):
    """Noise(0.01) and then Noise(0.9) into one folder: the second is refused, never given the first's report."""
    x, y = data
    clf = digits_cnn()
    kw = {**KW, "attacks": [], "evals": 1}
    first = evaluate(Defended(Noise(0.01), clf), x, y, out=tmp_path / "e", **kw)
    assert evaluate(Defended(Noise(0.01), clf), x, y, out=tmp_path / "e", **kw)["clean"] == first["clean"]
    with pytest.raises(FileExistsError, match="model"):
        evaluate(Defended(Noise(0.9), clf), x, y, out=tmp_path / "e", **kw)
    own = evaluate(Defended(Noise(0.9), clf), x, y, out=tmp_path / "f", **kw)["clean"]["average"]
    assert own < first["clean"]["average"]  # the setting changes the figure: a shared digest would have hidden it
    assert module_digest(Noise(0.01)) != module_digest(Noise(0.9))


class Opaque:
    """A setting held in an object with no repr of its own: the digest cannot read it."""

    def __init__(self, sigma):
        self.sigma = sigma


class OpaqueNoise(Noise):
    def __init__(self, sigma: float):
        super().__init__(0.0)
        self.setting = Opaque(sigma)

    def forward(self, x):
        return (x + self.setting.sigma * torch.randn(x.shape, generator=self.gen)).clamp(0, 1)


def test_records_of_a_defense_the_digest_cannot_tell_apart_are_not_reused(data, tmp_path):
    x, y = data
    clf = digits_cnn()
    kw = {**KW, "attacks": [], "evals": 1}
    assert module_digest(OpaqueNoise(0.01)) == module_digest(OpaqueNoise(0.9))  # the case the digest cannot see
    evaluate(Defended(OpaqueNoise(0.01), clf), x, y, out=tmp_path / "e", **kw)  # a new folder: runs and records
    with pytest.raises(InputError, match="setting"):
        evaluate(Defended(OpaqueNoise(0.9), clf), x, y, out=tmp_path / "e", **kw)


def test_robustness_command_refuses_a_retrained_classifier_in_the_same_folders(tmp_path):
    from core.checkpoint import save_classifier
    from core.models import ClassifierConfig, build_classifier
    from eval.robustness import EvalConfig, run_robustness

    cfg_c = ClassifierConfig(arch="convnet", in_channels=1, num_classes=10, image_size=16, width=4, depth=1,
                             mean=[0.5], std=[0.5])
    torch.manual_seed(0)
    save_classifier(build_classifier(cfg_c), tmp_path / "clf", cfg_c)
    from eval.harness import Budget

    cfg = EvalConfig(classifier=str(tmp_path / "clf"), defenses=["none"],
                     budget=Budget(attacks=["pgd"], n=8, steps={"pgd": 2}, check_steps=False))
    run_robustness(cfg, tmp_path / "ev")
    torch.manual_seed(1)  # "retrained into the same folder"
    save_classifier(build_classifier(cfg_c), tmp_path / "clf", cfg_c)
    with pytest.raises(FileExistsError, match="model"):
        run_robustness(cfg, tmp_path / "ev")


def test_a_row_added_to_a_finished_run_reuses_the_others_records_and_nothing_else_may_change(tmp_path):
    from core.checkpoint import save_classifier
    from core.models import ClassifierConfig, build_classifier
    from eval.harness import Budget
    from eval.robustness import EvalConfig, run_robustness

    cfg_c = ClassifierConfig(arch="convnet", in_channels=1, num_classes=10, image_size=16, width=4, depth=1,
                             mean=[0.5], std=[0.5])
    torch.manual_seed(0)
    save_classifier(build_classifier(cfg_c), tmp_path / "clf", cfg_c)
    budget = Budget(attacks=["pgd"], n=8, steps={"pgd": 2}, check_steps=False)

    def run(rows, b=budget):
        return run_robustness(EvalConfig(classifier=str(tmp_path / "clf"), defenses=rows, budget=b), tmp_path / "ev")

    first = run(["none"])
    log = tmp_path / "ev" / "undefended" / "examples.jsonl"
    before = log.read_text()
    report = run([{"purifier": "none", "label": "longer", "steps": {"pgd": 4}}, "none"])  # a row added, reordered
    assert log.read_text() == before  # the finished row was not attacked again
    assert list(report["defenses"]) == ["longer", "undefended"]
    assert report["defenses"]["undefended"]["attacks"] == first["defenses"]["undefended"]["attacks"]
    assert (tmp_path / "ev" / "longer" / "examples.jsonl").is_file()
    with pytest.raises(FileExistsError, match="attack records made with another jobs"):  # a row's own budget changed
        run([{"purifier": "none", "steps": {"pgd": 4}}])
    with pytest.raises(FileExistsError, match="another config other than its defenses"):  # the shared budget changed
        run(["none"], Budget(attacks=["pgd"], n=4, steps={"pgd": 2}, check_steps=False))

# 2. the strongest candidate on a stochastic defense ---------------------------------------------------------

class CodeNoise(nn.Module):
    """Channel 0 keeps the candidate's code; channel 1 becomes N(0, 1) from the purifier's own generator."""

    def manual_seed(self, seed):
        self.g = torch.Generator().manual_seed(seed)
        return self

    def forward(self, x):
        return torch.stack([x[:, 0], torch.randn(x[:, 1].shape, generator=self.g)], 1)


class MarginOfCode(nn.Module):
    """Logits [0, m] (label 0): the margin m = mu + sd z, with (mu, sd) = (-0.5, 2) for code 0.25, (-0.2, 0.1)
    for code 0.75: the first fools about 40% of the draws, the second about 2%."""

    def forward(self, x):
        code, z = x[:, 0].mean((1, 2)), x[:, 1].mean((1, 2)) * x.shape[-1]  # z back to unit variance
        mu, sd = torch.where(code < 0.5, -0.5, -0.2), torch.where(code < 0.5, 2.0, 0.1)
        return torch.stack([torch.zeros_like(code), mu + sd * z], 1)


def test_strongest_keeps_the_candidate_that_fools_the_most_draws_not_the_highest_mean_margin():
    model = Defended(CodeNoise().manual_seed(0), MarginOfCode())
    x, y = torch.full((16, 2, 4, 4), 0.5), torch.zeros(16, dtype=torch.long)
    often = lambda x, y: [torch.full_like(x, 0.25)]  # noqa: E731  mean margin -0.5, fools ~40% of draws
    rarely = lambda x, y: [torch.full_like(x, 0.75)]  # noqa: E731  mean margin -0.2, fools ~2%
    for order in ([("often", often), ("rarely", rarely)], [("rarely", rarely), ("often", often)]):
        best, source = Strongest(model, order, "Linf", 0.25, draws=32, seed=3)(x, y)
        assert source == ["often"] * 16, order
        assert torch.equal(best, torch.full_like(x, 0.25))


def test_strongest_scores_every_candidate_on_the_same_draws():
    model = Defended(CodeNoise().manual_seed(0), MarginOfCode())
    s = Strongest(model, [], "Linf", 0.25, draws=8, seed=5)
    x, y = torch.full((4, 2, 4, 4), 0.25), torch.zeros(4, dtype=torch.long)
    assert all(torch.equal(a, b) for a, b in zip(s.score(x, y), s.score(x, y)))


# 3. recover: chunks by content, independent of the process count --------------------------------------------

class FakeAcc:
    def __init__(self, rank, world):
        self.process_index, self.num_processes, self.is_main_process = rank, world, rank == 0
        self.device = torch.device("cpu")

    def wait_for_everyone(self):
        pass


def _recover(monkeypatch, cfg, out, rank=0, world=1):
    import robust_data.recover as rec

    def shared(out_, cfg_, subdir):
        from core.config import save_config

        (out_ / subdir).mkdir(parents=True, exist_ok=True)
        save_config(cfg_, out_ / "config.yaml")
        return FakeAcc(rank, world), out_

    monkeypatch.setattr(rec, "open_shared_folder", lambda o, c, s: shared(rec.Path(o), c, s))
    return rec.recover(cfg, out)


@pytest.fixture(scope="module")
def bn_classifier(tmp_path_factory):
    from core.checkpoint import save_classifier
    from core.models import ClassifierConfig, build_classifier

    folder = tmp_path_factory.mktemp("bn") / "clf"
    cfg = ClassifierConfig(arch="convnet-bn", in_channels=1, num_classes=10, image_size=16, width=4, depth=1,
                           mean=[0.5], std=[0.5])
    torch.manual_seed(0)
    save_classifier(build_classifier(cfg).eval(), folder, cfg)
    return folder


def test_recover_killed_on_two_processes_and_resumed_on_one_gives_the_one_process_set(bn_classifier, tmp_path,
                                                                                       monkeypatch):
    from robust_data.distilled import load_distilled
    from robust_data.recover import RecoverConfig

    cfg = RecoverConfig(classifier=str(bn_classifier), ipc=4, iterations=2, batch_size=12, crop=False)
    ref = load_distilled(_recover(monkeypatch, cfg, tmp_path / "one"))
    with pytest.raises(RuntimeError, match="missing"):  # rank 0 of 2 alone: the merge refuses a partial set
        _recover(monkeypatch, cfg, tmp_path / "mixed", rank=0, world=2)
    _recover(monkeypatch, cfg, tmp_path / "mixed", rank=1, world=2)
    images, labels, meta = load_distilled(_recover(monkeypatch, cfg, tmp_path / "mixed"))  # resumed on one
    assert torch.equal(labels, ref[1]) and torch.equal(images, ref[0])
    assert labels.bincount(minlength=10).tolist() == [4] * 10


def test_recover_redoes_a_chunk_file_whose_content_is_another_batch(bn_classifier, tmp_path, monkeypatch):
    from core.io import atomic_save_tensors
    from robust_data.distilled import load_distilled
    from robust_data.recover import RecoverConfig, chunk_file, chunk_plan

    cfg = RecoverConfig(classifier=str(bn_classifier), ipc=2, iterations=2, batch_size=8, crop=False)
    ref = load_distilled(_recover(monkeypatch, cfg, tmp_path / "ref"))
    plan = chunk_plan(10, 2, 8)
    wrong = chunk_file(tmp_path / "bad" / "batches", plan[0])  # the right name, another batch's content
    atomic_save_tensors({"images": torch.zeros(8, 1, 16, 16), "labels": torch.tensor([c for c, _ in plan[1][:8]]),
                         "index": torch.tensor([k for _, k in plan[1][:8]])}, wrong)
    images, labels, _ = load_distilled(_recover(monkeypatch, cfg, tmp_path / "bad"))
    assert torch.equal(images, ref[0]) and torch.equal(labels, ref[1])


# 4. ordinary inputs ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_purifier_and_harness_take_float64_float16_and_bfloat16_batches(data, dtype):
    x, y = data
    p = ConsistencyStudent(tiny_unet(1, 16), scheduler_config(), 0.1, 1)
    ref = p.manual_seed(0)(x)
    out = p.manual_seed(0)(x.to(dtype))
    assert out.dtype == dtype and torch.allclose(out.float(), ref, atol=1e-2 if dtype != torch.float64 else 1e-6)
    clf = digits_cnn(steps=20)
    r32 = evaluate(clf, x, y, **KW)
    r = evaluate(clf, x.to(dtype), torch.from_numpy(y.numpy().astype("int32")), **KW)
    assert r["per_example"]["clean"] == r32["per_example"]["clean"] or dtype != torch.float64
    assert r["examples"] == len(y)


def test_harness_refuses_integer_pixels_and_float_labels_in_one_sentence(data):
    x, y = data
    with pytest.raises(InputError, match="float pixels"):
        evaluate(digits_cnn(steps=1), (x * 255).to(torch.uint8), y, **KW)
    with pytest.raises(InputError, match="integer class"):
        evaluate(digits_cnn(steps=1), x, y.float(), **KW)


def test_none_means_the_default_in_evaluate(data):
    x, y = data
    clf = digits_cnn(steps=20)
    a = evaluate(clf, x, y, ["pgd"], eps=0.1, check_steps=False, progress=None, steps=None, eot=None, norm=None,
                 grad_checkpoint=None, queries=None)
    assert a["strength"]["pgd"]["steps"] == 100 and a["threat"]["norm"] == "Linf"


def test_a_torn_last_log_line_does_not_block_a_resume(tmp_path):
    from core.runs import JsonlLog

    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n{"step": 3, "lo')
    JsonlLog(log).drop_after(1)
    assert read_jsonl(log) == [{"step": 1, "loss": 1.0}]


def test_a_killed_condense_run_with_a_torn_log_line_resumes(tmp_path):
    from robust_data.condense import CondenseConfig, condense

    tiny = dict(ipc=1, iterations=2, width=4, depth=1, batch_real=4, batch_train=4, checkpoint_every=1)
    condense(CondenseConfig(**tiny), tmp_path / "dc")
    (tmp_path / "dc" / "state.json").write_text(json.dumps({"iteration": 1}))
    with (tmp_path / "dc" / "log.jsonl").open("a") as f:
        f.write('{"iteration": 3, "ma')
    condense(CondenseConfig(**tiny), tmp_path / "dc")
    assert [r["iteration"] for r in read_jsonl(tmp_path / "dc" / "log.jsonl")] == [1, 2]


# 5. DiffPure's step variance for self-trained teachers --------------------------------------------------------

def test_teacher_config_chooses_the_step_variance_and_defaults_to_diffpures(tmp_path):
    from core.config import load_config
    from distill.teacher import NoiseScheduleConfig, TeacherConfig, scheduler_config, validate
    from purify import VPSchedule

    assert VPSchedule.from_scheduler_config(scheduler_config(NoiseScheduleConfig())).variance_type == "beta"
    small = NoiseScheduleConfig(variance_type="fixed_small")
    assert VPSchedule.from_scheduler_config(scheduler_config(small)).variance_type == "posterior"
    with pytest.raises(InputError, match="variance_type"):
        validate(TeacherConfig(scheduler=NoiseScheduleConfig(variance_type="learned")))
    for path in ("configs/digits/teacher.yaml", "configs/cifar10/teacher.yaml", "configs/cifar10/teacher-cpu.yaml"):
        assert load_config(TeacherConfig, path).scheduler.variance_type == "fixed_large", path


def test_a_module_holding_a_lambda_has_one_digest_and_is_named_as_unreadable():
    """An object described only by its address (a lambda, a dict of generators) never enters the digest: the
    digest stays the same from instance to instance (and process to process), and the lambda is named."""
    from core.io import undigested

    class Hooked(nn.Module):
        def __init__(self):
            super().__init__()
            self.fn, self.gens, self.table = (lambda x: x), {"cpu": torch.Generator()}, torch.arange(3.0).numpy()

        def forward(self, x):
            return self.fn(x)

    assert module_digest(Hooked()) == module_digest(Hooked())
    assert undigested(Hooked()) == ["fn"]
