"""Deploying a student: ONNX export with the noise as inputs, parity with PyTorch under ONNX Runtime, the runner,
and the errors a user meets first."""

import json

import pytest
import torch
import torch.nn as nn

from purify import ConsistencyStudent, DiffPure, ProgressiveStudent

from .conftest import scheduler_config, tiny_unet

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from purify.onnx import export_onnx, load_onnx_purifier, noise_count  # noqa: E402

STUDENTS = {
    "progressive-1": lambda: ProgressiveStudent(tiny_unet(3, 16), scheduler_config(), 0.1, 1,
                                                prediction_type="epsilon"),
    "progressive-4": lambda: ProgressiveStudent(tiny_unet(3, 16), scheduler_config(), 0.1, 4,
                                                prediction_type="v_prediction"),
    "consistency-1": lambda: ConsistencyStudent(tiny_unet(3, 16), scheduler_config(), 0.1, 1),
    "consistency-2": lambda: ConsistencyStudent(tiny_unet(3, 16), scheduler_config(), 0.1, 2),
    "consistency-4": lambda: ConsistencyStudent(tiny_unet(3, 16), scheduler_config(), 0.1, 4),
}


def classifier():
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 256, 10)).eval()


@pytest.mark.parametrize("kind", sorted(STUDENTS))
@pytest.mark.parametrize("with_classifier", [False, True])
def test_onnx_runtime_equals_pytorch_on_the_same_input_and_noise(kind, with_classifier, tmp_path):
    p = STUDENTS[kind]()
    clf = classifier() if with_classifier else None
    meta = export_onnx(p, tmp_path / "s.onnx", classifier=clf)
    assert meta["noise_inputs"] == noise_count(p) == {"consistency-2": 2, "consistency-4": 4}.get(kind, 1)
    runner = load_onnx_purifier(tmp_path / "s.onnx", seed=5)
    for batch in (1, 5):
        x = torch.rand(batch, 3, 16, 16)
        with torch.no_grad():
            ref = p.manual_seed(5)(x)
            ref = clf(ref) if clf is not None else ref
        runner.manual_seed(5)
        out = runner(x)
        assert out.shape == ref.shape and (out - ref).abs().max() <= 1e-4, (out - ref).abs().max()
    # the exported defense stays stochastic: another seed, another purification
    assert not torch.allclose(runner.manual_seed(6)(x), runner.manual_seed(5)(x))


def test_a_fixed_batch_export_and_its_sidecar(tmp_path):
    p = STUDENTS["consistency-1"]()
    meta = export_onnx(p, tmp_path / "s.onnx", batch=3)
    assert json.loads((tmp_path / "s.onnx.json").read_text())["batch"] == 3 == meta["batch"]
    assert load_onnx_purifier(tmp_path / "s.onnx")(torch.rand(3, 3, 16, 16)).shape == (3, 3, 16, 16)


def test_bad_exports_say_what_is_wrong_before_writing(tmp_path):
    from core.errors import InputError

    teacher = DiffPure(tiny_unet(3, 16), scheduler_config(), t_star=0.1, steps=100)
    with pytest.raises(InputError, match="100 network evaluations"):
        export_onnx(teacher, tmp_path / "t.onnx")
    with pytest.raises(InputError, match="does not take the purifier's 3x16x16 images"):
        export_onnx(STUDENTS["consistency-1"](), tmp_path / "c.onnx",
                    classifier=nn.Sequential(nn.Flatten(), nn.Linear(10, 2)))
    with pytest.raises(InputError, match="opset 9 is too old"):
        export_onnx(STUDENTS["consistency-1"](), tmp_path / "c.onnx", opset=9)
    with pytest.raises(InputError, match="wants a purifier"):
        export_onnx(classifier(), tmp_path / "c.onnx")
    assert not list(tmp_path.iterdir())


def test_export_command_writes_the_file_and_refuses_a_folder_that_is_not_a_purifier(tmp_path):
    from eval.__main__ import main

    STUDENTS["progressive-1"]().save(tmp_path / "pd1")
    main(["export", "--purifier", str(tmp_path / "pd1"), "--out", str(tmp_path / "pd1.onnx")])
    assert (tmp_path / "pd1.onnx").stat().st_size > 0
    with pytest.raises(SystemExit, match="not a purifier folder"):
        main(["export", "--purifier", str(tmp_path), "--out", str(tmp_path / "x.onnx")])


def test_the_runner_is_a_purifier_for_the_harness_and_the_latency_benchmark(tmp_path):
    from eval import Defended, evaluate, onnx_purifier
    from eval.bench.latency import benchmark

    p = STUDENTS["consistency-1"]()
    export_onnx(p, tmp_path / "s.onnx")
    runner = onnx_purifier(tmp_path / "s.onnx")
    x, y = torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    r = evaluate(Defended(runner, classifier()), x, y, ["bpda-eot"], evals=2, eps=0.05, eot=1,
                 steps={"bpda-eot": 2}, check_steps=False, progress=None)
    assert r["stochastic"] and not r["raised"]
    rows = benchmark({"consistency-1": p}, None, [1, 2], warmup=0, repeats=1, onnx=[tmp_path / "s.onnx"])
    ort = [row for row in rows if row["variant"] == "onnxruntime"]
    assert [row["batch_size"] for row in ort] == [1, 2] and all(row["vs_plain"] for row in ort)
