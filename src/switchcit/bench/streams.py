"""Task streams for the benchmark: the built-in demo, the CIT stream of the paper, BIG-bench, a user's folder.

A stream is a list of tasks in learning order. Each task has its training examples, its evaluation
examples worded as in training ("seen") and, where the task has them, worded in ways training never
used: the stream's own ("unseen", CT0's) and switchcit's ("reworded", `data/rewordings.json`, which no
fit or calibration reads), and the name of its metric.

Users shape their rows in several ways, and routing must hold for each (`SHAPES`): as the stream builds
them (instruction and input apart, where the stream has them), the whole prompt as one instruction (no
wording the switch can hold out), or one wording per task.
"""

from __future__ import annotations

import functools
import json
import random
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..data import Example, Task, load_examples, make_prompt
from ..errors import SwitchcitError
from .metrics import METRICS

CIT_ORDER = ("simp", "emdg", "inqqg", "exp", "hgen")
CIT_METRICS = {"simp": "sari", "emdg": "bertscore", "inqqg": "bertscore", "exp": "bertscore", "hgen": "rouge1"}
CIT_ANSWERS = {"simp": "references", "emdg": "response", "inqqg": "question", "exp": "explanations",
               "hgen": "headline"}
CIT_SECONDARY = {"hgen": ("constraint", "bleu")}
CIT_LOWERCASE = {"emdg", "hgen"}  # their references are lower-cased and tokenized
CONSTRAINT_KINDS = ("start", "contain", "end")
SHAPES = ("as_built", "inline", "one_wording")
REWORDINGS = Path(__file__).parent / "data" / "rewordings.json"


@dataclass(frozen=True)
class EvalExample:
    prompt: str
    references: tuple[str, ...]
    source: str | None = None  # what SARI compares against: the text to simplify
    constraint: tuple[str, str] | None = None  # hgen: (start|contain|end, word)
    wording: str | None = None  # the instruction template or text this prompt was worded with


@dataclass
class BenchTask:
    name: str
    train: Task
    seen: list[EvalExample]
    metric: str
    unseen: list[EvalExample] = field(default_factory=list)
    reworded: list[EvalExample] = field(default_factory=list)
    secondary: tuple[str, ...] = ()
    lowercase: bool = False  # lower-case predictions before scoring


@dataclass
class Stream:
    name: str
    tasks: list[BenchTask]

    def labels(self) -> dict[str, str]:
        """Every evaluation prompt -> its true task (the oracle's routing)."""
        return {e.prompt: t.name for t in self.tasks for e in [*t.seen, *t.unseen, *t.reworded]}


@functools.cache
def rewordings() -> dict:
    return json.loads(REWORDINGS.read_text(encoding="utf-8"))


def reshape(stream: Stream, shape: str) -> Stream:
    """The stream's training rows in one of `SHAPES`. 'one_wording' keeps the rows of each task's first wording
    (CIT's loader instead words every row with its first template, keeping the row count)."""
    def rows(task: BenchTask) -> list[Example]:
        if shape == "inline":  # the whole prompt is the instruction: no row says how it was worded
            return [Example(e.prompt, e.output) for e in task.train.examples]
        first = task.train.examples[0].wording
        return [e for e in task.train.examples if e.wording == first]

    if shape == "as_built":
        return stream
    return Stream(stream.name, [replace(t, train=Task(t.name, rows(t))) for t in stream.tasks])


def _sample(rows: list, n: int, rng: random.Random) -> list:
    """A seeded sample of up to n rows, in their original order."""
    return [rows[i] for i in sorted(rng.sample(range(len(rows)), min(n, len(rows))))]


# -- demo -------------------------------------------------------------------------------------------

def demo(n_train: int, n_eval: int, seed: int) -> Stream:
    from ..demo import demo_stream

    tasks = [BenchTask(train.name, train, [EvalExample(e.prompt, (e.output,), wording=e.wording)
                                           for e in test.examples], "exact_match")
             for train, test in demo_stream(n_train, n_eval, seed)]
    return Stream("demo", tasks)


# -- CIT --------------------------------------------------------------------------------------------

def cit_references(task: str, record: dict) -> tuple[str, ...]:
    """All acceptable answers of a CIT record; the first is the training answer."""
    answer = record[CIT_ANSWERS[task]]
    return tuple(answer) if isinstance(answer, list) else (answer,)


def headline_constraint(headline: str, rng: random.Random) -> tuple[str, str]:
    """CT0's word constraint: a seeded kind, and the first / a random / the last headline word that has a
    letter and is no unknown-word token (the test set writes UNK, the training set <unk>)."""
    words = [w for w in headline.split() if any(c.isalpha() for c in w) and w.lower().strip("<>") != "unk"]
    words = words or headline.split()
    kind = rng.choice(CONSTRAINT_KINDS)
    if kind == "contain":
        return kind, rng.choice(words)
    return kind, words[0] if kind == "start" else words[-1]


def cit_prompt(task: str, record: dict, templates: dict, wordings: str, rng: random.Random,
               constraint: tuple[str, str] | None = None) -> tuple[str, str]:
    """Fill one seeded wording of `templates[task][wordings]` ('train', 'eval_seen', 'eval_unseen'):
    the prompt and the template it was worded with."""
    fields = dict(record)
    if task == "emdg":
        fields["context"] = "\n".join(record["context"])
    if task == "exp":
        fields["label_phrase"] = templates["exp"]["label_phrase"][record["label"]]
    choices = templates[task][wordings]
    if constraint is not None:
        choices = choices[constraint[0]]
        fields["constraint"] = constraint[1]
    template = rng.choice(choices)
    return template.format(**fields), template


def has_wordings(templates: dict, task: str, wordings: str) -> bool:
    choices = templates[task].get(wordings) or []
    return any(choices.values()) if isinstance(choices, dict) else bool(choices)


def one_wording(templates: dict, task: str) -> dict:
    """The templates with only the first training wording of `task` (per constraint kind for hgen)."""
    first = templates[task]["train"]
    first = {k: v[:1] for k, v in first.items()} if isinstance(first, dict) else first[:1]
    return {**templates, task: {**templates[task], "train": first}}


def cit_task(task: str, train_records: list[dict], test_records: list[dict], templates: dict,
             n_train: int, n_eval: int, seed: int, shape: str = "as_built") -> BenchTask:
    """Sample and word one CIT task; every random choice comes from generators seeded by (seed, task)."""
    sample_rng, train_rng, eval_rng, reword_rng = (random.Random(f"{seed}:{task}:{what}")
                                                   for what in ("sample", "train", "eval", "reword"))
    train_templates = one_wording(templates, task) if shape == "one_wording" else templates
    reworded_templates = {**templates, task: {**templates[task], "reworded": rewordings()["cit"][task]}}
    examples = []
    for record in _sample(train_records, n_train, sample_rng):
        constraint = headline_constraint(record["headline"], train_rng) if task == "hgen" else None
        prompt, wording = cit_prompt(task, record, train_templates, "train", train_rng, constraint)
        examples.append(Example(prompt, cit_references(task, record)[0], wording))
    unseen = has_wordings(templates, task, "eval_unseen")
    seen_examples, unseen_examples, reworded_examples = [], [], []
    for record in _sample(test_records, n_eval, sample_rng):
        constraint = headline_constraint(record["headline"], eval_rng) if task == "hgen" else None
        refs, source = cit_references(task, record), record.get("source")
        prompt, wording = cit_prompt(task, record, templates, "eval_seen", eval_rng, constraint)
        seen_examples.append(EvalExample(prompt, refs, source, constraint, wording))
        if unseen:
            prompt, wording = cit_prompt(task, record, templates, "eval_unseen", eval_rng, constraint)
            unseen_examples.append(EvalExample(prompt, refs, source, constraint, wording))
        prompt, wording = cit_prompt(task, record, reworded_templates, "reworded", reword_rng, constraint)
        reworded_examples.append(EvalExample(prompt, refs, source, constraint, wording))
    return BenchTask(task, Task(task, examples), seen_examples, CIT_METRICS[task], unseen_examples,
                     reworded_examples, CIT_SECONDARY.get(task, ()), task in CIT_LOWERCASE)


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise SwitchcitError(f"missing data file {path}: the data folder needs <task>/train.jsonl and test.jsonl")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def cit(data_dir: str | Path | None, n_train: int, n_eval: int, seed: int, shape: str = "as_built") -> Stream:
    """The CIT stream from a folder laid out like shared/data/cit, or from Hugging Face when `data_dir` is None."""
    if data_dir is None:
        from .hub import load_cit_records, load_cit_templates

        templates = load_cit_templates()
        records = {t: (load_cit_records(t, "train"), load_cit_records(t, "test")) for t in CIT_ORDER}
    else:
        root = Path(data_dir)
        templates_path = root / "templates.json"
        if not templates_path.is_file():
            raise SwitchcitError(f"{root} is not a CIT data folder: {templates_path} is missing")
        templates = json.loads(templates_path.read_text(encoding="utf-8"))
        records = {t: (_read_jsonl(root / t / "train.jsonl"), _read_jsonl(root / t / "test.jsonl"))
                   for t in CIT_ORDER}
    tasks = [cit_task(t, *records[t], templates, n_train, n_eval, seed, shape) for t in CIT_ORDER]
    return reshape(Stream("cit", tasks), shape)


# -- BIG-bench --------------------------------------------------------------------------------------

def bigbench_prompt(task: dict, row: dict) -> tuple[str, str | None]:
    """BIG-bench's prompt as a user's row gives it: the task's prefix as instruction (if any), the input after it;
    and the wording (the prefix) where the row has an instruction apart from its input."""
    prefix = (task.get("task_prefix") or "").strip()
    return (make_prompt(prefix, row["input"]), prefix) if prefix else (row["input"], None)


def bigbench_reworded(name: str, rows: list[dict], rng: random.Random) -> list[EvalExample]:
    """Test rows in switchcit's rewordings of this task (none where it has none; rows its pattern misses skipped)."""
    import re

    spec = rewordings()["bigbench"].get(name)
    if spec is None:
        return []
    out = []
    for row in rows:
        match = re.search(spec["pattern"], row["input"])
        if match:
            template = rng.choice(spec["templates"])
            fields = {k: v.strip() for k, v in match.groupdict().items()}
            out.append(EvalExample(template.format(input=row["input"], **fields), (row["target"],), wording=template))
    return out


def bigbench(data_dir: str | Path, n_train: int, n_eval: int, seed: int, shape: str = "as_built") -> Stream:
    """The BIG-bench stream from a folder laid out like shared/data/bigbench (read in place), in its order.
    Every task comes with one wording (its prefix, or none), so 'one_wording' is 'as_built'. Generative tasks are
    scored by exact match, multiple-choice ones by the right choice (`metrics.normalize_choice`)."""
    root = Path(data_dir)
    spec_path = root / "tasks.json"
    if not spec_path.is_file():
        raise SwitchcitError(f"{root} is not a BIG-bench data folder: {spec_path} is missing")
    tasks = []
    for task in json.loads(spec_path.read_text(encoding="utf-8"))["tasks"]:
        name = task["name"]
        sample_rng, reword_rng = (random.Random(f"{seed}:{name}:{what}") for what in ("sample", "reword"))
        train = _sample(_read_jsonl(root / name / "train.jsonl"), n_train, sample_rng)
        test = _sample(_read_jsonl(root / name / "test.jsonl"), n_eval, sample_rng)
        examples = [Example(prompt, r["target"], wording)
                    for r in train for prompt, wording in [bigbench_prompt(task, r)]]
        seen = [EvalExample(prompt, tuple(r.get("references") or (r["target"],)), wording=wording)
                for r in test for prompt, wording in [bigbench_prompt(task, r)]]
        metric = "choice" if task["kind"] == "multiple_choice" else "exact_match"
        tasks.append(BenchTask(name, Task(name, examples), seen, metric,
                               reworded=bigbench_reworded(name, test, reword_rng)))
    return reshape(Stream("bigbench", tasks), shape)


# -- a user's folder --------------------------------------------------------------------------------

def user(folder: str | Path, n_train: int, n_eval: int, seed: int) -> Stream:
    """`<task>.jsonl` files (Alpaca or chat rows) and a stream.json naming order, split and metric:

    {"tasks": [{"name": "a", "metric": "exact_match", "test": 0.2},
               {"name": "b", "metric": "rouge1", "test": 50, "lowercase": true, "secondary": ["bleu"]}]}

    "test" is the held-out share (below 1) or count of rows, drawn with the seed. A row may carry
    "references" (a list) to score against several answers, and "source" for SARI (default: its input).
    """
    folder = Path(folder)
    spec_path = folder / "stream.json"
    if not spec_path.is_file():
        raise SwitchcitError(f"{folder} is no stream folder: it needs stream.json and <task>.jsonl files")
    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    tasks = []
    for entry in spec.get("tasks", []):
        name, metric = entry.get("name"), entry.get("metric")
        for m in [metric, *entry.get("secondary", [])]:
            if m not in METRICS:
                raise SwitchcitError(f"{spec_path}: task '{name}' has unknown metric '{m}': "
                                     f"use one of {sorted(METRICS)}")
        path = folder / f"{name}.jsonl"
        examples = load_examples(path)
        raw = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        test = entry.get("test", 0.2)
        n_test = round(test * len(raw)) if test < 1 else int(test)
        if not 0 < n_test < len(raw):
            raise SwitchcitError(f"{spec_path}: task '{name}' holds out {n_test} of {len(raw)} rows: "
                                 "keep at least one row for training and one for testing")
        rng = random.Random(f"{seed}:{name}:split")
        order = list(range(len(raw)))
        rng.shuffle(order)
        test_rows, train_rows = sorted(order[:n_test]), sorted(order[n_test:])
        train_rows = _sample(train_rows, n_train, rng)
        train = Task(name, [examples[i] for i in train_rows])
        seen = [EvalExample(examples[i].prompt, tuple(raw[i].get("references") or [examples[i].output]),
                            raw[i].get("source") or raw[i].get("input") or examples[i].prompt,
                            wording=raw[i].get("instruction"))
                for i in _sample(test_rows, n_eval, rng)]
        tasks.append(BenchTask(name, train, seen, metric, secondary=tuple(entry.get("secondary", ())),
                               lowercase=bool(entry.get("lowercase", False))))
    if not tasks:
        raise SwitchcitError(f"{spec_path} lists no tasks")
    return Stream(folder.name, tasks)


def select(stream: Stream, names: list[str] | None) -> Stream:
    """The stream's tasks of these names, in stream order (all of them when `names` is None)."""
    if names is None:
        return stream
    known = [t.name for t in stream.tasks]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise SwitchcitError(f"--tasks {unknown or '(none)'}: the {stream.name} stream has {', '.join(known)}")
    return Stream(stream.name, [t for t in stream.tasks if t.name in names])


def load_stream(spec: str, data_dir: str | Path | None, n_train: int, n_eval: int, seed: int,
                shape: str = "as_built", tasks: list[str] | None = None) -> Stream:
    """'demo', 'cit' (from `data_dir`, or Hugging Face when None), 'bigbench' (from `data_dir`) or a user's stream
    folder, with its training rows in `shape`; only `tasks` of it, in stream order, when given."""
    if spec == "cit":
        return select(cit(data_dir, n_train, n_eval, seed, shape), tasks)
    if spec == "bigbench":
        if data_dir is None:
            raise SwitchcitError("the bigbench stream is read in place: give --data-dir (e.g. ../shared/data/bigbench)")
        return select(bigbench(data_dir, n_train, n_eval, seed, shape), tasks)
    stream = demo(n_train, n_eval, seed) if spec == "demo" else user(spec, n_train, n_eval, seed)
    return select(reshape(stream, shape), tasks)
