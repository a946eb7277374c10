"""Hostile stores and bundles: nothing outside the store is ever read, written or deleted."""

import io
import json
import tarfile

import pytest
from conftest import run_cli, snapshot, task_rows, write_jsonl

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
