"""Beyond the paper: unknown requests fall back to base, forgetting a task, portable bundles."""

import io
import json
import tarfile

import pytest
from conftest import run_cli, snapshot

from switchcit import BASE, ContinualModel, Store, SwitchcitError
from switchcit.bundle import export_store, import_bundle
from switchcit.demo import UNRELATED
from switchcit.generation import NEARER_EVERYDAY, NOTHING_LEARNED, OUTSIDE_REGIONS

UNKNOWN = UNRELATED


def test_unknown_requests_go_to_base(trained_store, stream):
    cm = ContinualModel(trained_store, progress=False)
    unknown = cm.route(UNKNOWN)
    assert sum(r.task == BASE for r in unknown) / len(UNKNOWN) >= 0.8
    assert all(r.confidence is None for r in unknown if r.task == BASE)
    # a base route names the task the switch would have picked and which of the fallback's tests it failed
    features = cm.encoder.encode(UNKNOWN)
    region, background = cm.switch.unknown_scores(features)
    labels = cm.switch.predict(features)[0]
    assert [(r.nearest, r.reason) for r in unknown] == [
        (t, OUTSIDE_REGIONS if a > 1 else NEARER_EVERYDAY) if r.task == BASE else (None, None)
        for r, t, a in zip(unknown, labels, region.tolist())]
    known = cm.route([p for _, test in stream for p in test.prompts])
    assert sum(r.task == BASE for r in known) / len(known) <= 0.1
    cm.fallback = False
    assert all(r.task != BASE for r in cm.route(UNKNOWN))


def test_forget_removes_every_trace(store_copy, stream):
    gone, _ = stream[1]
    before = json.loads((store_copy / "manifest.json").read_text())
    entry = next(t for t in before["tasks"] if t["name"] == gone.name)
    run_cli("forget", "--store", store_copy, "--task", gone.name, check=True)
    manifest = Store(store_copy).read()
    assert manifest.task_names == [t.name for t, _ in stream if t.name != gone.name]
    assert not (store_copy / "adapters" / gone.name).exists() and not (store_copy / "memory" / gone.name).exists()
    assert not (store_copy / entry["adapter"]).exists()
    for path in store_copy.rglob("*"):
        assert gone.name not in path.read_text(errors="ignore") if path.suffix == ".json" else True
        assert gone.name not in str(path.relative_to(store_copy))
    switch_meta = json.loads(next((store_copy / "switch").rglob("switch.json")).read_text())
    assert gone.name not in switch_meta["labels"]
    cm = ContinualModel(store_copy, progress=False)
    assert all(r.task != gone.name for r in cm.route(stream[1][1].prompts))
    assert cm.switch.background is not None  # the background class is no task's: it stays
    with pytest.raises(SwitchcitError, match="not in store"):
        cm.forget(gone.name)


def test_forget_in_a_live_model_and_the_last_task(store_copy, stream):
    cm = ContinualModel(store_copy, progress=False)
    prompts = [test.prompts[0] for _, test in stream]
    cm.generate(prompts, max_new_tokens=2)
    for train, _ in stream:
        cm.forget(train.name)
        assert train.name not in [g.task for g in cm.generate(prompts, max_new_tokens=2)]
    assert cm.tasks == [] and {(r.task, r.reason) for r in cm.route(prompts)} == {(BASE, NOTHING_LEARNED)}
    assert not list((store_copy / "adapters").glob("*")) if (store_copy / "adapters").exists() else True


def test_export_import_round_trip(trained_store, tmp_path, stream):
    bundle = tmp_path / "model.tar"
    run_cli("export", "--store", trained_store, "--out", bundle, check=True)
    run_cli("import", bundle, "--store", tmp_path / "copy", check=True)
    live = Store(trained_store).read().live_paths()  # the previous generation's files stay home
    assert snapshot(tmp_path / "copy") == {k: v for k, v in snapshot(trained_store).items()
                                           if k == "manifest.json" or any(k.startswith(p) for p in live)}
    prompts = [p for _, test in stream for p in test.prompts[:5]]
    assert ContinualModel(tmp_path / "copy").route(prompts) == ContinualModel(trained_store).route(prompts)
    with tarfile.open(bundle) as tar:
        assert any(n.endswith("adapter_config.json") for n in tar.getnames())


def _rewrite(bundle, out, change):
    with tarfile.open(bundle) as src, tarfile.open(out, "w") as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read()
            member, data = change(member, data)
            dst.addfile(member, io.BytesIO(data))
        return out


def test_import_refuses_tampered_and_escaping_bundles(trained_store, tmp_path):
    bundle = tmp_path / "model.tar"
    export_store(trained_store, bundle)

    def flip(member, data):
        if member.name.endswith("adapter_model.safetensors"):
            data = data[:-1] + bytes([data[-1] ^ 1])
        return member, data

    with pytest.raises(SwitchcitError, match="tampered"):
        import_bundle(_rewrite(bundle, tmp_path / "t1.tar", flip), tmp_path / "s1")

    def escape(member, data):
        if member.name == "manifest.json":
            member.name = "../evil.json"
        return member, data

    with pytest.raises(SwitchcitError, match="outside the store"):
        import_bundle(_rewrite(bundle, tmp_path / "t2.tar", escape), tmp_path / "s2")
    assert not (tmp_path / "evil.json").exists()

    link = tmp_path / "t3.tar"
    with tarfile.open(bundle) as src, tarfile.open(link, "w") as dst:
        for member in src.getmembers():
            dst.addfile(member, src.extractfile(member))
        sym = tarfile.TarInfo("adapters/evil")
        sym.type, sym.linkname = tarfile.SYMTYPE, "/etc/passwd"
        dst.addfile(sym)
    with pytest.raises(SwitchcitError, match="link"):
        import_bundle(link, tmp_path / "s3")
    for name in ("s1", "s2", "s3"):
        assert not (tmp_path / name).exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("mine")
    with pytest.raises(SwitchcitError, match="not empty"):
        import_bundle(bundle, tmp_path / "full")
