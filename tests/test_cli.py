"""The ``perceiver-np`` command on ordinary mistakes: one line naming the path or flag, no
traceback, exit 2 for usage and input errors, 1 for a failed check, 130 when interrupted."""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import pytest

import perceiver_np as pnp
from perceiver_np import checkpoint, cost, verify
from perceiver_np.cli import _schedule
from perceiver_np.cli import main as cli

from .helpers import small_opts

MODEL = ["--input-dim", "5", "--latent-dim", "8", "--num-latents", "3", "--num-heads", "2",
         "--num-layers", "1", "--dropout", "0", "--decoder", "classification", "--output-dim", "3"]


@pytest.fixture(scope="module")
def f(tmp_path_factory):
    """Paths of good and bad files, shared by every case."""
    root = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 6, 5)).astype(np.float32)
    y = rng.integers(0, 3, size=12)
    paths = SimpleNamespace(root=root, missing=root / "missing.npz", folder=root / "a_folder",
                            garbage=root / "garbage.npz", text=root / "notes.txt",
                            data=root / "train.npz", no_y=root / "no_y.npz", short_y=root / "short_y.npz",
                            x=root / "x.npy", mask=root / "mask.npy", seqs=root / "seqs.npz",
                            ck=root / "ck.npz", golden=root / "golden.npz", nowhere=root / "nowhere")
    paths.folder.mkdir()
    paths.garbage.write_bytes(b"\x00\x01 not an npz at all \xff" * 10)
    paths.text.write_text("x,y\n1,2\n")
    np.savez(paths.data, x=x, y=y)
    np.savez(paths.no_y, x=x)
    np.savez(paths.short_y, x=x, y=y[:7])
    np.save(paths.x, x)
    np.save(paths.mask, np.ones((12, 6), dtype=bool))
    np.savez(paths.seqs, x[0], x[1, :3])
    cfg = pnp.PerceiverConfig(**small_opts(decoder="classification", output_dim=3, num_layers=1,
                                           dtype="float32"))
    checkpoint.save_checkpoint(paths.ck, config=cfg, params=pnp.Perceiver(cfg).params)
    golden_cfg = pnp.PerceiverConfig(**small_opts(num_layers=1))
    verify.write_golden(paths.golden, pnp.Perceiver(golden_cfg), rng.normal(size=(2, 4, 5)))
    return paths


def run(argv, capsys):
    """-> (exit code, stdout, stderr). An exception escaping main fails the test: the user
    would have seen a traceback."""
    try:
        code = cli([str(a) for a in argv])
    except SystemExit as exc:  # argparse's own exit, as the console script would see it
        code = exc.code
    except KeyboardInterrupt:  # would end the test session: a traceback for the user
        pytest.fail("KeyboardInterrupt escaped main")
    out, err = capsys.readouterr()
    return code, out, err


def train(f, *more):
    return ["train", *MODEL, "--data", f.data, "--epochs", "1", "--batch-size", "4",
            "--out", f.root / "ck.npz", "--quiet", *more]


# (argv builder, exit code, what stderr must name: a path or a flag)
CASES = {
    # input files: missing, a directory, not an .npz/.npy, incomplete
    "train --data missing": (lambda f: [*train(f), "--data", f.missing], 2, lambda f: f.missing),
    "train --data directory": (lambda f: [*train(f), "--data", f.folder], 2, lambda f: f.folder),
    "train --data garbage": (lambda f: [*train(f), "--data", f.garbage], 2, lambda f: f.garbage),
    "train --data text": (lambda f: [*train(f), "--data", f.text], 2, lambda f: f.text),
    "train --data without y": (lambda f: [*train(f), "--data", f.no_y], 2, lambda f: f.no_y),
    "train --data y shorter": (lambda f: [*train(f), "--data", f.short_y], 2, lambda f: f.short_y),
    "train --eval-data missing": (lambda f: [*train(f), "--eval-data", f.missing], 2, lambda f: f.missing),
    "train --eval-data directory": (lambda f: [*train(f), "--eval-data", f.folder], 2, lambda f: f.folder),
    "eval --checkpoint missing": (lambda f: ["eval", "--checkpoint", f.missing, "--data", f.data], 2,
                                  lambda f: f.missing),
    "eval --checkpoint directory": (lambda f: ["eval", "--checkpoint", f.folder, "--data", f.data], 2,
                                    lambda f: f.folder),
    "eval --checkpoint garbage": (lambda f: ["eval", "--checkpoint", f.garbage, "--data", f.data], 2,
                                  lambda f: f.garbage),
    "eval --data missing": (lambda f: ["eval", "--checkpoint", f.ck, "--data", f.missing], 2,
                            lambda f: f.missing),
    "eval --data text": (lambda f: ["eval", "--checkpoint", f.ck, "--data", f.text], 2, lambda f: f.text),
    "eval --data without y": (lambda f: ["eval", "--checkpoint", f.ck, "--data", f.no_y], 2,
                              lambda f: f.no_y),
    "predict --input missing": (lambda f: ["predict", "--checkpoint", f.ck, "--input", f.root / "no.npy",
                                           "--out", f.root / "y.npy"], 2, lambda f: f.root / "no.npy"),
    "predict --input directory": (lambda f: ["predict", "--checkpoint", f.ck, "--input", f.folder,
                                             "--out", f.root / "y.npy"], 2, lambda f: f.folder),
    "predict --input garbage": (lambda f: ["predict", "--checkpoint", f.ck, "--input", f.text,
                                           "--out", f.root / "y.npy"], 2, lambda f: f.text),
    "predict --input garbage npz": (lambda f: ["predict", "--checkpoint", f.ck, "--input", f.garbage,
                                               "--out", f.root / "y.npy"], 2, lambda f: f.garbage),
    "predict --stream --input missing": (lambda f: ["predict", "--checkpoint", f.ck, "--stream", "--input",
                                                    f.root / "no.npy", "--out", f.root / "y.npy"], 2,
                                         lambda f: f.root / "no.npy"),
    "predict --stream --input garbage": (lambda f: ["predict", "--checkpoint", f.ck, "--stream", "--input",
                                                    f.text, "--out", f.root / "y.npy"], 2, lambda f: f.text),
    "predict --mask missing": (lambda f: ["predict", "--checkpoint", f.ck, "--input", f.x, "--mask",
                                          f.root / "no.npy", "--out", f.root / "y.npy"], 2,
                               lambda f: f.root / "no.npy"),
    "predict --mask directory": (lambda f: ["predict", "--checkpoint", f.ck, "--input", f.x, "--stream",
                                            "--mask", f.folder, "--out", f.root / "y.npy"], 2,
                                 lambda f: f.folder),
    "predict --checkpoint missing": (lambda f: ["predict", "--checkpoint", f.missing, "--input", f.x,
                                                "--out", f.root / "y.npy"], 2, lambda f: f.missing),
    "golden --params missing": (lambda f: ["golden", "--input-dim", "5", "--params", f.missing,
                                           "--out", f.root / "g.npz"], 2, lambda f: f.missing),
    "golden --params directory": (lambda f: ["golden", "--input-dim", "5", "--params", f.folder,
                                             "--out", f.root / "g.npz"], 2, lambda f: f.folder),
    "compare golden missing": (lambda f: ["compare", f.missing, f.golden], 2, lambda f: f.missing),
    "compare golden directory": (lambda f: ["compare", f.folder, f.golden], 2, lambda f: f.folder),
    "compare theirs directory": (lambda f: ["compare", f.golden, f.folder], 2, lambda f: f.folder),
    "compare theirs garbage": (lambda f: ["compare", f.golden, f.garbage], 2, lambda f: f.garbage),
    # output paths: checked before any work
    "train --out in a missing folder": (lambda f: [*train(f), "--out", f.nowhere / "ck.npz"], 2,
                                        lambda f: f.nowhere / "ck.npz"),
    "train --out is a directory": (lambda f: [*train(f), "--out", f.folder], 2, lambda f: f.folder),
    "train --log in a missing folder": (lambda f: [*train(f), "--out", f.root / "ck2.npz", "--log",
                                                   f.nowhere / "log.jsonl"], 2,
                                        lambda f: f.nowhere / "log.jsonl"),
    "train --log is a directory": (lambda f: [*train(f), "--out", f.root / "ck2.npz", "--log", f.folder],
                                   2, lambda f: f.folder),
    "train --out under a file": (lambda f: [*train(f), "--out", f.data / "ck.npz"], 2,
                                 lambda f: f.data / "ck.npz"),
    "predict --out in a missing folder": (lambda f: ["predict", "--checkpoint", f.ck, "--input", f.x,
                                                     "--out", f.nowhere / "y.npy"], 2,
                                          lambda f: f.nowhere / "y.npy"),
    "predict --out is a directory": (lambda f: ["predict", "--checkpoint", f.ck, "--input", f.x,
                                                "--out", f.folder], 2, lambda f: f.folder),
    "golden --out in a missing folder": (lambda f: ["golden", "--input-dim", "5", "--out",
                                                    f.nowhere / "g.npz"], 2, lambda f: f.nowhere / "g.npz"),
    "golden --out is a directory": (lambda f: ["golden", "--input-dim", "5", "--out", f.folder], 2,
                                    lambda f: f.folder),
    # numbers out of range: refused by the parser, naming the flag
    "info --length -5": (lambda f: ["info", "--input-dim", "3", "--length", "-5"], 2, lambda f: "--length"),
    "info --length 0": (lambda f: ["info", "--input-dim", "3", "--length", "0"], 2, lambda f: "--length"),
    "info --latent-dim 0": (lambda f: ["info", "--input-dim", "3", "--latent-dim", "0"], 2,
                            lambda f: "--latent-dim"),
    "info --dropout 1.5": (lambda f: ["info", "--input-dim", "3", "--dropout", "1.5"], 2,
                           lambda f: "--dropout"),
    "info --decoder bogus": (lambda f: ["info", "--input-dim", "3", "--decoder", "bogus"], 2,
                             lambda f: "--decoder"),
    "train --warmup -1": (lambda f: [*train(f), "--warmup", "-1"], 2, lambda f: "--warmup"),
    "train --warmup 1.5": (lambda f: [*train(f), "--warmup", "1.5"], 2, lambda f: "--warmup"),
    "train --batch-size 0": (lambda f: [*train(f), "--batch-size", "0"], 2, lambda f: "--batch-size"),
    "train --batch-size -3": (lambda f: [*train(f), "--batch-size", "-3"], 2, lambda f: "--batch-size"),
    "train --epochs -1": (lambda f: [*train(f), "--epochs", "-1"], 2, lambda f: "--epochs"),
    "train --epochs 0": (lambda f: [*train(f), "--epochs", "0"], 2, lambda f: "--epochs"),
    "train --patience 0": (lambda f: [*train(f), "--patience", "0"], 2, lambda f: "--patience"),
    "train --lr 0": (lambda f: [*train(f), "--lr", "0"], 2, lambda f: "--lr"),
    "train --lr -1e-3": (lambda f: [*train(f), "--lr=-1e-3"], 2, lambda f: "--lr"),
    "train --lr nan": (lambda f: [*train(f), "--lr", "nan"], 2, lambda f: "--lr"),
    "train --clip-norm 0": (lambda f: [*train(f), "--clip-norm", "0"], 2, lambda f: "--clip-norm"),
    "train --clip-norm -1": (lambda f: [*train(f), "--clip-norm", "-1"], 2, lambda f: "--clip-norm"),
    "train --label-smoothing 2": (lambda f: [*train(f), "--label-smoothing", "2"], 2,
                                  lambda f: "--label-smoothing"),
    "eval --batch-size -1": (lambda f: ["eval", "--checkpoint", f.ck, "--data", f.data, "--batch-size", "-1"],
                             2, lambda f: "--batch-size"),
    "predict --batch-size 0": (lambda f: ["predict", "--checkpoint", f.ck, "--input", f.x, "--out",
                                          f.root / "y.npy", "--batch-size", "0"], 2,
                               lambda f: "--batch-size"),
    "predict --chunk-size 0": (lambda f: ["predict", "--checkpoint", f.ck, "--input", f.x, "--stream",
                                          "--out", f.root / "y.npy", "--chunk-size", "0"], 2,
                               lambda f: "--chunk-size"),
    "gradcheck --length 0": (lambda f: ["gradcheck", "--input-dim", "5", "--length", "0"], 2,
                             lambda f: "--length"),
    "gradcheck --batch 0": (lambda f: ["gradcheck", "--input-dim", "5", "--batch", "0"], 2,
                            lambda f: "--batch"),
    "golden --batch 0": (lambda f: ["golden", "--input-dim", "5", "--batch", "0", "--out", f.root / "g.npz"],
                         2, lambda f: "--batch"),
    "golden --length -2": (lambda f: ["golden", "--input-dim", "5", "--length=-2", "--out",
                                      f.root / "g.npz"], 2, lambda f: "--length"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_user_errors_are_one_line_without_traceback(case, f, capsys):
    argv, want_code, named = CASES[case]
    t0 = time.perf_counter()
    code, _, err = run(argv(f), capsys)
    command = case.split()[0]
    assert code == want_code, err
    assert "Traceback" not in err
    assert f"perceiver-np {command}: error: " in err
    assert str(named(f)) in err
    assert ".tmp" not in err  # never the name of a hidden temporary file
    assert time.perf_counter() - t0 < 30  # found before any epoch or model is run


def test_a_text_file_as_data_says_so(f, capsys):
    code, _, err = run([*train(f), "--data", f.text], capsys)
    assert code == 2 and f"{f.text}: not a readable .npz file" in err


@pytest.mark.parametrize("command", ["train", "predict", "golden"])
def test_output_paths_are_checked_before_any_work(command, f, capsys, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("work started before the output path was checked")

    monkeypatch.setattr("perceiver_np.train.fit", no_work)
    monkeypatch.setattr("perceiver_np.checkpoint.load_checkpoint", no_work)
    monkeypatch.setattr("perceiver_np.verify.write_golden", no_work)
    argv = {"train": [*train(f), "--out", f.nowhere / "ck.npz"],
            "predict": ["predict", "--checkpoint", f.ck, "--input", f.x, "--out", f.nowhere / "y.npy"],
            "golden": ["golden", "--input-dim", "5", "--out", f.nowhere / "g.npz"]}[command]
    code, _, err = run(argv, capsys)
    assert code == 2 and "does not exist" in err and "Traceback" not in err


def test_huge_info_is_computed_from_the_config(capsys, monkeypatch):
    """8 TiB of parameters: the summary, FLOPs and memory come from the config alone."""
    def no_model(*args, **kwargs):
        raise AssertionError("info built a model")

    monkeypatch.setattr("perceiver_np.model.Perceiver.__init__", no_model)
    t0 = time.perf_counter()
    code, out, err = run(["info", "--input-dim", "287", "--latent-dim", "1000000000", "--length", "4096"],
                         capsys)
    assert code == 0, err
    assert time.perf_counter() - t0 < 20
    cfg = pnp.PerceiverConfig(input_dim=287, latent_dim=10**9)
    assert f"{pnp.param_count(input_dim=287, latent_dim=10**9):>12,}" in out
    assert "GFLOP" in out and "kept for the backward" in out and "crossover" in out
    a, b = cost.training_bytes_line(cfg)
    assert f"{a:,} N + {b:,} bytes per sample" in out


@pytest.mark.parametrize("opts", [
    small_opts(),
    small_opts(decoder="query", num_outputs=4, output_dim=2, num_cross_layers=2, num_layers=2),
    small_opts(decoder="query", query_source="fourier", output_index_dims=(2, 3), output_dim=2),
    small_opts(input_projection=False, cross_heads=1, final_norm=False),
])
def test_info_prints_the_models_own_summary(opts, capsys):
    """The config-only summary is the model's summary, character for character."""
    argv = ["info"]
    for key, value in opts.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, tuple):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    assert out.startswith(pnp.build(**opts).summary() + "\n")


@pytest.mark.parametrize("layers, cross, blocks", [(1, 1, 1), (4, 1, 3), (7, 3, 2), (5, 5, 1), (9, 2, 4)])
def test_the_summary_schedule_is_the_configs(layers, cross, blocks):
    cfg = pnp.PerceiverConfig(input_dim=3, num_layers=layers, num_cross_layers=cross, num_blocks=blocks)
    assert _schedule(cfg, limit=10**6) == list(cfg.schedule)
    assert _schedule(cfg, limit=5) == list(cfg.schedule)[:5]


def test_a_failed_gradcheck_exits_1(capsys, monkeypatch):
    monkeypatch.setattr("perceiver_np.tolerances.GRADCHECK_RTOL", -1.0)
    code, out, err = run(["gradcheck", "--input-dim", "3", "--latent-dim", "4", "--num-latents", "2",
                          "--num-heads", "1", "--num-layers", "1", "--dropout", "0"], capsys)
    assert code == 1 and "worst:" in out and "Traceback" not in err


def test_a_failed_compare_exits_1(f, tmp_path, capsys):
    _, arrays, _ = verify.read_golden(f.golden)
    theirs = {k: v for k, v in arrays.items() if k.startswith(("act/", "grad/"))}
    theirs["act/output"] = theirs["act/output"] + 1.0
    np.savez(tmp_path / "theirs.npz", **theirs)
    code, out, err = run(["compare", f.golden, tmp_path / "theirs.npz"], capsys)
    assert code == 1 and "BREAKS" in out and "Traceback" not in err


@pytest.mark.parametrize("raised, code", [
    (FloatingPointError("loss is nan at step 3"), 1),  # train.NonFiniteError: training diverged
    (KeyboardInterrupt(), 130),
])
def test_divergence_and_interruption(raised, code, f, capsys, monkeypatch):
    def fit(*args, **kwargs):
        raise raised

    monkeypatch.setattr("perceiver_np.train.fit", fit)
    got, _, err = run(train(f), capsys)
    assert got == code and "Traceback" not in err and "perceiver-np train: " in err
    assert str(raised) in err


def test_memory_error_while_loading_names_the_file(f, capsys, monkeypatch):
    def load(*args, **kwargs):
        raise MemoryError("Unable to allocate 9.00 TiB")

    monkeypatch.setattr(np, "load", load)
    code, _, err = run(train(f), capsys)
    assert code == 2 and str(f.data) in err and "Traceback" not in err


def test_compare_passes_allow_missing(f, capsys, monkeypatch):
    seen = []

    def compare(golden, theirs, **kwargs):
        seen.append(kwargs)
        return SimpleNamespace(ok=True, to_json=lambda: {"ok": True})

    monkeypatch.setattr("perceiver_np.verify.compare", compare)
    assert run(["compare", f.golden, f.golden, "--json"], capsys)[0] == 0
    assert run(["compare", f.golden, f.golden, "--json", "--allow-missing"], capsys)[0] == 0
    assert seen == [{"allow_missing": False}, {"allow_missing": True}]
    code, out, _ = run(["compare", "--help"], capsys)
    assert code == 0 and "--allow-missing" in out
    assert "still fails when no activation or no gradient was compared" in " ".join(out.split())


def test_help_lists_every_command(capsys):
    code, out, _ = run(["--help"], capsys)
    assert code == 0
    for command in ("info", "train", "eval", "predict", "gradcheck", "golden", "compare"):
        assert f"perceiver-np {command}" in out


def test_the_executable_tunes_the_process_and_survives_bad_environment_values():
    """``python -m perceiver_np`` (the ``perceiver-np`` executable) calls runtime.tune() first:
    a bad PERCEIVER_NP_NUM_THREADS is a warning naming it, never a traceback; main() called
    from Python tunes nothing."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PERCEIVER_NP_NUM_THREADS": "4000", "PERCEIVER_NP_KEEP_MEMORY": "maybe"}
    out = subprocess.run([sys.executable, "-m", "perceiver_np", "info", "--input-dim", "3", "--length", "8"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    assert "PERCEIVER_NP_NUM_THREADS='4000' is outside 1.." in out.stderr
    assert "PERCEIVER_NP_KEEP_MEMORY='maybe' is not 0 or 1" in out.stderr
