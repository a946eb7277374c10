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


def _tar(path, members: list[tuple[str, bytes]]):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _bundle_files(store, tmp_path) -> dict[str, bytes]:
    """The members of an exported bundle of `store`, checksums.json left out."""
    export_store(store, tmp_path / "exported.tar")
    with tarfile.open(tmp_path / "exported.tar") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.name != "checksums.json"}


def _with_checksums(files: dict[str, bytes]) -> list[tuple[str, bytes]]:
    """Bundle members as `export` orders them: checksums.json with the SHA-256 of each of `files`, then those."""
    import hashlib

    checksums = json.dumps({name: hashlib.sha256(data).hexdigest() for name, data in files.items()}).encode()
    return [("checksums.json", checksums), *files.items()]


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
    files = _bundle_files(trained_store, tmp_path)
    manifest = json.loads(files["manifest.json"])
    manifest["tasks"][0]["memory"] = str(secret)
    files["manifest.json"] = json.dumps(manifest).encode()
    evil = _tar(tmp_path / "evil.tar", _with_checksums(files))
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
    assert code == 1 and err[-1].startswith("switchcit: error: learn 'late' stopped (No space left on device)")
    assert err[-1].endswith("the store keeps its last committed state")
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
    from switchcit.generation import EMPTY_PROMPT

    cm = ContinualModel(trained_store, progress=False)
    routes = cm.route(["", "   ", "Reverse the order of these words.\n\na b"])
    assert [(r.task, r.reason) for r in routes[:2]] == [(BASE, EMPTY_PROMPT)] * 2 and routes[2].task != BASE


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


def test_bundle_bombs_and_odd_members_are_refused(trained_store, tmp_path):
    import gzip

    with pytest.raises(SwitchcitError, match="twice"):
        import_bundle(_tar(tmp_path / "dup.tar", [("manifest.json", b"{}"), ("manifest.json", b"{}")]),
                      tmp_path / "s1")
    big = bytes(16 << 20)  # one of the files the manifest names, compressed a thousand times over
    files = _bundle_files(trained_store, tmp_path)
    weights = next(name for name in files if name.endswith("adapter_model.safetensors"))
    raw = _tar(tmp_path / "bomb.tar", _with_checksums({**files, weights: big}))
    bomb = tmp_path / "bomb.tar.gz"
    bomb.write_bytes(gzip.compress(raw.read_bytes()))
    assert bomb.stat().st_size < len(big) / 2
    with pytest.raises(SwitchcitError, match=f"more than {8 << 20} bytes"):
        import_bundle(bomb, tmp_path / "s2", max_bytes=8 << 20)
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


# -- forgetting leaves nothing, faults stay one line, import is bounded in memory ---------------------------

# A learn that the kernel kills right after its commit, before it removes its checkpoints: the crash is injected
# at that point (the process SIGKILLs itself there), the rest runs as it would.
KILLED_AFTER_COMMIT = ("import os, signal, sys\n"
                       "from switchcit import cli, store\n"
                       "store.Store.drop_checkpoints = lambda self, task: os.kill(os.getpid(), signal.SIGKILL)\n"
                       "sys.exit(cli.main(sys.argv[1:]))")


def _learn_args(store, task, data, model, *extra) -> list[str]:
    return [str(a) for a in ("learn", "--store", store, "--task", task, "--data", data, "--model", model,
                             "--max-steps", "2", "--save-steps", "1", "-q", *extra)]


def _file_limited(limit: int):
    """For preexec_fn: files the process writes may not grow beyond `limit` bytes. The kernel then fails the
    write (EFBIG) as a full disk fails it, wherever switchcit or a library writes."""
    import resource
    import signal

    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def _cli_limited(limit: int, *args):
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "switchcit", *map(str, args)], capture_output=True, text=True,
                          timeout=300, preexec_fn=_file_limited(limit), env=dict(os.environ, PYTHONUNBUFFERED="1"))


def test_forget_leaves_no_byte_of_the_task(store_copy, tmp_path, stream, tiny_model):
    """A learn killed after its commit leaves its checkpoints: the next write of the store removes them. Then
    forget removes every file of the task: no byte of its adapter's tensors, no path named after it."""
    import signal
    import subprocess
    import sys

    from safetensors.torch import load_file

    data = write_jsonl(tmp_path / "t.jsonl", task_rows(stream[0][1])[:16])
    killed = subprocess.run([sys.executable, "-c", KILLED_AFTER_COMMIT,
                             *_learn_args(store_copy, "late", data, tiny_model, "--report-to", "jsonl")],
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    entry = Store(store_copy).read().tasks[-1]
    tensors = [t.numpy().tobytes() for t in load_file(str(store_copy / entry.adapter / "adapter_model.safetensors"))
               .values()]

    def holding_them() -> set[str]:
        return {str(p.relative_to(store_copy)).split("/")[0] for p in store_copy.rglob("*")
                if p.is_file() and any(t in p.read_bytes() for t in tensors)}

    assert entry.name == "late" and holding_them() == {"adapters", ".checkpoints"}
    assert (store_copy / "logs" / "late" / "log.jsonl").is_file()
    run_cli("forget", "--store", store_copy, "--task", stream[0][0].name, check=True)  # the next write of the store
    assert holding_them() == {"adapters"} and not (store_copy / ".checkpoints").exists()
    run_cli("forget", "--store", store_copy, "--task", "late", check=True)
    assert holding_them() == set()
    assert not [p for p in store_copy.rglob("*") if "late" in p.relative_to(store_copy).parts]
    assert Store(store_copy).read().task_names == [t.name for t, _ in stream[1:]]


def test_two_learns_of_one_task_never_remove_each_others_files(store_copy, tmp_path, stream, tiny_model):
    """The first learn owns the task's checkpoints until its commit: a second learn of the task (same data, same
    settings) and a forget of it are refused in one line and touch none of its files."""
    import fcntl
    import subprocess
    import sys

    name = stream[0][0].name
    data = write_jsonl(tmp_path / "t.jsonl", task_rows(stream[0][0])[:16])
    args = _learn_args(store_copy, name, data, tiny_model, "--replace")
    with open(store_copy / ".lock", "a+") as writers:
        fcntl.flock(writers, fcntl.LOCK_EX)  # the first learn trains, then waits here for its commit
        first = subprocess.Popen([sys.executable, "-m", "switchcit", *args], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        for line in first.stderr:
            if "waiting for another writer" in line:
                break
        before = snapshot(store_copy)
        assert any(k.startswith(f".checkpoints/{name}/") for k in before)
        one_line_error(run_cli(*args), f"task '{name}' is being learned by another process")
        assert snapshot(store_copy) == before and first.poll() is None
        fcntl.flock(writers, fcntl.LOCK_UN)
    assert first.wait(timeout=300) == 0, first.stderr.read()
    assert not (store_copy / ".checkpoints").exists()
    with Store(store_copy).owning(name):  # as a learn of it holds it
        before = snapshot(store_copy)
        one_line_error(run_cli("forget", "--store", store_copy, "--task", name), "is being learned by another process")
        assert snapshot(store_copy) == before


def test_a_full_disk_at_any_point_is_one_line_and_keeps_the_store(store_copy, tmp_path, stream, tiny_model):
    """Each limit fails a different write of learn: PEFT's model card (OSError), the adapter (safetensors' os error
    27), the optimizer state (torch.save's inline_container enforce fail), the memory, the switch. Each is one
    line and keeps what was committed (a failed commit takes back what it wrote); export and import leave nothing
    behind; a forget that cannot write keeps the task."""
    def committed_state():  # all but the checkpoints that --resume continues from
        return {k: v for k, v in snapshot(store_copy).items() if not k.startswith(".checkpoints/")}

    data = write_jsonl(tmp_path / "t.jsonl", task_rows(stream[0][1])[:16])
    committed = committed_state()
    for limit in (1_000, 30_000, 100_000, 300_000, 1_000_000):
        proc = _cli_limited(limit, *_learn_args(store_copy, "late", data, tiny_model))
        one_line_error(proc, "learn 'late' stopped (")
        assert "free space" in proc.stderr and "the store keeps its last committed state" in proc.stderr
        assert committed_state() == committed
    work = tmp_path / "work"
    work.mkdir()
    export_store(store_copy, work / "good.tar")
    proc = _cli_limited(100_000, "export", "--store", store_copy, "--out", work / "out.tar")
    one_line_error(proc, f"export to {work / 'out.tar'} stopped (File too large)")
    assert "no bundle was written" in proc.stderr and "last committed state" not in proc.stderr
    proc = _cli_limited(100_000, "import", work / "good.tar", "--store", work / "imported")
    one_line_error(proc, f"import into {work / 'imported'} stopped (File too large)")
    assert "nothing was imported" in proc.stderr and ".import-" not in proc.stderr
    assert sorted(p.name for p in work.iterdir()) == ["good.tar"]
    assert committed_state() == committed
    task = stream[0][0].name  # a task with logs and a run to resume, which a failed forget must not take
    (store_copy / "logs" / task).mkdir(parents=True, exist_ok=True)
    (store_copy / "logs" / task / "log.jsonl").write_text("{}\n")
    run = store_copy / ".checkpoints" / task / "0123456789abcdef"
    run.mkdir(parents=True, exist_ok=True)
    (run / "trainer_state.json").write_text("{}")
    committed = committed_state()
    proc = _cli_limited(200, "forget", "--store", store_copy, "--task", task)
    one_line_error(proc, "File too large")
    assert "the store keeps its last committed state" in proc.stderr and committed_state() == committed
    assert (run / "trainer_state.json").exists()


def test_resume_continues_only_the_same_run(store_copy, tmp_path, stream, tiny_model):
    """A float32 learn cut short after its checkpoints (its memory file cannot be written) is not continued by
    --resume --dtype bfloat16: the run key covers the base model's dtype. The same settings continue it."""
    data = write_jsonl(tmp_path / "t.jsonl", task_rows(stream[0][1])[:16])
    args = _learn_args(store_copy, "late", data, tiny_model, "--dtype", "float32")
    one_line_error(_cli_limited(300_000, *args), "learn 'late' stopped (")
    assert list(store_copy.glob(".checkpoints/late/*/checkpoint-2"))
    before = snapshot(store_copy)
    other = run_cli(*args[:-2], "--dtype", "bfloat16", "--resume")
    one_line_error(other, "--resume: no checkpoint of this task for this data and configuration")
    assert snapshot(store_copy) == before
    same = run_cli(*args, "--resume", check=True)
    assert "resuming from step 2" in same.stderr
    assert Store(store_copy).read().task_names[-1] == "late" and not (store_copy / ".checkpoints").exists()


def test_odd_input_is_one_line(store_copy, tmp_path, stream, tiny_model):
    """A negative seed, a step larger than the data many times over, an empty prompt, a task name with a
    newline in a manifest, a closed pipe: one line each (or a plain answer), the store as it was."""
    import subprocess
    import sys

    before = snapshot(store_copy)
    data = write_jsonl(tmp_path / "t.jsonl", task_rows(stream[0][0])[:40])
    one_line_error(run_cli(*_learn_args(store_copy, "late", data, tiny_model, "--seed", "-1")),
                   "seed (--seed) is -1: give a finite number in [0, 4294967295]")
    one_line_error(run_cli(*_learn_args(store_copy, "late", data, tiny_model, "--grad-accum", "100000")),
                   "= 800000 rows is more than the 40 training rows: give --grad-accum 5 or less")
    routed = run_cli("route", "--store", store_copy, "", check=True)
    assert routed.stdout == "base\t-\t\n" and routed.stderr == ""
    shell = f"{sys.executable} -m switchcit tasks --store {store_copy} | head -c 0"
    piped = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, timeout=120)
    assert piped.stderr == ""  # the reader wanted nothing more: nothing to report, least of all a commit
    assert snapshot(store_copy) == before
    manifest = json.loads((store_copy / "manifest.json").read_text())
    manifest["tasks"][0]["name"] = "two\nlines"
    (store_copy / "manifest.json").write_text(json.dumps(manifest))
    one_line_error(run_cli("tasks", "--store", store_copy), "tasks[0].name: invalid task name 'two\\nlines'")


def test_damaged_stores_are_refused_when_opened(store_copy, trained_store, tmp_path):
    """A store lacking a folder or file its manifest names is refused in one line by every command that opens it
    (generate and serve at load, forget before it writes), and so is a bundle whose adapter lacks its config."""
    import shutil

    manifest = Store(store_copy).read()
    shutil.rmtree(store_copy / manifest.tasks[1].adapter)
    before = snapshot(store_copy)
    lacks = f"lacks {manifest.tasks[1].adapter}/adapter_config.json, which its manifest names"
    one_line_error(run_cli("generate", "--store", store_copy, "hello"), lacks)
    one_line_error(run_cli("serve", "--store", store_copy, "--port", "0", timeout=120), lacks)
    one_line_error(run_cli("forget", "--store", store_copy, "--task", manifest.tasks[0].name), lacks)
    assert snapshot(store_copy) == before
    no_switch = tmp_path / "no-switch"
    shutil.copytree(trained_store, no_switch, ignore=shutil.ignore_patterns("switch"))
    before = snapshot(no_switch)
    one_line_error(run_cli("forget", "--store", no_switch, "--task", manifest.tasks[0].name),
                   f"lacks {manifest.switch}/switch.json")
    assert snapshot(no_switch) == before

    files = _bundle_files(trained_store, tmp_path)
    config = f"{manifest.tasks[0].adapter}/adapter_config.json"
    del files[config]
    bundle = _tar(tmp_path / "no-config.tar", _with_checksums(files))
    one_line_error(run_cli("import", bundle, "--store", tmp_path / "imported"), f"lacks {config}")
    assert not (tmp_path / "imported").exists()


def test_import_streams_in_bounded_memory_and_refuses_unnamed_files(trained_store, tmp_path):
    """Members stream to staging files one buffer at a time: a 256 MiB file that the manifest names is imported in
    well under 256 MiB of memory, and refused likewise over --max-bytes; a file that no manifest entry names is
    refused before a byte of it is written (the bundle would have put it beside adapters/, memory/, switch/)."""
    import hashlib
    import shutil
    import subprocess
    import sys

    big = 256 * 2**20
    files = _bundle_files(trained_store, tmp_path)
    adapter = json.loads(files["manifest.json"])["tasks"][0]["adapter"]
    zeros = hashlib.sha256()
    for _ in range(big // 2**20):
        zeros.update(bytes(2**20))

    def bundle(name: str):
        """An exported bundle plus `name`: `big` zero bytes, listed in checksums.json."""
        members = [(member, data) for member, data in _with_checksums(files) if member != name]
        listed = json.dumps({**json.loads(members[0][1]), name: zeros.hexdigest()}).encode()
        path = tmp_path / f"{name.replace('/', '_')}.tar.gz"
        with tarfile.open(path, "w:gz", compresslevel=1) as tar, open("/dev/zero", "rb") as source:
            for member, data in [("checksums.json", listed), *members[1:]]:
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            info = tarfile.TarInfo(name)
            info.size = big
            tar.addfile(info, source)
        return path

    def imported(path, *extra) -> tuple[subprocess.CompletedProcess, int]:
        """`switchcit import` in a process of its own, and its peak resident memory in bytes (VmHWM: getrusage
        would also count the pytest process it was forked from)."""
        measure = ("import re, sys\nfrom switchcit.cli import main\ncode = main(sys.argv[1:])\n"
                   "print(re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read())[1], file=sys.stderr)\n"
                   "sys.exit(code)")
        proc = subprocess.run([sys.executable, "-c", measure, "import", str(path), "--store",
                               str(tmp_path / "imported"), *extra], capture_output=True, text=True, timeout=600)
        return proc, int(proc.stderr.split()[-1]) * 1024

    named = bundle(f"{adapter}/adapter_model.safetensors")  # a file the manifest names, 256 MiB of it
    proc, peak = imported(named, "--max-bytes", "64MiB")
    assert "unpacks to more than 67108864 bytes" in proc.stderr and peak < big / 4, proc.stderr
    proc, peak = imported(named)
    assert proc.returncode == 0 and peak < big / 4, proc.stderr
    assert (tmp_path / "imported" / adapter / "adapter_model.safetensors").stat().st_size == big
    shutil.rmtree(tmp_path / "imported")
    for unnamed in ("junk/zeros", f"{adapter}/extra.bin"):  # beside the store's folders, or inside one of them
        proc, peak = imported(bundle(unnamed))
        assert f"holds '{unnamed}', which its manifest does not name: refusing it" in proc.stderr and peak < big / 4
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith("tar.gz")) == ["exported.tar"]
