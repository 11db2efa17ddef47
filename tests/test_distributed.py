"""perceiver_np.distributed on a 2-worker LocalCluster (processes, one task thread each): every
shard's output is the single-process ``perceiver-np predict`` file byte for byte, a rerun skips
what is done and redoes what was damaged, a worker killed mid-write changes nothing in the
result, ``evaluate`` is single-process ``perceiver-np eval`` to the last bit, and the errors name
the address, the shard, the widths. Cases that need no cluster run in this process (client=None).
"""

from __future__ import annotations

import collections
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

dask_distributed = pytest.importorskip(
    "distributed", reason="perceiver_np.distributed needs dask.distributed (the distributed extra; "
    "make test installs it)")

import perceiver_np as pnp  # noqa: E402
from perceiver_np import checkpoint  # noqa: E402
from perceiver_np import distributed as dist  # noqa: E402
from perceiver_np.cli import main as cli  # noqa: E402

BATCH = 4
NPY_ROWS = {"a0": 5, "a1": 8, "a2": 3}  # a1: two whole batches; a0, a2: a partial last batch
#: Labelled shards for evaluate: every one but the last a multiple of BATCH, so the batches of
#: the shards are the batches of their concatenation.
EVAL_ROWS = {"e0": 8, "e1": 4, "e2": 6}
#: Checkpoint loads per worker process over the whole module: each must load it once.
LOADS: collections.Counter[str] = collections.Counter()


@pytest.fixture(scope="module")
def f(tmp_path_factory):
    """A small checkpoint, shards of every kind, and what single-process predict and eval give."""
    root = tmp_path_factory.mktemp("distributed")
    rng = np.random.default_rng(0)
    cfg = pnp.PerceiverConfig(input_dim=5, latent_dim=8, num_latents=3, num_heads=2, num_layers=1,
                              dropout=0.0, decoder="classification", output_dim=3, dtype="float32", seed=3)
    ck = root / "ck.npz"
    checkpoint.save_checkpoint(ck, config=cfg, params=pnp.Perceiver(cfg).params)
    shards = root / "shards"
    shards.mkdir()
    for name, rows in NPY_ROWS.items():
        np.save(shards / f"{name}.npy", rng.normal(size=(rows, 6, 5)).astype(np.float32))
    np.savez(shards / "seq.npz", *[rng.normal(size=(n, 5)).astype(np.float32) for n in (3, 7, 1, 4, 9)])
    labelled = root / "labelled"
    labelled.mkdir()
    parts = []
    for name, rows in EVAL_ROWS.items():
        part = {"x": rng.normal(size=(rows, 6, 5)).astype(np.float32), "y": rng.integers(0, 3, size=rows),
                "mask": np.ones((rows, 6), dtype=bool)}
        part["mask"][1, 3:] = False  # one padded sample in each shard
        np.savez(labelled / f"{name}.npz", **part)
        parts.append(part)
    whole = root / "whole.npz"
    np.savez(whole, **{k: np.concatenate([p[k] for p in parts]) for k in ("x", "y", "mask")})
    paths = SimpleNamespace(root=root, ck=ck, shards=shards, labelled=labelled, whole=whole,
                            names=[*NPY_ROWS, "seq"], ref={})
    for name in paths.names:  # single-process predict, file by file: the reference outputs
        source = next(shards.glob(f"{name}.*"))
        out = root / f"ref-{name}.npy"
        assert cli(["predict", "--checkpoint", str(ck), "--input", str(source), "--out", str(out),
                    "--batch-size", str(BATCH), "--quiet"]) == 0
        paths.ref[name] = out.read_bytes()
    return paths


@pytest.fixture(scope="module")
def client():
    with dist.local_client(2) as c:
        yield c


def count_loads(report: dist.Report) -> None:
    LOADS.update(r.worker for r in report.results if r.loaded_model)
    assert set(LOADS.values()) == {1}, LOADS


def assert_outputs_are_the_references(out: Path, f) -> None:
    for name in f.names:
        assert (out / f"{name}.npy").read_bytes() == f.ref[name], name


def test_importing_it_imports_no_dask():
    code = ("import sys, perceiver_np.distributed; "
            "print(sorted({'dask', 'distributed', 'zarr'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_outputs_are_single_process_predict_byte_for_byte(f, client, tmp_path):
    report = dist.predict(f.ck, str(f.shards / "*"), tmp_path, client, batch_size=BATCH, progress=False)
    count_loads(report)
    assert (report.shards, report.run, report.skipped) == (4, 4, 0)
    assert report.rows == sum(NPY_ROWS.values()) + 5
    assert_outputs_are_the_references(tmp_path, f)
    manifest = json.loads((tmp_path / dist.MANIFEST_NAME).read_text())
    assert sorted(manifest["shards"]) == sorted(f.names)
    for name, entry in manifest["shards"].items():
        assert entry["output"] == f"{name}.npy"
        assert entry["rows"] == NPY_ROWS.get(name, 5)
        assert entry["input"] == str(next(f.shards.glob(f"{name}.*")))
    assert 1 <= len({r.worker for r in report.results}) <= 2


def test_zarr_shards_are_predict_on_their_rows(f, client, tmp_path):
    zarr = pytest.importorskip("zarr", reason="Zarr inputs need zarr (the distributed extra)")
    x = np.random.default_rng(1).normal(size=(10, 6, 5)).astype(np.float32)
    store = zarr.create_array(tmp_path / "data.zarr", shape=x.shape, chunks=(4, 6, 5), dtype="float32")
    store[:] = x
    report = dist.predict(f.ck, tmp_path / "data.zarr", tmp_path / "out", client, batch_size=BATCH,
                          progress=False)
    count_loads(report)
    assert [r.name for r in report.results] == ["data-00000", "data-00001", "data-00002"]
    for r, start in zip(report.results, (0, 4, 8), strict=True):
        np.save(tmp_path / "rows.npy", x[start:start + 4])
        assert cli(["predict", "--checkpoint", str(f.ck), "--input", str(tmp_path / "rows.npy"), "--out",
                    str(tmp_path / "ref.npy"), "--batch-size", str(BATCH), "--quiet"]) == 0
        assert (tmp_path / "out" / r.output).read_bytes() == (tmp_path / "ref.npy").read_bytes()


def test_a_rerun_skips_done_shards_and_redoes_damaged_ones(f, client, tmp_path):
    shards = str(f.shards / "*")
    first = dist.predict(f.ck, shards, tmp_path, client, batch_size=BATCH, progress=False)
    count_loads(first)
    before = {n: (tmp_path / f"{n}.npy").stat() for n in f.names}
    again = dist.predict(f.ck, shards, tmp_path, client, batch_size=BATCH, progress=False)
    assert (again.run, again.skipped) == (0, 4)
    for n in f.names:  # not even rewritten
        now = (tmp_path / f"{n}.npy").stat()
        assert (now.st_ino, now.st_mtime_ns) == (before[n].st_ino, before[n].st_mtime_ns)

    damaged = bytearray((tmp_path / "a0.npy").read_bytes())
    damaged[-1] ^= 1
    (tmp_path / "a0.npy").write_bytes(bytes(damaged))  # a corrupted output
    (tmp_path / "a1.npy").unlink()  # a lost output
    later = time.time() + 10
    os.utime(f.shards / "seq.npz", (later, later))  # an input that changed since
    try:
        redo = dist.predict(f.ck, shards, tmp_path, client, batch_size=BATCH, progress=False)
    finally:
        os.utime(f.shards / "seq.npz")
    count_loads(redo)
    assert sorted(r.name for r in redo.results) == ["a0", "a1", "seq"]
    assert redo.skipped == 1
    assert (tmp_path / "a2.npy").stat().st_ino == before["a2"].st_ino
    assert_outputs_are_the_references(tmp_path, f)


class DieMidWrite(dask_distributed.WorkerPlugin):
    """In the worker processes: the first output write of the cluster (a marker file, created
    exclusively, decides which) writes half its bytes into its temporary file and the process
    dies there (os._exit, as a killed process: no cleanup, no reply to the scheduler). Every
    write that completes appends the file's name to ``log``."""

    name = "perceiver-np-test-die-mid-write"

    def __init__(self, marker: str, log: str) -> None:
        self.marker, self.log = marker, log

    def setup(self, worker) -> None:
        from perceiver_np import distributed as module

        self.original = write = module.atomic_write
        marker, log = self.marker, self.log

        def dying_write(path, writer):
            try:
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                write(path, writer)
                with open(log, "a") as written:
                    written.write(f"{Path(path).name}\n")
                return
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)

            def half(file):
                whole = io.BytesIO()
                writer(whole)
                file.write(whole.getvalue()[: len(whole.getvalue()) // 2])
                file.flush()
                os._exit(1)

            return write(path, half)

        module.atomic_write = dying_write

    def teardown(self, worker) -> None:
        from perceiver_np import distributed as module

        module.atomic_write = self.original


def test_a_worker_killed_mid_write_changes_nothing(f, client, tmp_path):
    marker, log = tmp_path / "died", tmp_path / "written"
    out = tmp_path / "out"
    client.register_plugin(DieMidWrite(str(marker), str(log)))
    try:
        report = dist.predict(f.ck, str(f.shards / "*"), out, client, batch_size=BATCH, progress=False)
    finally:
        client.unregister_worker_plugin(DieMidWrite.name)
    count_loads(report)
    dead = marker.read_text()  # the pid of the worker that died mid-write
    assert dead and all(r.worker.rsplit(":", 1)[1] != dead for r in report.results)
    assert sorted(r.name for r in report.results) == sorted(f.names)
    assert_outputs_are_the_references(out, f)
    # every shard written once, nothing half-written: no temporary file left, one entry a shard
    assert collections.Counter(log.read_text().split()) == {f"{n}.npy": 1 for n in f.names}
    assert sorted(p.name for p in out.iterdir()) == sorted([*(f"{n}.npy" for n in f.names),
                                                            dist.MANIFEST_NAME])
    manifest = json.loads((out / dist.MANIFEST_NAME).read_text())
    assert sorted(manifest["shards"]) == sorted(f.names)


def single_process_eval(f, *more) -> str:
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "stdout", out)
        assert cli(["eval", "--checkpoint", str(f.ck), "--data", str(f.whole), "--batch-size", str(BATCH),
                    *more]) == 0
    return out.getvalue().strip()


def test_evaluate_is_single_process_eval_to_the_last_bit(f, client):
    want = single_process_eval(f)
    report = dist.evaluate(f.ck, str(f.labelled / "*.npz"), client, batch_size=BATCH, progress=False)
    count_loads(report)
    assert json.dumps(report.metrics) == want
    assert set(report.metrics) == {"loss", "accuracy"}
    assert report.rows == sum(EVAL_ROWS.values())


def test_evaluate_of_a_zarr_group(f, client, tmp_path):
    zarr = pytest.importorskip("zarr", reason="Zarr inputs need zarr (the distributed extra)")
    group = zarr.open_group(tmp_path / "labelled.zarr", mode="w")
    with np.load(f.whole) as whole:
        for key in ("x", "y", "mask"):
            array = group.create_array(key, shape=whole[key].shape, dtype=whole[key].dtype,
                                       chunks=(BATCH, *whole[key].shape[1:]))
            array[:] = whole[key]
    report = dist.evaluate(f.ck, tmp_path / "labelled.zarr", client, batch_size=BATCH, progress=False)
    count_loads(report)
    assert report.shards == 5
    assert json.dumps(report.metrics) == single_process_eval(f)


def test_evaluate_resumes_from_its_manifest(f, tmp_path):
    first = dist.evaluate(f.ck, str(f.labelled / "*.npz"), batch_size=BATCH, out_dir=tmp_path, progress=False)
    again = dist.evaluate(f.ck, str(f.labelled / "*.npz"), batch_size=BATCH, out_dir=tmp_path, progress=False)
    assert (first.run, again.run, again.skipped) == (3, 0, 3)
    assert json.dumps(again.metrics) == json.dumps(first.metrics) == single_process_eval(f)


def test_in_process_runs_the_same_code(f, tmp_path):
    report = dist.predict(f.ck, [f.shards / "a0.npy", f.shards / "seq.npz"], tmp_path, batch_size=BATCH,
                          progress=False)
    assert [r.name for r in report.results] == ["a0", "seq"]
    for name in ("a0", "seq"):
        assert (tmp_path / f"{name}.npy").read_bytes() == f.ref[name]


# ---- errors ----------------------------------------------------------------------------------


def test_an_unreachable_scheduler_is_named_within_the_timeout(f, tmp_path):
    t0 = time.perf_counter()
    with pytest.raises(ConnectionError, match=r"tcp://127\.0\.0\.1:1\b.*within 1 s"):
        dist.predict(f.ck, str(f.shards / "*"), tmp_path, "tcp://127.0.0.1:1", timeout=1, progress=False)
    assert time.perf_counter() - t0 < 10
    assert list(tmp_path.iterdir()) == []


def bad_shard(root: Path, kind: str) -> tuple[Path, str]:
    """A shard that is wrong in one way, and the words its error must have besides its name."""
    rng = np.random.default_rng(2)
    if kind == "missing":
        return root / "gone.npy", "no such file"
    path = root / f"{kind}.{'npz' if kind == 'narrow-sequence' else 'npy'}"
    if kind == "garbage":
        path.write_bytes(b"\x00 not an array at all \xff" * 8)
        return path, "not a readable .npy file"
    if kind == "truncated":
        np.save(path, rng.normal(size=(4, 6, 5)).astype(np.float32))
        path.write_bytes(path.read_bytes()[:-40])
        return path, "truncated"
    if kind == "narrow":
        np.save(path, rng.normal(size=(4, 6, 7)).astype(np.float32))
        return path, "x has 7 channels per position, but the model takes input_dim = 5"
    if kind == "narrow-sequence":
        np.savez(path, rng.normal(size=(3, 5)), rng.normal(size=(2, 4)))
        return path, "sequence 1 has 4 channels per position, but the model takes input_dim = 5"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing", "garbage", "truncated", "narrow", "narrow-sequence"])
def test_a_bad_shard_is_named_before_any_work(f, tmp_path, kind):
    path, words = bad_shard(tmp_path, kind)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="shard") as err:
        dist.predict(f.ck, [f.shards / "a0.npy", path], out, batch_size=BATCH, progress=False)
    assert str(path) in str(err.value) and words in str(err.value)
    assert not out.exists()  # checked before anything is written


def test_a_shard_damaged_past_its_header_fails_in_its_worker_naming_it(f, client, tmp_path):
    path = tmp_path / "damaged.npz"
    np.savez(path, np.random.default_rng(3).normal(size=(4000, 5)).astype(np.float32))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # in the array's data: its header reads, the zip member's CRC fails
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"not a readable \.npz file.*Bad CRC-32") as err:
        dist.predict(f.ck, [path], tmp_path / "out", client, batch_size=BATCH, progress=False)
    assert f"shard {path}" in str(err.value)
    assert (tmp_path / "out" / dist.MANIFEST_NAME).exists()  # it failed in the run, not in the checks


def test_other_input_mistakes_are_named(f, tmp_path):
    with pytest.raises(ValueError, match="no file matches"):
        dist.predict(f.ck, str(tmp_path / "*.npy"), tmp_path / "out", progress=False)
    (tmp_path / "b").mkdir()
    np.save(tmp_path / "b" / "a0.npy", np.zeros((2, 6, 5), np.float32))
    with pytest.raises(ValueError, match="same stem 'a0'"):
        dist.predict(f.ck, [f.shards / "a0.npy", tmp_path / "b" / "a0.npy"], tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match=r"expected \.npz datasets"):
        dist.evaluate(f.ck, [f.shards / "a0.npy"], progress=False)
    with pytest.raises(ValueError, match="would be replaced by its own output"):
        dist.predict(f.ck, str(f.shards / "a*.npy"), f.shards, progress=False)
    with pytest.raises(ValueError, match=r"e0\.npz: sequence 0 must be \[n, C\]"):
        dist.predict(f.ck, [f.labelled / "e0.npz"], tmp_path / "out2", progress=False)  # not sequences


def test_a_manifest_of_another_run_is_refused(f, tmp_path):
    dist.predict(f.ck, [f.shards / "a2.npy"], tmp_path, batch_size=BATCH, progress=False)
    with pytest.raises(ValueError, match=r"another run \(batch_size: manifest 4, this run 2\)"):
        dist.predict(f.ck, [f.shards / "a2.npy"], tmp_path, batch_size=2, progress=False)


# ---- the command line ------------------------------------------------------------------------


def test_the_command_line_on_a_scheduler(f, client, tmp_path, capsys):
    address = client.scheduler.address
    assert cli(["predict", "--checkpoint", str(f.ck), "--input", str(f.shards / "*"), "--out", str(tmp_path),
                "--batch-size", str(BATCH), "--dask", address, "--quiet"]) == 0
    assert capsys.readouterr().out.startswith("4 shards run, 0 already done (4 in all): 21 samples")
    assert_outputs_are_the_references(tmp_path, f)
    assert cli(["eval", "--checkpoint", str(f.ck), "--data", str(f.labelled / "*.npz"), "--batch-size",
                str(BATCH), "--dask", address]) == 0
    assert capsys.readouterr().out.strip() == single_process_eval(f)


def test_the_command_line_on_local_workers(f, tmp_path, capsys):
    assert cli(["predict", "--checkpoint", str(f.ck), "--input", str(f.shards / "a*.npy"), "--out",
                str(tmp_path), "--batch-size", str(BATCH), "--dask-workers", "1", "--quiet"]) == 0
    assert capsys.readouterr().out.startswith("3 shards run")
    for name in NPY_ROWS:
        assert (tmp_path / f"{name}.npy").read_bytes() == f.ref[name]


def test_a_bad_shard_is_named_before_a_cluster_starts(f, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(dist, "local_client", lambda *a, **k: pytest.fail("a cluster was started"))
    code = cli(["predict", "--checkpoint", str(f.ck), "--input", str(tmp_path / "gone.npy"), "--out",
                str(tmp_path / "out"), "--dask-workers", "2", "--quiet"])
    assert code == 2 and f"shard {tmp_path / 'gone.npy'}: no such file" in capsys.readouterr().err


def test_the_command_line_names_an_unreachable_scheduler(f, tmp_path, capsys):
    import dask

    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        code = cli(["predict", "--checkpoint", str(f.ck), "--input", str(f.shards / "*"), "--out",
                    str(tmp_path), "--dask", "tcp://127.0.0.1:1", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "tcp://127.0.0.1:1" in err and "Traceback" not in err
    assert cli(["predict", "--checkpoint", str(f.ck), "--input", str(f.shards / "*"), "--out",
                str(tmp_path), "--dask", "tcp://127.0.0.1:1", "--stream"]) == 2
    assert "--stream: not with --dask" in capsys.readouterr().err
