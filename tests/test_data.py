import pytest
from conftest import write_jsonl

from switchcit import SwitchcitError, Task
from switchcit.data import chat_prompt, check_task_name, load_examples, make_prompt


def test_alpaca_and_chat_rows(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"instruction": "Reverse.", "input": "a b", "output": "b a"},
        {"instruction": "Say hi.", "output": "hi"},
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "first"},
                      {"role": "assistant", "content": "one"}, {"role": "user", "content": "second"},
                      {"role": "assistant", "content": "two"}]},
        "",
    ])
    examples = load_examples(path)
    assert [e.prompt for e in examples] == ["Reverse.\n\na b", "Say hi.", "second"]
    assert [e.output for e in examples] == ["b a", "hi", "two"]


def test_prompt_files_need_no_output(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"instruction": "Reverse.", "input": "a b"},
                                              {"messages": [{"role": "user", "content": "hello"}]}])
    assert [e.prompt for e in load_examples(path, require_output=False)] == ["Reverse.\n\na b", "hello"]
    with pytest.raises(SwitchcitError, match=r"p.jsonl:1: missing 'output'"):
        load_examples(path)


@pytest.mark.parametrize("line, message", [
    ('{"instruction": "x", "output": "y"', r":2: malformed JSON"),
    ('{"input": "x", "output": "y"}', r":2: missing or empty 'instruction'"),
    ('{"instruction": "x", "output": ""}', r":2: empty 'output'"),
    ('{"instruction": "x", "output": 3}', r":2: 'output' must be a string"),
    ('[1, 2]', r":2: expected a JSON object"),
    ('{"messages": [{"role": "user"}]}', r":2: 'messages' must be a list"),
    ('{"messages": [{"role": "user", "content": "q"}]}', r":2: no non-empty assistant message"),
])
def test_errors_name_file_and_line(tmp_path, line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "ok", "output": "ok"}, line])
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
