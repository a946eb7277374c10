"""Hostile stores and bundles: nothing outside the store is ever read, written or deleted."""

import io
import json
import tarfile

import pytest
from conftest import run_cli, snapshot, task_rows, write_jsonl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from switchcit import Store, SwitchcitError
from switchcit.bundle import export_store, import_bundle


def outside_tree(tmp_path):
    folder = tmp_path / "mydata"
    folder.mkdir(parents=True)
    (folder / "precious.txt").write_text("keep me")
    return folder


def one_line_error(proc, pattern: str) -> None:
    errors = [line for line in proc.stderr.splitlines() if line.startswith("switchcit: error:")]
    assert proc.returncode != 0 and len(errors) == 1 and pattern in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_sweep_never_follows_a_link(store_copy, tmp_path, stream, tiny_model):
    """A link dropped into the store (to the user's data, or a whole kind folder elsewhere) is left alone."""
    mydata = outside_tree(tmp_path)
    (store_copy / "adapters" / "mydata").symlink_to(mydata, target_is_directory=True)
    memory_target = outside_tree(tmp_path / "other")
    (store_copy / "switch" / "v99").mkdir()
    (store_copy / "switch" / "v99" / "elsewhere").symlink_to(memory_target, target_is_directory=True)
    data = write_jsonl(tmp_path / "t.jsonl", task_rows(stream[0][1])[:8])
    run_cli("learn", "--store", store_copy, "--task", "late", "--data", data, "--model", tiny_model,
            "--max-steps", "1", "-q", check=True)
    assert (mydata / "precious.txt").read_text() == "keep me"
    assert (memory_target / "precious.txt").read_text() == "keep me"
    assert (store_copy / "adapters" / "mydata").is_symlink()  # not ours to delete either


def test_a_kind_folder_that_is_a_link_is_refused(store_copy, tmp_path, stream, tiny_model):
    elsewhere = outside_tree(tmp_path)
    for item in (store_copy / "memory").iterdir():
        item.rename(elsewhere / item.name)
    (store_copy / "memory").rmdir()
    (store_copy / "memory").symlink_to(elsewhere, target_is_directory=True)
    before = snapshot(elsewhere)
    data = write_jsonl(tmp_path / "t.jsonl", task_rows(stream[0][1])[:8])
    proc = run_cli("learn", "--store", store_copy, "--task", "late", "--data", data, "--model", tiny_model,
                   "--max-steps", "1", "-q")
    one_line_error(proc, "follows no links inside a store")
    assert snapshot(elsewhere) == before


@pytest.mark.parametrize("field, value", [("memory", "/etc/hostname"), ("memory", "../../secret"),
                                          ("adapter", "adapters/other/0123456789ab"), ("name", "base"),
                                          ("name", "bad\u001b[31mname"), ("examples", "12")])
def test_manifests_that_reach_outside_or_lie_are_refused(store_copy, field, value):
    path = store_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["tasks"][0][field] = value
    path.write_text(json.dumps(manifest))
    before = snapshot(store_copy)
    with pytest.raises(SwitchcitError, match="is corrupt") as caught:
        Store(store_copy).read()
    assert str(caught.value).count("\n") == 0 and "tasks[0]" in str(caught.value)
    one_line_error(run_cli("route", "--store", store_copy, "hello"), "is corrupt")
    assert snapshot(store_copy) == before


def test_duplicate_task_names_are_refused(store_copy):
    path = store_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["tasks"].append(manifest["tasks"][0])
    path.write_text(json.dumps(manifest))
    with pytest.raises(SwitchcitError, match="twice"):
        Store(store_copy).read()


def test_a_bundle_naming_a_file_outside_is_refused(trained_store, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("private")
    bundle = tmp_path / "ok.tar"
    export_store(trained_store, bundle)
    with tarfile.open(bundle) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    manifest = json.loads(files["manifest.json"])
    manifest["tasks"][0]["memory"] = str(secret)
    files["manifest.json"] = json.dumps(manifest).encode()
    import hashlib

    files["checksums.json"] = json.dumps({n: hashlib.sha256(d).hexdigest() for n, d in files.items()
                                          if n != "checksums.json"}).encode()
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(SwitchcitError, match="is corrupt"):
        import_bundle(evil, tmp_path / "imported")
    assert not (tmp_path / "imported").exists() or not any((tmp_path / "imported").iterdir())
    assert secret.read_text() == "private"


def test_export_into_the_store_is_refused(store_copy):
    before = snapshot(store_copy)
    for out in (store_copy / "manifest.json", store_copy / "adapters" / "x.tar", store_copy):
        with pytest.raises(SwitchcitError, match="inside store"):
            export_store(store_copy, out)
    one_line_error(run_cli("export", "--store", store_copy, "--out", store_copy / "manifest.json"), "inside store")
    assert snapshot(store_copy) == before


def test_library_configs_refuse_bad_values_in_one_line():
    from switchcit import ExpertConfig, MemoryConfig, SwitchConfig

    for make, pattern in [(lambda: ExpertConfig(learning_rate=float("inf")), "learning_rate (--lr)"),
                          (lambda: ExpertConfig(learning_rate=float("nan")), "learning_rate"),
                          (lambda: ExpertConfig(r=0), "r (--rank)"),
                          (lambda: ExpertConfig(max_steps=0), "max_steps"),
                          (lambda: ExpertConfig(epochs=-1), "epochs"),
                          (lambda: MemoryConfig(fraction=float("nan")), "fraction"),
                          (lambda: MemoryConfig(min_per_task=0), "min_per_task"),
                          (lambda: SwitchConfig(router="bogus"), "choose one of gaussian, mlp")]:
        with pytest.raises(SwitchcitError, match=pattern.replace("(", r"\(").replace(")", r"\)")) as caught:
            make()
        assert "\n" not in str(caught.value)
    proc = run_cli("learn", "--store", "unused", "--task", "t", "--data", "unused.jsonl", "--lr", "nan")
    one_line_error(proc, "learning_rate (--lr)")


# -- training, store state and options ---------------------------------------------------------------------

def test_a_non_finite_loss_stops_learn_before_anything_is_written(store_copy, stream):
    from switchcit import ContinualModel, ExpertConfig

    before = snapshot(store_copy)
    cm = ContinualModel(store_copy, progress=False, expert_config=ExpertConfig(learning_rate=1e30, max_steps=6))
    with pytest.raises(SwitchcitError, match=r"loss became .* at step \d+: lower learning_rate \(--lr\)"):
        cm.learn(stream[0][0].__class__("blowup", stream[0][0].examples[:16]))
    assert snapshot(store_copy) == before


def test_a_store_missing_a_file_is_refused_before_training(store_copy, tmp_path, stream, tiny_model):
    import shutil

    manifest = Store(store_copy).read()
    shutil.rmtree(store_copy / manifest.tasks[1].adapter)
    before = snapshot(store_copy)
    data = write_jsonl(tmp_path / "t.jsonl", task_rows(stream[0][1])[:8])
    proc = run_cli("learn", "--store", store_copy, "--task", "late", "--data", data, "--model", tiny_model, "-q")
    one_line_error(proc, "which its manifest names")
    assert snapshot(store_copy) == before


def test_a_read_only_store_is_refused_before_training(store_copy, stream, monkeypatch):
    """Tests run as root, so write permission is simulated: the store's write probe gets EACCES."""
    import errno
    import pathlib

    from switchcit import ContinualModel

    real = pathlib.Path.write_bytes

    def refuse(self, data):
        if self.name.startswith(".write-test"):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self, data)

    monkeypatch.setattr(pathlib.Path, "write_bytes", refuse)
    before = snapshot(store_copy)
    cm = ContinualModel(store_copy, progress=False)
    with pytest.raises(SwitchcitError, match="cannot be written"):
        cm.learn(stream[0][0].__class__("late", stream[0][0].examples[:8]))
    assert not cm.adapters.loaded  # refused before the model was even loaded for training
    assert snapshot(store_copy) == before


def test_a_full_disk_at_commit_is_one_line_and_keeps_the_store(store_copy, tmp_path, stream, tiny_model,
                                                              monkeypatch, capsys):
    import errno

    from switchcit import cli, store

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store.json, "dump", full)
    manifest = (store_copy / "manifest.json").read_bytes()
    data = write_jsonl(tmp_path / "t.jsonl", task_rows(stream[0][1])[:8])
    code = cli.main(["learn", "--store", str(store_copy), "--task", "late", "--data", str(data), "--model",
                     str(tiny_model), "--max-steps", "1", "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1].startswith("switchcit: error: No space left on device")
    assert "Traceback" not in "\n".join(err)
    assert (store_copy / "manifest.json").read_bytes() == manifest
    monkeypatch.undo()
    assert Store(store_copy).read().task_names == [t.name for t, _ in stream]


@pytest.mark.parametrize("args, pattern", [
    (["generate", "--max-new-tokens", "0", "hi"], "max_new_tokens (0)"),
    (["generate", "--batch-size", "0", "hi"], "batch_size (0)"),
    (["route", "--device", "bogus", "hi"], "unknown device 'bogus'"),
    (["route", "--device", "cuda", "hi"], "no usable CUDA GPU"),
])
def test_bad_options_are_one_line(trained_store, args, pattern):
    one_line_error(run_cli(args[0], "--store", trained_store, *args[1:]), pattern)


def test_store_paths_that_are_no_store(tmp_path):
    regular = tmp_path / "file"
    regular.write_text("x")
    for command in (["forget", "--task", "t"], ["export", "--out", str(tmp_path / "b.tar")], ["tasks"]):
        one_line_error(run_cli(command[0], "--store", regular, *command[1:]), "is a file, not a store folder")
        missing = tmp_path / "missing"
        one_line_error(run_cli(command[0], "--store", missing, *command[1:]), "no switchcit store")
        assert not missing.exists()  # forget and export must not create it


def test_an_empty_prompt_asks_for_no_task(trained_store):
    from switchcit import BASE, ContinualModel

    cm = ContinualModel(trained_store, progress=False)
    routes = cm.route(["", "   ", "Reverse the order of these words.\n\na b"])
    assert [r.task for r in routes[:2]] == [BASE, BASE] and routes[2].task != BASE


# -- data files and bundles ---------------------------------------------------------------------------------

@pytest.mark.parametrize("content, pattern", [
    (b'{"instruction": "caf\xe9", "output": "x"}\n', "not UTF-8 text"),
    ('{"instruction": "a", "output": "b"}\n'.encode("utf-16"), "not UTF-8 text"),
    (b"\x00\x01\x02\xff" * 10, "not UTF-8 text"),
    (("[" * 100000 + "]" * 100000 + "\n").encode(), "nested too deeply"),
    (b'{"instruction": "a\\ud800b", "output": "x"}\n', "unpaired UTF-16 surrogate"),
])
def test_bad_data_files_are_one_line(tmp_path, content, pattern):
    from switchcit import load_examples

    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(SwitchcitError, match=pattern) as caught:
        load_examples(path)
    assert "\n" not in str(caught.value)


def _tar(path, members: list[tuple[str, bytes]]):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_bundle_bombs_and_odd_members_are_refused(trained_store, tmp_path):
    import gzip
    import hashlib

    with pytest.raises(SwitchcitError, match="twice"):
        import_bundle(_tar(tmp_path / "dup.tar", [("manifest.json", b"{}"), ("manifest.json", b"{}")]),
                      tmp_path / "s1")
    big = b"\0" * (1 << 20)
    bomb = tmp_path / "bomb.tar.gz"
    raw = _tar(tmp_path / "bomb.tar", [("checksums.json", json.dumps({"x": hashlib.sha256(big).hexdigest()})
                                        .encode()), ("x", big)])
    bomb.write_bytes(gzip.compress(raw.read_bytes()))
    assert bomb.stat().st_size < 10_000
    with pytest.raises(SwitchcitError, match="more than 65536 bytes"):
        import_bundle(bomb, tmp_path / "s2", max_bytes=65536)
    sparse = tmp_path / "sparse.tar"
    with tarfile.open(sparse, "w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo("x")
        info.type = tarfile.GNUTYPE_SPARSE
        tar.addfile(info)
    with pytest.raises(SwitchcitError, match="not a plain file"):
        import_bundle(sparse, tmp_path / "s3")
    with pytest.raises(SwitchcitError, match="no valid checksums.json"):
        import_bundle(_tar(tmp_path / "shape.tar", [("checksums.json", b"[1, 2]")]), tmp_path / "s4")
    for name in ("s1", "s2", "s3", "s4"):
        assert not (tmp_path / name).exists()


def test_a_bad_request_fails_only_itself(trained_store):
    import concurrent.futures

    import httpx
    from test_serve import AUTH, app, serve_in_thread

    with serve_in_thread(app(trained_store)) as url:
        def ask(prompt):  # json.dumps escapes a lone surrogate as \ud800, as a hostile client would send it
            body = json.dumps({"model": "switchcit", "prompt": prompt, "max_tokens": 2})
            return httpx.post(f"{url}/v1/completions", headers={**AUTH, "Content-Type": "application/json"},
                              content=body, timeout=120)
        prompts = ["a\ud800b", "", *["Reverse the order of these words.\n\na b c"] * 8]
        with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
            answers = list(pool.map(ask, prompts))
    assert [r.status_code for r in answers] == [400, 400] + [200] * 8
    assert "surrogate" in answers[0].json()["error"]["message"] and answers[1].json()["error"]["param"] == "prompt"


def test_request_bodies_are_bounded_in_size_depth_tokens_and_time(trained_store):
    import socket
    import time

    import httpx
    from test_serve import AUTH, app, serve_in_thread

    server = app(trained_store, max_body_bytes=4000, max_prompt_tokens=40, body_timeout_s=1.0)
    with serve_in_thread(server) as url, httpx.Client(base_url=url, headers=AUTH, timeout=60) as http:
        deep = '{"model": "switchcit", "prompt": ' + "[" * 100000 + "]" * 100000 + "}"
        response = http.post("/v1/completions", content=deep, headers={"Content-Type": "application/json"})
        assert response.status_code in (400, 413)  # refused either way, never a 500
        nested = '{"model": "switchcit", "prompt": ' + "[" * 1900 + "]" * 1900 + "}"
        assert http.post("/v1/completions", content=nested).status_code == 400
        big = http.post("/v1/completions", json={"model": "switchcit", "prompt": "x" * 5000})
        assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
        long = http.post("/v1/completions", json={"model": "switchcit", "prompt": "apple river " * 60})
        assert long.status_code == 400 and long.json()["error"]["code"] == "context_length_exceeded"
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as slow:
            slow.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: {AUTH['Authorization']}\r\n"
                         "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"mod".encode())
            started = time.monotonic()
            reply = slow.recv(4096).decode(errors="replace")
            assert reply.startswith("HTTP/1.1 408") and time.monotonic() - started < 5
        ok = http.post("/v1/completions", json={"model": "switchcit", "prompt": "a b c", "max_tokens": 2})
        assert ok.status_code == 200
        metrics = http.get("/metrics").text
        assert 'status="500"' not in metrics


# -- generated manifests and bundles ------------------------------------------------------------------------

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                                max_size=4), max_leaves=20)
PATHS = st.sampled_from(["adapters/a/0123456789ab", "memory/a/0123456789ab.safetensors", "/etc/passwd",
                         "../../x", "adapters/../../x", "switch/v1/0123456789ab", "", "adapters/a"])
ENTRY = st.fixed_dictionaries({"name": st.sampled_from(["a", "b", "base", "A", "a/b", "\u001b"]), "adapter": PATHS,
                               "memory": PATHS, "examples": JSON | st.integers(), "memory_size": st.integers(),
                               "steps": st.integers(), "final_loss": st.floats(), "lora": JSON,
                               "learned_at": st.text(max_size=5)})
MANIFEST = st.fixed_dictionaries({"format": st.sampled_from([1, "1", 2, None, 1.0]),
                                  "base_model": st.fixed_dictionaries({"reference": JSON, "fingerprint": JSON}) | JSON,
                                  "encoder": st.fixed_dictionaries({"reference": JSON, "dim": JSON}) | JSON,
                                  "memory": st.fixed_dictionaries({"fraction": JSON, "min_per_task": JSON}),
                                  "tasks": st.lists(ENTRY, max_size=3) | JSON, "switch": PATHS | st.none()}) | JSON


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=MANIFEST)
def test_generated_manifests_never_traceback_nor_reach_outside(tmp_path, data):
    root = tmp_path / "store"
    root.mkdir(exist_ok=True)
    (root / "manifest.json").write_text(json.dumps(data))
    outside = {p for p in tmp_path.parent.rglob("*") if tmp_path not in p.parents and p != tmp_path}
    try:
        manifest = Store(root).read()
    except SwitchcitError as exc:
        assert "\n" not in str(exc)
        return
    for relative in manifest.live_paths():  # whatever it accepted stays inside the store
        assert root in Store(root).path(relative).parents
    assert {p for p in tmp_path.parent.rglob("*") if tmp_path not in p.parents and p != tmp_path} == outside


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(members=st.lists(st.tuples(st.sampled_from(["manifest.json", "checksums.json", "adapters/a/x", "../x",
                                                   "/tmp/x", "a/../../x", "memory/a/y"]),
                                  st.binary(max_size=64) | MANIFEST.map(lambda d: json.dumps(d).encode())),
                        max_size=5))
def test_generated_bundles_never_traceback_nor_write_outside(tmp_path, members):
    import uuid

    work = tmp_path / uuid.uuid4().hex
    work.mkdir()
    bundle = _tar(work / "b.tar", members)
    try:
        import_bundle(bundle, work / "store")
    except SwitchcitError as exc:
        assert "\n" not in str(exc)
        assert not (work / "store").exists()
    assert {p.name for p in work.iterdir()} <= {"b.tar", "store"}
    assert not (tmp_path / "x").exists() and not (tmp_path.parent / "x").exists()


def test_readers_never_see_files_vanish_while_a_writer_relearns(store_copy, tmp_path, stream, tiny_model):
    """A writer loops `learn --replace`; readers opening the store meanwhile all route (issue: 4 of 16 failed)."""
    import subprocess
    import sys

    from switchcit import ContinualModel

    data = write_jsonl(tmp_path / "t.jsonl", task_rows(stream[0][0])[:16])
    loop = ("for i in 1 2 3; do " + " ".join([sys.executable, "-m", "switchcit", "learn", "--store", str(store_copy),
                                                "--task", stream[0][0].name, "--data", str(data), "--model",
                                                str(tiny_model), "--max-steps", "1", "--replace", "-q"])
            + " || exit 1; done")
    writer = subprocess.Popen(["bash", "-c", loop], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    prompts = stream[1][1].prompts[:3]
    reads = 0
    while writer.poll() is None or reads < 4:
        assert len(ContinualModel(store_copy, progress=False).route(prompts)) == 3
        reads += 1
    assert writer.returncode == 0, writer.stderr.read()
    assert reads >= 4


def test_leftovers_of_killed_commands_are_swept(trained_store, tmp_path):
    (tmp_path / ".model.tar.0123abcd.tmp").write_bytes(b"half a bundle")
    (tmp_path / ".copy.import-0123abcd").mkdir()
    (tmp_path / ".copy.import-0123abcd" / "manifest.json").write_text("{}")
    (tmp_path / "unrelated.tmp").write_text("not ours")
    export_store(trained_store, tmp_path / "model.tar")
    import_bundle(tmp_path / "model.tar", tmp_path / "copy")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy", "model.tar", "unrelated.tmp"]


def test_the_api_key_file_and_the_warning_about_ps(tmp_path, caplog):
    import argparse

    from switchcit.serve.cli import _api_key

    key = tmp_path / "key"
    key.write_text("s3cret\nignored\n")
    assert _api_key(argparse.Namespace(api_key=None, api_key_file=str(key))) == "s3cret"
    with caplog.at_level("WARNING", logger="switchcit.serve"):
        assert _api_key(argparse.Namespace(api_key="visible", api_key_file=None)) == "visible"
    assert "visible to every local user" in caplog.text
    with pytest.raises(SwitchcitError, match="cannot read an API key"):
        _api_key(argparse.Namespace(api_key=None, api_key_file=str(tmp_path / "missing")))


def test_export_works_on_a_read_only_store(store_copy, tmp_path, monkeypatch):
    """Tests run as root, so a read-only store is simulated: opening anything in it for writing gets EACCES."""
    import builtins
    import errno

    from switchcit import store as store_module

    real = builtins.open

    def read_only(path, mode="r", *args, **kwargs):
        if str(store_copy) in str(path) and any(c in mode for c in "wa+"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, mode, *args, **kwargs)

    monkeypatch.setattr(store_module, "open", read_only, raising=False)
    info = export_store(store_copy, tmp_path / "b.tar")
    assert info["tasks"] == len(Store(store_copy).read().tasks) and (tmp_path / "b.tar").stat().st_size > 0


def test_manifests_of_the_wrong_format_or_kind_are_one_line(store_copy):
    path = store_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    for fmt, pattern in (("1", "not a whole number"), (99, "newer than this switchcit understands")):
        path.write_text(json.dumps({**manifest, "format": fmt}))
        one_line_error(run_cli("tasks", "--store", store_copy), pattern)
    path.unlink()
    path.mkdir()  # a directory where the manifest should be
    one_line_error(run_cli("tasks", "--store", store_copy), "is corrupt")


def test_a_client_hanging_up_mid_body_is_no_server_error(trained_store):
    import socket
    import time

    import httpx
    from test_serve import AUTH, app, serve_in_thread

    with serve_in_thread(app(trained_store)) as url:
        host, port = url.removeprefix("http://").split(":")
        for _ in range(3):
            with socket.create_connection((host, int(port)), timeout=10) as gone:
                gone.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: {AUTH['Authorization']}"
                             "\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n{\"model\"".encode())
        time.sleep(0.5)
        metrics = httpx.get(f"{url}/metrics", headers=AUTH).text
    assert 'status="500"' not in metrics


def test_every_option_parses_to_its_field_type():
    """Options built from the config fields give each field the type its dataclass declares."""
    import argparse
    import dataclasses

    from switchcit import ExpertConfig
    from switchcit.options import config_from
    from switchcit.serve import ServeConfig, add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["serve", "--store", "s", "--upstream", "http://127.0.0.1:9", "--port", "9000",
                              "--max-wait-ms", "2.5", "--max-prompt-tokens", "100"])
    config = config_from(args, ServeConfig, store="s")
    assert (config.upstream, config.port, config.max_wait_ms, config.max_prompt_tokens) == (
        "http://127.0.0.1:9", 9000, 2.5, 100)
    from switchcit.cli import build_parser

    learn = build_parser().parse_args(["learn", "--store", "s", "--task", "t", "--data", "d", "--lora-alpha", "32",
                                       "--max-steps", "5", "--lr", "0.01"])
    expert = config_from(learn, ExpertConfig)
    assert (expert.lora_alpha, expert.max_steps, expert.learning_rate) == (32, 5, 0.01)
    assert expert.r == next(f.default for f in dataclasses.fields(ExpertConfig) if f.name == "r")


def test_review_findings_stay_fixed(store_copy, tmp_path, stream, tiny_model):
    """Top-level manifest types, a blank API key file, Unicode line separators inside JSON strings, a task of
    identical prompts, and a folder left by an interrupted first learn."""
    import argparse

    from switchcit import ContinualModel, SwitchConfig, load_examples
    from switchcit.memory import MemoryConfig, build_switch, remember
    from switchcit.serve.cli import _api_key

    path = store_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    for key, value in (("generation", "3"), ("router", "bogus")):
        path.write_text(json.dumps({**manifest, key: value}))
        with pytest.raises(SwitchcitError, match="is corrupt"):
            Store(store_copy).read()
    path.write_text(json.dumps(manifest))
    blank = tmp_path / "key"
    blank.write_text("\nsecret\n")
    with pytest.raises(SwitchcitError, match="cannot read an API key"):
        _api_key(argparse.Namespace(api_key=None, api_key_file=str(blank)))
    rows = tmp_path / "u2028.jsonl"
    rows.write_text(json.dumps({"instruction": "a\u2028b", "output": "x"}, ensure_ascii=False) + "\n")
    assert load_examples(rows)[0].prompt == "a\u2028b"
    import torch

    same = torch.ones(8, 4)
    switch = build_switch({"same": remember(same, MemoryConfig(), SwitchConfig(router="gaussian")),
                           "other": remember(torch.randn(8, 4) * 5, MemoryConfig(), SwitchConfig(router="gaussian"))},
                          SwitchConfig(router="gaussian"))
    assert switch.known(same[:1], ["same"]) == [True]
    leftover = tmp_path / "new-store"
    (leftover / "adapters" / "t" / "0123456789ab").mkdir(parents=True)
    data = write_jsonl(tmp_path / "t.jsonl", task_rows(stream[0][1])[:8])
    run_cli("learn", "--store", leftover, "--task", "t", "--data", data, "--model", tiny_model, "--max-steps", "1",
            "-q", check=True)
    assert ContinualModel(leftover).task_names == ["t"]
    assert [p.name for p in (leftover / "adapters" / "t").iterdir()] != ["0123456789ab"]  # swept by the commit
