import json
import sys

import pytest
import torch
from conftest import snapshot, task_rows, write_jsonl, write_rows
from safetensors.torch import load_file

from switchcit import ContinualModel, ExpertConfig, SwitchcitError, Task
from switchcit.cli import main
from switchcit.data import chat_prompt, check_task_name, load_examples, make_prompt
from switchcit.store import Store


def test_alpaca_and_chat_rows(tmp_path):
    alpaca = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Reverse.", "input": "a b", "output": "b a"},
                                                {"instruction": "Say hi.", "output": "hi"}, ""])
    chat = write_jsonl(tmp_path / "c.jsonl", [
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "first"},
                      {"role": "assistant", "content": "one"}, {"role": "user", "content": "second"},
                      {"role": "assistant", "content": "two"}]}])
    examples = load_examples(alpaca) + load_examples(chat)
    assert [e.prompt for e in examples] == ["Reverse.\n\na b", "Say hi.", "second"]
    assert [e.output for e in examples] == ["b a", "hi", "two"]
    assert [e.wording for e in examples] == ["Reverse.", None, None]


def test_prompt_files_need_no_output(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"instruction": "Reverse.", "input": "a b"}, {"instruction": "hello"}])
    assert [e.prompt for e in load_examples(path, require_output=False)] == ["Reverse.\n\na b", "hello"]
    with pytest.raises(SwitchcitError, match=r"p.jsonl:1: Alpaca rows need the column\(s\) output"):
        load_examples(path)


ALPACA = {"instruction": "ok", "output": "ok"}
CHAT = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}


@pytest.mark.parametrize("first, line, message", [
    (ALPACA, '{"instruction": "x", "output": "y"', r":2: malformed JSON"),
    (ALPACA, '{"input": "x", "output": "y"}', r":2: missing or empty 'instruction'"),
    (ALPACA, '{"instruction": "x", "output": ""}', r":2: empty 'output'"),
    (ALPACA, '{"instruction": "x", "output": 3}', r":2: 'output' must be a string"),
    (ALPACA, '[1, 2]', r":2: expected a JSON object"),
    (ALPACA, '{"messages": [{"role": "user", "content": "q"}]}', r":2: mixed shapes: chat here, Alpaca rows"),
    (CHAT, '{"messages": [{"role": "user"}]}', r":2: 'messages' must be a list"),
    (CHAT, '{"messages": [{"role": "user", "content": "q"}]}', r":2: no non-empty assistant message"),
    (CHAT, '{"instruction": "x", "output": "y"}', r":2: mixed shapes: Alpaca here, chat rows"),
])
def test_errors_name_file_and_line(tmp_path, first, line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [first, line])
    with pytest.raises(SwitchcitError, match="bad.jsonl" + message):
        load_examples(path)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(SwitchcitError, match="data file not found"):
        load_examples(tmp_path / "nope.jsonl")
    with pytest.raises(SwitchcitError, match="no examples"):
        load_examples(write_jsonl(tmp_path / "empty.jsonl", [""]))


@pytest.mark.parametrize("name", ["base", "switchcit", "Upper", "-lead", "", "a" * 65, "has space", "dot.name"])
def test_bad_task_names(name):
    with pytest.raises(SwitchcitError):
        check_task_name(name)
    with pytest.raises(SwitchcitError):
        Task(name, [])


@pytest.mark.parametrize("name", ["a", "simp", "task_2", "x-y", "0abc", "a" * 64])
def test_good_task_names(name):
    assert check_task_name(name) == name


def test_chat_template_wraps_prompt_and_plain_fallback(tiny_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    assert chat_prompt(tokenizer, "hi") == "<|user|>hi<|end|><|assistant|>"
    tokenizer.chat_template = None
    assert chat_prompt(tokenizer, make_prompt("Do.", "x")) == "Do.\n\nx\n"


# -- formats and shapes ------------------------------------------------------------------------------------

ROWS = [{"instruction": "Reverse the words.", "input": "apple river", "output": "river apple"},
        {"instruction": "Say hi.", "input": "", "output": "hi"},
        {"instruction": "Capitalize.", "input": "NA, \"quoted\"\nline", "output": "007"}]  # text a reader could mangle


def _chat(rows: list[dict]) -> list[dict]:
    return [{"messages": [{"role": "user", "content": make_prompt(r["instruction"], r["input"])},
                          {"role": "assistant", "content": r["output"]}]} for r in rows]


def _share_gpt(rows: list[dict]) -> list[dict]:
    return [{"conversations": [{"from": "system", "value": "be brief"},
                               {"from": "human", "value": make_prompt(r["instruction"], r["input"])},
                               {"from": "gpt", "value": r["output"]}]} for r in rows]


def _prompt_completion(rows: list[dict]) -> list[dict]:
    return [{"prompt": make_prompt(r["instruction"], r["input"]), "completion": r["output"]} for r in rows]


def _trl_conversational(rows: list[dict]) -> list[dict]:
    return [{"prompt": m["messages"][:1], "completion": m["messages"][1:]} for m in _chat(rows)]


def _own_columns(rows: list[dict]) -> list[dict]:
    return [{"id": str(i), "question": r["instruction"], "context": r["input"], "answer": r["output"]}
            for i, r in enumerate(rows)]


OWN = "instruction=question,input=context,output=answer"


def _sources(tmp_path, rows: list[dict]) -> dict[str, tuple]:
    """name -> (source, --columns) holding `rows`, in every format and shape."""
    folder = tmp_path / "folder"
    folder.mkdir()
    write_rows(folder / "a.jsonl", rows[:1])
    write_rows(folder / "b.parquet", rows[1:])
    (folder / "README.md").write_text("not data")
    return {"jsonl": (write_rows(tmp_path / "d.jsonl", rows), None),
            "json": (write_rows(tmp_path / "d.json", rows), None),
            "json-lines": (write_jsonl(tmp_path / "lines.json", rows), None),
            "csv": (write_rows(tmp_path / "d.csv", rows), None),
            "tsv": (write_rows(tmp_path / "d.tsv", rows), None),
            "parquet": (write_rows(tmp_path / "d.parquet", rows), None),
            "saved": (write_rows(tmp_path / "saved", rows), None),
            "folder": (folder, None),
            "chat": (write_rows(tmp_path / "chat.parquet", _chat(rows)), None),
            "sharegpt": (write_rows(tmp_path / "sharegpt.jsonl", _share_gpt(rows)), None),
            "prompt-completion": (write_rows(tmp_path / "pc.csv", _prompt_completion(rows)), None),
            "trl": (write_rows(tmp_path / "trl.parquet", _trl_conversational(rows)), None),
            "columns": (write_rows(tmp_path / "own.parquet", _own_columns(rows)), OWN),
            "prompt-columns": (write_rows(tmp_path / "own.tsv", [{"text": r["prompt"], "summary": r["completion"]}
                                                                  for r in _prompt_completion(rows)]),
                               "prompt=text,output=summary")}


def test_every_format_and_shape_reads_the_rows_of_its_jsonl(tmp_path, capsys):
    reference = load_examples(write_jsonl(tmp_path / "ref.jsonl", ROWS))
    assert [e.output for e in reference] == ["river apple", "hi", "007"]
    for name, (source, columns) in _sources(tmp_path, ROWS).items():
        examples = load_examples(source, columns=columns, progress=True)
        assert [(e.prompt, e.output) for e in examples] == [(e.prompt, e.output) for e in reference], name
        if name in ("jsonl", "json", "csv", "tsv", "parquet", "saved", "folder", "columns"):  # instruction + input
            assert [e.wording for e in examples] == [e.wording for e in reference], name
    progress = capsys.readouterr().err
    for shape in ("Alpaca rows (instruction, input, output)", "chat rows (messages)", "ShareGPT rows (conversations)",
                  "prompt/completion rows (prompt, completion)", "prompt/completion rows (prompt=text, output=summary)",
                  "Alpaca rows (instruction=question, input=context, output=answer)"):
        assert shape in progress


def test_each_file_of_a_folder_has_its_own_shape(tmp_path, capsys):
    """A folder of exports from different tools: each file's shape comes from its own first row."""
    reference = load_examples(write_jsonl(tmp_path / "ref.jsonl", ROWS))
    folder = tmp_path / "mixed"
    folder.mkdir()
    write_rows(folder / "a.jsonl", ROWS[:1])
    write_rows(folder / "b.parquet", _chat(ROWS[1:2]))
    write_rows(folder / "c.csv", _prompt_completion(ROWS[2:]))
    examples = load_examples(folder, progress=True)
    assert [(e.prompt, e.output) for e in examples] == [(e.prompt, e.output) for e in reference]
    progress = capsys.readouterr().err
    assert "a.jsonl as Alpaca rows" in progress and "b.parquet as chat rows" in progress
    assert "c.csv as prompt/completion rows" in progress


@pytest.mark.parametrize("rows, columns, message", [
    ([{"question": "q", "answer": "a", "id": 1}], None,
     r"d.jsonl:1: unknown row shape; columns found: question, answer, id: name them, e\.g\. "
     r"--columns instruction=question,output=answer$"),
    ([{"instruction": "q", "context": "c", "response": "r"}], None,
     r"Alpaca rows need the column\(s\) output; columns found: instruction, context, response: .* "
     r"--columns instruction=instruction,input=context,output=response$"),
    ([{"messages": [], "instruction": "x", "output": "y"}], None,
     r"fits several shapes \(Alpaca, chat\).* --columns instruction=instruction or --columns messages=messages$"),
    ([{"question": "q", "answer": "a"}], "instruction=question,output=reply",
     r"need the column\(s\) reply; columns found: question, answer: name the columns with --columns$"),
    ([{"q": "x"}], "instruction=q,bogus=y", r"--columns 'instruction=q,bogus=y': give ROLE=COLUMN pairs"),
    ([{"q": "x"}], "instruction=q,messages=m", r"names roles of different shapes"),
    ([{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": 3}]}], None,
     r":1: 'conversations' must be a list of \{\"role\", \"content\"\}"),
])
def test_unknown_and_ambiguous_shapes_say_which_columns_fix_them(tmp_path, rows, columns, message):
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(SwitchcitError, match=message) as caught:
        load_examples(path, columns=columns)
    assert "\n" not in str(caught.value)


def test_bad_files_are_one_line(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    nested = tmp_path / "nested.parquet"
    pq.write_table(pa.table({"instruction": ["a", "b"], "output": [["x"], ["y"]]}), nested)
    (tmp_path / "binary.parquet").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "binary.csv").write_bytes(b"instruction,output\n\xff\xfe,x\n")
    (tmp_path / "empty.parquet").write_bytes(b"")
    pq.write_table(pa.table({"instruction": pa.array([], pa.string()), "output": pa.array([], pa.string())}),
                   tmp_path / "no-rows.parquet")
    (tmp_path / "header.csv").write_text("instruction,output\n")
    (tmp_path / "cells.csv").write_text("instruction,output\na,b\na,b,c\n")
    (tmp_path / "cut.json").write_text('[\n {"instruction": "a", "output": "b"},\n')
    (tmp_path / "empty-folder").mkdir()
    cases = {"nested.parquet": r"nested.parquet row 1: 'output' must be a string",
             "binary.parquet": r"binary.parquet: not a readable Parquet file",
             "binary.csv": r"binary.csv row 1: not UTF-8 text",
             "empty.parquet": r"empty.parquet: not a readable Parquet file",
             "no-rows.parquet": r"no-rows.parquet: no examples",
             "header.csv": r"header.csv: no examples",
             "cells.csv": r"cells.csv row 2: 3 cells where the header has 2",
             "cut.json": r"cut.json: malformed JSON \(Expecting value at line 3, column 1\)",
             "empty-folder": r"empty-folder holds no data files",
             "missing.csv": r"data file not found",
             "hf:": r"give a hub dataset as hf:ORG/NAME"}
    for name, message in cases.items():
        with pytest.raises(SwitchcitError, match=message) as caught:
            load_examples(name if name.startswith("hf:") else tmp_path / name)
        assert "\n" not in str(caught.value), name


def test_the_hub_offline_is_one_line(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    with pytest.raises(SwitchcitError, match=r"^hf:org/name:test: the Hugging Face hub \(http://127.0.0.1:9\) "
                       r"cannot be reached \(offline\)"):
        load_examples("hf:org/name:test")


def test_without_the_data_extra_jsonl_works_and_parquet_says_what_to_install(tmp_path, monkeypatch):
    jsonl, parquet = write_rows(tmp_path / "d.jsonl", ROWS), write_rows(tmp_path / "d.parquet", ROWS)
    saved = write_rows(tmp_path / "saved", ROWS)
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if not installed: importing it raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    monkeypatch.setitem(sys.modules, "datasets", None)
    assert len(load_examples(jsonl)) == 3
    with pytest.raises(SwitchcitError, match=r"d.parquet: reading it needs pyarrow: pip install 'switchcit\[data\]'"):
        load_examples(parquet)
    with pytest.raises(SwitchcitError, match=r"saved: reading it needs Hugging Face datasets: pip install"):
        load_examples(saved)


LEARN = ExpertConfig(learning_rate=1e-2, max_steps=3, epochs=100, batch_size=4)
LEARN_FLAGS = ["--lr", "1e-2", "--max-steps", "3", "--epochs", "100", "--batch-size", "4", "-q"]


def _adapter(root, name: str) -> dict:
    store = Store(root)
    entry = next(t for t in store.read().tasks if t.name == name)
    return load_file(store.path(entry.adapter) / "adapter_model.safetensors")


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_every_format_and_shape_learns_the_adapter_of_its_jsonl(tmp_path, tiny_model, stream, capsys):
    """Same rows and seed, any format or shape: the same adapter, through the library and the command."""
    rows = task_rows(stream[0][0])[:8]
    sources = _sources(tmp_path, rows)
    cm = ContinualModel(tmp_path / "store", base_model=str(tiny_model), expert_config=LEARN, progress=False)
    for name, (source, columns) in sources.items():
        cm.learn(Task(name, load_examples(source, columns=columns)))
    changed = [*rows[:-1], {**rows[-1], "output": rows[-1]["output"] + " x"}]
    cm.learn(Task("control", load_examples(write_jsonl(tmp_path / "changed.jsonl", changed))))
    reference = _adapter(cm.store.root, "jsonl")
    assert not _same(_adapter(cm.store.root, "control"), reference)  # the comparison can fail
    for name in sources:
        assert _same(_adapter(cm.store.root, name), reference), name

    cli_store = tmp_path / "cli-store"
    assert main(["learn", "--store", str(cli_store), "--task", "own", "--data", str(sources["columns"][0]),
                 "--columns", OWN, "--model", str(tiny_model), *LEARN_FLAGS]) == 0
    assert _same(_adapter(cli_store, "own"), reference)
    capsys.readouterr()

    bad = {"unknown.csv": b"question,reply\nq,a\n",
           "mixed.jsonl": (json.dumps(rows[0]) + "\n" + json.dumps(_chat(rows)[1]) + "\n").encode(),
           "empty.jsonl": b"", "binary.jsonl": bytes(range(256)), "binary.parquet": bytes(range(256))}
    nested = tmp_path / "nested.parquet"
    write_rows(nested, [{"instruction": r["instruction"], "input": {"words": r["input"]}, "output": r["output"]}
                        for r in rows])
    before = snapshot(cli_store)
    for path in [*(tmp_path / name for name in bad), nested]:
        if path.name in bad:
            path.write_bytes(bad[path.name])
        assert main(["learn", "--store", str(cli_store), "--task", "bad", "--data", str(path), "--model",
                     str(tiny_model), *LEARN_FLAGS]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"switchcit: error: {path}") and err.count("\n") == 1, err
    assert snapshot(cli_store) == before
