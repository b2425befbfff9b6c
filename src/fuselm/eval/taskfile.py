"""Task files: a task described in an lm-evaluation-harness task YAML.

fuselm reads the part of lm-eval's format that a generation task needs (its data as local JSON
Lines files, Jinja templates over a row, few-shot examples, stop strings, regex extraction,
metrics) and turns it into an ordinary `Task`, so that `fuselm eval`, the runner, reports and
`fuselm calibrate` take it like a built-in one. Whatever else a file asks for is refused with a
one-line error naming the key, never skipped: a task that runs differently from what its file
says would give numbers that cannot be compared. See docs/tasks.md.

A task file's task is named by its absolute path (`Task.name`: what runs, summaries and
calibrations record, and what `get_task` reads back); its `task:` name is its `label`. A run
records the digest of the file and of every file it names (`FileTask.pin`), and a run of an
edited task file is refused rather than mixed. The built-in tasks are task files too, packaged in
`tasks/` and named by their `task:` (`builtin`); their files lie under the data directory
(`fuselm: {files_relative_to: data_dir}`), read when the task runs, and what YAML cannot say is
a hook of `tasks/hooks.py` that the file names (`fuselm: {hook: humaneval}`).

Templates render in Jinja's immutable sandbox with undefined names as errors (a column that a row
lacks is an error, not an empty string); no Python (`!function`) is ever run.
"""

from __future__ import annotations

import ast
import gzip
import json
import re
import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..errors import FuselmError, UnknownNameError
from ..files import atomic_write_json, content_digest
from .metrics import (
    SacrebleuCorpusMetric,
    corpus_chrf,
    corpus_spbleu,
    corpus_spbleu_rebuilt,
    first_line,
    first_line_answer,
    gsm8k_exact,
    gsm8k_extract,
    gsm8k_reference,
    lenient_gsm8k,
    lenient_qa,
    squad_em,
    squad_f1,
)
from .task import CorpusMetric, SampleMetric, Task, TaskHook

TASK_FILE_SUFFIXES = (".yaml", ".yml")

# The keys fuselm reads, in the order the docs list them; `fuselm` holds fuselm's own additions.
READ_KEYS = (
    "task",
    "task_alias",
    "tag",
    "dataset_path",
    "dataset_name",
    "dataset_kwargs",
    "test_split",
    "validation_split",
    "training_split",
    "fewshot_split",
    "fewshot_config",
    "num_fewshot",
    "description",
    "doc_to_text",
    "doc_to_target",
    "doc_to_choice",
    "target_delimiter",
    "fewshot_delimiter",
    "output_type",
    "generation_kwargs",
    "filter_list",
    "metric_list",
    "repeats",
    "should_decontaminate",
    "doc_to_decontamination_query",
    "metadata",
    "fuselm",
)
FUSELM_KEYS = (
    "prompt_prefix_file",
    "main_metric",
    "extractor",
    "description",
    "chat",
    "shot_marker",
    "files_relative_to",
    "row_id",
    "hook",
    "hub",
)
# What a file's paths are relative to: the file itself (lm-eval's rule), or the data directory
# (--data-dir, $FUSELM_DATA), where the built-in tasks' files are.
RELATIVE_TO = ("task_file", "data_dir")
OUTPUT_TYPES = ("generate_until", "multiple_choice", "loglikelihood", "loglikelihood_rolling")
GENERATION_KEYS = ("until", "max_gen_toks", "do_sample", "temperature")
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's default for generate_until
REGEX_DEFAULT = r"#### (\-?[0-9\.\,]+)"  # lm-eval's regex filter's default pattern


def is_task_file(ref: str) -> bool:
    """Whether a `--task` value names a file rather than a built-in task."""
    return ref.endswith(TASK_FILE_SUFFIXES) or "/" in ref or Path(ref).is_file()


# --- reading ---------------------------------------------------------------------------------------


class _Code(str):
    """The value of a `!function module.name` tag: Python that fuselm does not run."""


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_constructor("!function", lambda loader, node: _Code(loader.construct_scalar(node)))


class _Bad(FuselmError):
    """An error in the file, raised with the key it is about; prefixed with the file's path."""


def _read_yaml(path: Path, shown: str) -> dict[str, Any]:
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as e:
        raise FuselmError(f"{shown}: invalid YAML: {' '.join(str(e).split())}") from None
    except UnicodeDecodeError:
        raise FuselmError(f"{shown}: not UTF-8 text") from None
    if not isinstance(data, dict):
        raise FuselmError(f"{shown}: expected a mapping of lm-eval task keys at the top level")
    return data


def _no_code(value: Any, where: str) -> None:
    if isinstance(value, _Code):
        raise _Bad(f"{where}: '!function {value}' is Python, which fuselm does not run (write it as a Jinja template)")
    if isinstance(value, dict):
        for k, v in value.items():
            _no_code(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _no_code(v, f"{where}[{i}]")


def _string(data: dict[str, Any], key: str, default: str | None = None, where: str = "") -> str | None:
    value = data.get(key, default)
    if value is not None and not isinstance(value, str):
        raise _Bad(f"{where}{key}: expected a string, got {value!r}")
    return value


def _first_rows(path: Path, n: int, where: str, shown: str) -> list[dict[str, Any]]:
    """The first `n` rows of a JSON Lines file (.gz allowed), for checking templates and taking shots."""
    rows: list[dict[str, Any]] = []
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if len(rows) >= n:
                    break
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise _Bad(
                        f"{where}: {shown}:{lineno}: not JSON ({e.msg}); fuselm reads JSON Lines, one object a line"
                    ) from None
                if not isinstance(row, dict):
                    raise _Bad(f"{where}: {shown}:{lineno}: expected a JSON object (one row a line)")
                rows.append(row)
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise _Bad(f"{where}: cannot read {shown}: {e}") from None
    return rows


# --- templates -------------------------------------------------------------------------------------


def _environment():
    from jinja2 import StrictUndefined
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True)
    # lm-eval's one filter of its own
    env.filters["regex_replace"] = lambda text, pattern, repl, count=0: re.sub(pattern, repl, text, count=count)
    return env


_ENV: Any = None


def _env():
    global _ENV
    if _ENV is None:
        _ENV = _environment()
    return _ENV


@dataclass(frozen=True)
class _Field:
    """A row -> value field of the file (doc_to_text, doc_to_target, description): a bare column
    name (lm-eval's rule: the value of that column) or a Jinja template over the row's columns."""

    key: str
    source: str
    origin: str  # the task file, for errors on rows read later
    column: str | None = None
    template: Any = None
    columns: frozenset[str] = frozenset()  # the row columns it reads

    @classmethod
    def parse(cls, key: str, source: str, origin: str, row_columns: list[str] | None, data_name: str) -> _Field:
        """`row_columns` None: the rows are not read with the file (they lie under the data
        directory, known only when the task runs): a bare name is then a column."""
        if source in (row_columns or ()) or (row_columns is None and source.isidentifier()):
            return cls(key, source, origin, column=source, columns=frozenset({source}))
        if "{{" not in source and "{%" not in source and source.isidentifier():
            raise _Bad(
                f"{key}: {source!r} is neither a column of the rows of {data_name} (they have: "
                f"{', '.join(row_columns)}) nor a template ({{{{column}}}})"
            )
        from jinja2 import TemplateSyntaxError, meta

        env = _env()
        try:
            names = meta.find_undeclared_variables(env.parse(source))
            template = env.from_string(source)
        except TemplateSyntaxError as e:
            raise _Bad(f"{key}: bad template: {e.message} (line {e.lineno})") from None
        return cls(key, source, origin, template=template, columns=frozenset(names - set(env.globals)))

    def check(self, row: dict[str, Any], data_name: str, index: int) -> None:
        """The columns it reads are in `row`, and it renders on it."""
        try:
            self._render(row)
        except Exception as e:  # noqa: BLE001 - a template's own error (an attribute a value lacks...)
            missing = sorted(self.columns - set(row))  # (a template may test `x is defined`: not all are needed)
            if self.column is not None:
                raise _Bad(
                    f"{self.key}: rows of {data_name} lack the column {self.column!r} (they have: {', '.join(row)})"
                ) from None
            if missing:
                what = "column" if len(missing) == 1 else "columns"
                raise _Bad(
                    f"{self.key}: the template refers to {what} {', '.join(repr(m) for m in missing)} that rows of "
                    f"{data_name} lack (they have: {', '.join(row)})"
                ) from None
            raise _Bad(f"{self.key}: cannot render row {index} of {data_name}: {type(e).__name__}: {e}") from None

    def _render(self, row: dict[str, Any]) -> Any:
        if self.column is not None:
            return row[self.column]
        return self.template.render(**row)

    def value(self, row: dict[str, Any]) -> Any:
        """The field on a row; a row it cannot render on (checked only on the files' first rows)
        is a one-line error naming the row."""
        try:
            return self._render(row)
        except Exception as e:  # noqa: BLE001
            raise FuselmError(
                f"{self.origin}: {self.key}: cannot render the row with id {row.get('id')!r}: {type(e).__name__}: {e}"
            ) from None

    def text(self, row: dict[str, Any]) -> str:
        value = self.value(row)
        return value if isinstance(value, str) else str(value)

    def target(self, row: dict[str, Any]) -> str | list[str]:
        """lm-eval's doc_to_target: a column's value as it is (a list: several references), a
        rendered template that reads as a Python list (`{{answers}}`) as that list, else the text."""
        value = self.value(row)
        if self.column is None and len(value) >= 2 and value[0] == "[" and value[-1] == "]":
            try:
                value = ast.literal_eval(value)
            except (SyntaxError, ValueError):
                pass
        if isinstance(value, (list, tuple)):
            return [str(v) for v in value]
        return str(value)


def _references(value: str | list[str]) -> list[str]:
    return list(value) if isinstance(value, list) else [value]


def _first(value: Any) -> str:
    if isinstance(value, list):
        return str(value[0]) if value else ""
    return "" if value is None else str(value)


# --- multiple choice -------------------------------------------------------------------------------


class _RowError(FuselmError):
    """A row whose choices or right choice cannot be read: named by its id (by its place in its
    file when the file is read)."""

    def __init__(self, origin: str, key: str, row: dict[str, Any], what: str):
        super().__init__(f"{origin}: {key}: {what} on the row with id {row.get('id', row.get('doc_id'))!r}")
        self.key, self.what = key, what


def _row_error(origin: str, key: str, row: dict[str, Any], what: str) -> FuselmError:
    return _RowError(origin, key, row, what)


@dataclass(frozen=True)
class _Choices:
    """lm-eval's doc_to_choice: a YAML list (the same choices for every row), a column holding a
    list, or a template whose rendered text reads as a Python list (`{{choices.text}}`)."""

    origin: str
    constant: tuple[str, ...] | None = None
    field: _Field | None = None

    def __call__(self, row: dict[str, Any]) -> list[str]:
        if self.constant is not None:
            return list(self.constant)
        assert self.field is not None
        value = self.field.value(row)
        if self.field.column is None:  # rendered text, read as a Python literal (as lm-eval does)
            try:
                value = ast.literal_eval(value)
            except (SyntaxError, ValueError):
                shown = value if len(value) <= 80 else value[:77] + "..."
                raise _row_error(
                    self.origin, "doc_to_choice", row, f"the template renders {shown!r}, not a list"
                ) from None
        if isinstance(value, dict):
            value = list(value.values())
        if not isinstance(value, (list, tuple)) or not value:
            raise _row_error(self.origin, "doc_to_choice", row, f"expected a non-empty list of choices, got {value!r}")
        return [str(v) for v in value]


@dataclass(frozen=True)
class _Gold:
    """lm-eval's doc_to_target for multiple choice: an index into the row's choices, or a choice's
    text (a list: several right choices). A bare column gives its value as it is; a template's
    text is an index when it is all digits, a list when it reads as a Python list, else a choice's
    text. Anything else (an index out of range, a text that is no choice, e.g. a label "B" that
    is not looked up) is an error naming the row (lm-eval warns and scores the row 0)."""

    origin: str
    choices: _Choices
    constant: int | None = None
    field: _Field | None = None

    def raw(self, row: dict[str, Any]) -> Any:
        if self.constant is not None:
            return self.constant
        assert self.field is not None
        value = self.field.value(row)
        if self.field.column is not None:
            return value
        if value.isdigit():
            return int(value)
        if len(value) >= 2 and value[0] == "[" and value[-1] == "]":
            try:
                return ast.literal_eval(value)
            except (SyntaxError, ValueError):
                pass
        return value

    def __call__(self, row: dict[str, Any]) -> int | list[int]:
        choices = self.choices(row)
        value = self.raw(row)
        if isinstance(value, (list, tuple)):
            if not value:
                raise _row_error(self.origin, "doc_to_target", row, "an empty list of right choices")
            return [self._index(v, choices, row) for v in value]
        return self._index(value, choices, row)

    def _index(self, value: Any, choices: list[str], row: dict[str, Any]) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            if 0 <= value < len(choices):
                return value
            raise _row_error(
                self.origin, "doc_to_target", row, f"index {value} is out of range of {len(choices)} choices"
            )
        if isinstance(value, str) and value in choices:
            return choices.index(value)
        raise _row_error(
            self.origin,
            "doc_to_target",
            row,
            f"{value!r} is neither an index into the choices nor one of them ({', '.join(map(repr, choices))});"
            ' a label is looked up with a template, e.g. "{{choices.label.index(answerKey)}}"',
        )

    def first_text(self, row: dict[str, Any]) -> str:
        """The (first) right choice's text: a few-shot example's answer."""
        gold = self(row)
        return self.choices(row)[gold[0] if isinstance(gold, list) else gold]


# lm-eval's multiple_choice metrics that fuselm scores (eval/choice.py), and its default list
CHOICE_METRICS: dict[str, str] = {
    "acc": "the choice with the highest (fused) log-likelihood is right",
    "acc_norm": "the same, each log-likelihood divided by its choice's length in characters (lm-eval's acc_norm)",
    "acc_bytes": "the same, divided by its choice's length in UTF-8 bytes (lm-eval's acc_bytes)",
}
DEFAULT_CHOICE_METRICS = ("acc", "acc_norm")
NOT_CHOICE = {
    **dict.fromkeys(("acc_mutual_info", "mcc", "matthews_corrcoef", "brier_score", "likelihood", "f1"), "not read yet"),
    **dict.fromkeys(("exact_match", "contains", "em", "paper_match", "bleu", "chrf"), "a generate_until metric"),
}


def _scored_by_choices(name: str) -> SampleMetric:
    def refuse(output: str, answer: str, row: dict[str, Any]) -> float:
        raise FuselmError(f"{name} is scored from the choices' log-likelihoods (eval/choice.py), not from a text")

    return refuse


def _metric_entries(
    raw: Any, known: list[str], refused: dict[str, str], kind: str
) -> Iterator[tuple[str, str, dict[str, Any], dict[str, Any]]]:
    """Each entry of a `metric_list`: (where, name, its options, the entry), checked alike for
    every output type: a name of `known`, none of `refused` (with why), none listed twice."""
    if not isinstance(raw, list) or not raw:
        raise _Bad("metric_list: expected a list of {metric: NAME, ...}")
    seen: set[str] = set()
    for i, m in enumerate(raw):
        where = f"metric_list[{i}]"
        if isinstance(m, str):
            m = {"metric": m}
        if not isinstance(m, dict) or not isinstance(m.get("metric"), str):
            raise _Bad(f"{where}: expected {{metric: NAME, ...}}, got {m!r}")
        name = m["metric"]
        if name in refused:
            raise _Bad(f"{where} ({name}): {refused[name]}; a {kind} task is scored by: {', '.join(known)}")
        if name not in known:
            raise _Bad(f"{where}: {UnknownNameError('metric', name, known)}")
        if name in seen:
            raise _Bad(f"{where} ({name}): listed twice")
        seen.add(name)
        yield f"{where} ({name})", name, {k: v for k, v in m.items() if k != "metric"}, m


def _choice_metrics(data: dict[str, Any]) -> dict[str, SampleMetric]:
    raw = data.get("metric_list")
    if raw is None:
        raw = list(DEFAULT_CHOICE_METRICS)
    out: dict[str, SampleMetric] = {}
    for where, name, options, m in _metric_entries(raw, list(CHOICE_METRICS), NOT_CHOICE, "multiple_choice"):
        if options.pop("aggregation", "mean") != "mean":
            raise _Bad(f"{where}: aggregation {m['aggregation']!r} is not read ({name} aggregates as mean)")
        if options.pop("higher_is_better", True) is not True:
            raise _Bad(f"{where}: higher_is_better must be true (fuselm ranks higher scores first)")
        if options:
            raise _Bad(f"{where}: unknown option {sorted(options)[0]!r} (it takes: aggregation, higher_is_better)")
        out[name] = _scored_by_choices(name)
    return out


# --- filters and extractors -------------------------------------------------------------------------

Extract = Callable[[str], str]

# fuselm's own extractors (`fuselm: {extractor: NAME}`): the built-in tasks' rules.
EXTRACTORS: dict[str, tuple[Extract, str]] = {
    "first_line": (first_line_answer, "the first line, stripped, a trailing period dropped (nq, triviaqa, squad)"),
    "first_line_verbatim": (first_line, "the first line, stripped (flores)"),
    "boxed_number": (gsm8k_extract, "the number in the last \\boxed{}, else the last number (gsm8k)"),
    "whole": (lambda text: text, "the output as it is (lm-eval's default, humaneval)"),
}

FILTERS = ("regex", "take_first", "remove_whitespace", "lowercase", "uppercase")


def _regex_filter(pattern: re.Pattern[str], group_select: int, fallback: str) -> Extract:
    """lm-eval's `regex` filter: the `group_select`-th match (negative: from the end) of the
    pattern; for a pattern with several groups, its first non-empty group; stripped; `fallback`
    where nothing matches (or fewer matches than `group_select` asks for)."""

    def apply(text: str) -> str:
        found = pattern.findall(text)
        try:
            match = found[group_select]
        except IndexError:
            return fallback
        if isinstance(match, tuple):
            match = next((m for m in match if m), None)
            if match is None:
                return fallback
        return match.strip()

    return apply


def _one_filter(spec: Any, where: str) -> Extract | None:
    if not isinstance(spec, dict) or not isinstance(spec.get("function"), str):
        raise _Bad(f"{where}: expected {{function: NAME, ...}}, got {spec!r}")
    name, params = spec["function"], {k: v for k, v in spec.items() if k != "function"}
    if name not in FILTERS:
        raise _Bad(f"{where}: filter {name!r} is not read (fuselm reads: {', '.join(FILTERS)})")
    if name != "regex":
        if params:
            raise _Bad(f"{where}: filter {name} takes no options, got {', '.join(params)}")
        if name == "take_first":  # one output per row: the first is the output
            return None
        return {"remove_whitespace": str.strip, "lowercase": str.lower, "uppercase": str.upper}[name]
    unknown = sorted(set(params) - {"regex_pattern", "group_select", "fallback"})
    if unknown:
        raise _Bad(
            f"{where}: unknown option {unknown[0]!r} of the regex filter (it takes: regex_pattern, group_select, fallback)"
        )
    pattern = params.get("regex_pattern", REGEX_DEFAULT)
    group = params.get("group_select", 0)
    fallback = params.get("fallback", "[invalid]")
    if not isinstance(pattern, str):
        raise _Bad(f"{where}: regex_pattern: expected a string, got {pattern!r}")
    if not isinstance(group, int) or isinstance(group, bool):
        raise _Bad(f"{where}: group_select: expected an integer, got {group!r}")
    if not isinstance(fallback, str):
        raise _Bad(f"{where}: fallback: expected a string, got {fallback!r}")
    try:
        compiled = re.compile(pattern)
    except re.error as e:
        raise _Bad(f"{where}: regex_pattern {pattern!r} is not a regular expression: {e}") from None
    return _regex_filter(compiled, group, fallback)


def _pipeline(steps: list[Extract]) -> Extract:
    def apply(text: str) -> str:
        for step in steps:
            text = step(text)
        return text

    return apply


def _pipelines(data: dict[str, Any]) -> list[tuple[str, Extract]]:
    """(name, extraction) per filter pipeline of `filter_list`, or the one of `fuselm.extractor`,
    or lm-eval's default (the output as it is)."""
    ext = (data.get("fuselm") or {}).get("extractor")
    raw = data.get("filter_list")
    if ext is not None and raw is not None:
        raise _Bad("fuselm.extractor: give filter_list or fuselm.extractor, not both")
    if ext is not None:
        if ext not in EXTRACTORS:
            raise _Bad(f"fuselm.extractor: {UnknownNameError('extractor', str(ext), EXTRACTORS)}")
        return [("none", EXTRACTORS[ext][0])]
    if raw is None:
        return [("none", EXTRACTORS["whole"][0])]
    if not isinstance(raw, list) or not raw:
        raise _Bad("filter_list: expected a list of {name: ..., filter: [...]}")
    out: list[tuple[str, Extract]] = []
    for i, p in enumerate(raw):
        where = f"filter_list[{i}]"
        if not isinstance(p, dict) or set(p) - {"name", "filter"} or not isinstance(p.get("name"), str):
            raise _Bad(f"{where}: expected {{name: NAME, filter: [{{function: ...}}, ...]}}, got {p!r}")
        where = f"{where} ({p['name']})"
        steps = p.get("filter")
        if not isinstance(steps, list) or not steps:
            raise _Bad(f"{where}: filter: expected a list of {{function: ...}}")
        fns = [f for j, s in enumerate(steps) if (f := _one_filter(s, f"{where}.filter[{j}]")) is not None]
        if p["name"] in {name for name, _ in out}:
            raise _Bad(f"{where}: a second filter pipeline of that name")
        out.append((p["name"], _pipeline(fns)))
    return out


# --- metrics ---------------------------------------------------------------------------------------

_PUNCT = str.maketrans("", "", string.punctuation)
_DIGITS = str.maketrans("", "", string.digits)
MATCH_OPTIONS = ("ignore_case", "ignore_punctuation", "ignore_numbers", "regexes_to_ignore")

# (what it is, takes lm-eval's matching options)
SAMPLE_METRICS: dict[str, tuple[str, bool]] = {
    "exact_match": ("lm-eval's: the answer equals a reference, after the options", True),
    "contains": ("a reference occurs in the answer, after the same options", True),
    "em": ("SQuAD's normalised exact match (nq, triviaqa, squad)", False),
    "f1": ("SQuAD's token F1, the best over the references (not lm-eval's classification F1)", False),
    "paper_match": ("the AdaFuse paper's lenient QA match", False),
    "gsm8k_exact": ("the answer's final number equals the reference's (gsm8k's exact)", False),
    "gsm8k_paper_match": ("the reference's digits occur in the answer's (gsm8k's paper_match)", False),
}
CORPUS_METRICS: dict[str, str] = {
    "bleu": "sacrebleu's corpus BLEU (lm-eval's bleu)",
    "chrf": "sacrebleu's corpus chrF (lm-eval's chrf)",
    "spbleu": "sacrebleu's spBLEU, FLORES-200 model (flores)",
    "spbleu_rebuilt": "spBLEU with the rebuilt FLORES-200 model (flores)",
}
NOT_GENERATION = {
    **dict.fromkeys(
        ("acc", "acc_norm", "acc_mutual_info", "acc_bytes", "mcc", "matthews_corrcoef", "brier_score", "likelihood"),
        "a multiple_choice metric",
    ),
    **dict.fromkeys(("perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"), "a loglikelihood metric"),
    "ter": "lower is better (fuselm's reports and calibrations rank higher scores first)",
}


def _normaliser(options: dict[str, Any], where: str) -> Callable[[str], str]:
    regexes = options.get("regexes_to_ignore") or []
    if isinstance(regexes, str) or not isinstance(regexes, list) or not all(isinstance(r, str) for r in regexes):
        raise _Bad(f"{where}: regexes_to_ignore: expected a list of regular expressions")
    compiled = []
    for r in regexes:
        try:
            compiled.append(re.compile(r))
        except re.error as e:
            raise _Bad(f"{where}: regexes_to_ignore: {r!r} is not a regular expression: {e}") from None
    flags = {}
    for k in ("ignore_case", "ignore_punctuation", "ignore_numbers"):
        flags[k] = options.get(k, False)
        if not isinstance(flags[k], bool):
            raise _Bad(f"{where}: {k}: expected true or false, got {flags[k]!r}")

    def norm(text: str) -> str:  # in lm-eval's order
        for r in compiled:
            text = r.sub("", text)
        if flags["ignore_case"]:
            text = text.lower()
        if flags["ignore_punctuation"]:
            text = text.translate(_PUNCT)
        if flags["ignore_numbers"]:
            text = text.translate(_DIGITS)
        return text

    return norm


def _sample_metric(name: str, norm: Callable[[str], str]) -> Callable[[str, list[str]], float]:
    """(answer, references) -> score; a list of references: the best over them (lm-eval: match any)."""
    if name == "exact_match":
        return lambda ans, refs: float(any(norm(ans) == norm(r) for r in refs))
    if name == "contains":
        return lambda ans, refs: float(any(norm(r) and norm(r) in norm(ans) for r in refs))
    if name == "em":
        return squad_em
    if name == "f1":
        return squad_f1
    if name == "paper_match":
        return lenient_qa
    if name == "gsm8k_exact":
        return lambda ans, refs: max((gsm8k_exact(ans, gsm8k_reference(r)) for r in refs), default=0.0)
    if name == "gsm8k_paper_match":
        return lambda ans, refs: max((lenient_gsm8k(ans, gsm8k_reference(r)) for r in refs), default=0.0)
    raise AssertionError(name)


@dataclass(frozen=True)
class FirstReferenceCorpus:
    """A corpus metric over the first reference of each row (a row may carry several)."""

    metric: SacrebleuCorpusMetric

    def __call__(self, outputs: list[str], references: list[Any]) -> float | None:
        return self.metric(outputs, [_first(r) for r in references])

    def resampled(self, outputs: list[str], references: list[Any], indices: Any) -> Any | None:
        return self.metric.resampled(outputs, [_first(r) for r in references], indices)


def _bleu():
    from sacrebleu.metrics import BLEU

    return BLEU()


def _corpus_metric(name: str, extract: Extract) -> CorpusMetric:
    made = {
        "bleu": lambda: SacrebleuCorpusMetric(_bleu, extract),
        "chrf": lambda: corpus_chrf(extract),
        "spbleu": lambda: corpus_spbleu(extract),
        "spbleu_rebuilt": lambda: corpus_spbleu_rebuilt(extract),
    }[name]()
    return FirstReferenceCorpus(made)


def _metrics(
    data: dict[str, Any],
    pipelines: list[tuple[str, Extract]],
    references: Callable[[dict[str, Any]], list[str]],
    hook: TaskHook | None,
) -> tuple[dict[str, SampleMetric], dict[str, CorpusMetric]]:
    raw = data.get("metric_list")
    if raw is None:
        raw = [{"metric": "exact_match"}]  # lm-eval's default for generate_until
    own = hook.metrics if hook is not None else {}
    known = list(dict.fromkeys([*own, *SAMPLE_METRICS, *CORPUS_METRICS]))
    refused = {k: v for k, v in NOT_GENERATION.items() if k not in own}
    sample: dict[str, SampleMetric] = {}
    corpus: dict[str, CorpusMetric] = {}
    for where, name, options, _ in _metric_entries(raw, known, refused, "generate_until"):
        if name in own:  # the hook's code scores the whole output itself
            for key, value in options.items():
                if (key, value) not in (("aggregation", "mean"), ("higher_is_better", True)):
                    raise _Bad(f"{where}: {key}: {value!r} is not read (the hook's {name} takes: aggregation: mean)")
            sample[name] = own[name]
            continue
        is_corpus = name in CORPUS_METRICS
        agg = options.pop("aggregation", None)
        if agg is not None and agg != ("mean" if not is_corpus else name):
            raise _Bad(
                f"{where}: aggregation {agg!r} is not read ({name} aggregates as {'mean' if not is_corpus else name})"
            )
        hib = options.pop("higher_is_better", True)
        if hib is not True:
            raise _Bad(f"{where}: higher_is_better must be true (fuselm ranks higher scores first)")
        takes = not is_corpus and SAMPLE_METRICS[name][1]
        extra = sorted(set(options) - (set(MATCH_OPTIONS) if takes else set()))
        if extra:
            hint = f"it takes: aggregation, higher_is_better{', ' + ', '.join(MATCH_OPTIONS) if takes else ''}"
            raise _Bad(f"{where}: unknown option {extra[0]!r} ({hint})")
        norm = _normaliser(options, where)
        for pipe, extract in pipelines:
            key = name if len(pipelines) == 1 else f"{name},{pipe}"  # lm-eval's names with several pipelines
            if is_corpus:
                corpus[key] = _corpus_metric(name, extract)
            else:
                score = _sample_metric(name, norm)
                sample[key] = _bind(score, extract, references)
    return sample, corpus


def _bind(
    score: Callable[[str, list[str]], float], extract: Extract, references: Callable[[dict[str, Any]], list[str]]
) -> SampleMetric:
    return lambda output, answer, row: score(extract(output), references(row))


# --- the task --------------------------------------------------------------------------------------


def _content(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k != "id"}


@dataclass(frozen=True)
class _Prompter:
    """How a row becomes a prompt, lm-eval's way: description + few-shot examples (each
    `doc_to_text + target_delimiter + first target + fewshot_delimiter`) + the row's doc_to_text;
    with fuselm's prompt file (ready-made examples) before the rendered ones, followed by the
    fewshot_delimiter."""

    text: _Field
    target: _Field
    description: _Field | None
    file_text: str | None  # fuselm.prompt_prefix_file read with the task file, right-stripped
    fewshot_delimiter: str
    num_fewshot: int
    shots: tuple[tuple[dict[str, Any], str], ...]  # (row content, rendered example), num_fewshot + 1 of them

    def prefix(
        self,
        shots: int | None = None,
        keep: Callable[[str, int], str] | None = None,
        exclude=None,
        file_text: str | None = None,
    ) -> str:
        """The prompt file's text (`file_text`: one read from the data directory now) with the
        few-shot delimiter, also where `shots` keeps none of its examples, then the rendered ones."""
        head = self.file_text if file_text is None else file_text
        if head is not None and shots is not None and not self.num_fewshot and keep is not None:
            head = keep(head, shots)
        k = self.num_fewshot if shots is None else min(shots, self.num_fewshot)
        examples = [text for content, text in self.shots if exclude is None or content != exclude][:k]
        return (head + self.fewshot_delimiter if head is not None else "") + "".join(examples)

    def build(self, prefix: str, row: dict[str, Any]) -> str:
        content = _content(row)
        if any(c == content for c, _ in self.shots[: self.num_fewshot]):
            # lm-eval's rule: a row is never one of its own examples (the next one takes its place)
            for k in range(self.num_fewshot + 1):
                if prefix == self.prefix(k):
                    prefix = self.prefix(k, exclude=content)
                    break
        head = self.description.text(row) if self.description is not None else ""
        return head + prefix + self.text.text(row)


@dataclass(frozen=True)
class FileTask(Task):
    """A task read from a task file (`load_task_file`)."""

    task_name: str = ""  # the file's `task:`
    source: str = ""  # the file, absolute
    named_files: tuple[str, ...] = ()  # the file and every file it names, absolute
    prompter: _Prompter | None = None
    # a built-in task (a file packaged with fuselm): named by its `task:`, its version is fuselm's
    builtin: bool = False

    @property
    def label(self) -> str:
        return self.task_name

    def prompt_prefix(self, data_dir: Path | None = None, shots: int | None = None) -> str:
        """The few-shot part of every prompt (a prompt file relative to the task file was read
        with it; one under the data directory, `prompt_file`, is read now); with `shots`, only
        that many examples."""
        assert self.prompter is not None
        return self.prompter.prefix(shots, keep=self._keep_shots, file_text=self.prompt_file_text(data_dir))

    def file_digests(self) -> dict[str, str]:
        return {p: content_digest(p) if Path(p).is_file() else "missing" for p in self.named_files}

    def pin(self, run_config: Path) -> None:
        if self.builtin:  # as a built-in task always was: the run records fuselm's version
            return
        config = json.loads(run_config.read_text(encoding="utf-8"))
        now = {"path": self.source, "sha256": self.file_digests()}
        was = config.get("task_file")
        if was is None:
            atomic_write_json(run_config, {**config, "task_file": now})
            return
        if was != now:
            before, after = was.get("sha256") or {}, now["sha256"]
            changed = [p for p in sorted(set(before) | set(after)) if before.get(p) != after.get(p)]
            raise FuselmError(
                f"{run_config.parent} holds a run of the task file {self.source} as it was before "
                f"{', '.join(changed) or 'it'} changed: its rows would mix two tasks; use another --out or delete it"
            )


def _data_files(data: dict[str, Any], base: Path | None, hook: TaskHook | None) -> dict[str, tuple[Path, str]]:
    """split -> (file, its name as written) of dataset_kwargs.data_files (else the hook's files):
    relative to the task file `base`, checked now; or, `base` None, names under the data
    directory, looked for when the task runs."""
    if data.get("dataset_path") != "json":
        got = data.get("dataset_path")
        raise _Bad(
            f"dataset_path: {got!r} is not read: fuselm reads local JSON Lines files (dataset_path: json with"
            " dataset_kwargs: {data_files: {test: FILE.jsonl}}); `fuselm eval --data hub:NAME:SPLIT` loads from the hub"
            if got is not None
            else "dataset_path: missing (fuselm reads dataset_path: json with dataset_kwargs.data_files)"
        )
    if data.get("dataset_name") is not None:
        raise _Bad("dataset_name: not read with dataset_path: json (name the files in dataset_kwargs.data_files)")
    kwargs = data.get("dataset_kwargs")
    if kwargs is None and hook is not None and hook.data_files is not None:
        kwargs = {"data_files": hook.data_files()}
    if not isinstance(kwargs, dict) or "data_files" not in kwargs:
        raise _Bad("dataset_kwargs: expected {data_files: {SPLIT: FILE.jsonl, ...}} (or data_files: FILE.jsonl)")
    extra = sorted(set(kwargs) - {"data_files"})
    if extra:
        raise _Bad(f"dataset_kwargs: unknown key {extra[0]!r} (fuselm reads: data_files)")
    files = kwargs["data_files"]
    if isinstance(files, str):
        files = {"train": files}  # as datasets.load_dataset names a lone file's split
    if not isinstance(files, dict) or not files:
        raise _Bad("dataset_kwargs.data_files: expected a file or {SPLIT: FILE, ...}")
    out = {}
    for split, name in files.items():
        where = f"dataset_kwargs.data_files.{split}"
        if isinstance(name, list) and len(name) == 1:
            name = name[0]
        if not isinstance(name, str) or not name:
            raise _Bad(f"{where}: expected one file name, got {name!r}")
        if base is None:
            out[str(split)] = (Path(name), name)
            continue
        path = (base / name).expanduser()
        if not path.is_file():
            raise _Bad(f"{where}: file not found: {name} (relative to {base})")
        out[str(split)] = (path.resolve(), name)
    return out


def _split(data: dict[str, Any], key: str, files: dict[str, tuple[Path, str]]) -> str | None:
    split = data.get(key)
    if split is None:
        return None
    if not isinstance(split, str) or split not in files:
        raise _Bad(f"{key}: {split!r} is not a split of dataset_kwargs.data_files (it has: {', '.join(files)})")
    return split


def _generation(data: dict[str, Any], fewshot_delimiter: str) -> tuple[tuple[str, ...], int]:
    gen = data.get("generation_kwargs")
    if gen is None:
        return (fewshot_delimiter,), DEFAULT_MAX_GEN_TOKS  # lm-eval's defaults
    if not isinstance(gen, dict):
        raise _Bad("generation_kwargs: expected a mapping (until, max_gen_toks)")
    unknown = [k for k in gen if k not in GENERATION_KEYS]
    if unknown:
        raise _Bad(
            f"generation_kwargs: {unknown[0]!r} is not read (fuselm reads: until, max_gen_toks, do_sample: false,"
            " temperature: 0; sampling is fuselm's own --temperature/--top-p)"
        )
    if gen.get("do_sample", False) is not False:
        raise _Bad("generation_kwargs.do_sample: only false is read (greedy; sample with fuselm's --temperature)")
    if gen.get("temperature", 0) not in (0, 0.0) or isinstance(gen.get("temperature"), bool):
        raise _Bad("generation_kwargs.temperature: only 0 is read (greedy; sample with fuselm's --temperature)")
    until = gen.get("until", [fewshot_delimiter])
    if isinstance(until, str):
        until = [until]
    if not isinstance(until, list) or not all(isinstance(u, str) and u for u in until):
        raise _Bad(f"generation_kwargs.until: expected a list of non-empty strings, got {until!r}")
    tokens = gen.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS)
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1:
        raise _Bad(f"generation_kwargs.max_gen_toks: expected a positive integer, got {tokens!r}")
    return tuple(until), tokens


def _ending(until: tuple[str, ...], fewshot_delimiter: str) -> str:
    """What follows a target in a reference text: the few-shot delimiter up to the end of the
    first stop string in it (a stop at "\\n" after "\\n\\n" examples: "\\n"), else all of it."""
    hits = [(fewshot_delimiter.find(u), u) for u in until if u in fewshot_delimiter]
    if not hits:
        return fewshot_delimiter
    at, stop = min(hits, key=lambda h: (h[0], len(h[1])))
    return fewshot_delimiter[: at + len(stop)]


def _fuselm_section(data: dict[str, Any]) -> dict[str, Any]:
    ext = data.get("fuselm") or {}
    if not isinstance(ext, dict):
        raise _Bad(f"fuselm: expected a mapping of fuselm's additions ({', '.join(FUSELM_KEYS)})")
    unknown = [k for k in ext if k not in FUSELM_KEYS]
    if unknown:
        raise _Bad(f"fuselm: unknown key {unknown[0]!r} (fuselm reads: {', '.join(FUSELM_KEYS)})")
    return ext


def _check_keys(data: dict[str, Any]) -> None:
    out = data.get("output_type", "generate_until")
    if out in ("loglikelihood", "loglikelihood_rolling"):
        raise _Bad(
            f"output_type: {out} is not read yet (fuselm reads generate_until and multiple_choice tasks; {out} is to come)"
        )
    if out not in OUTPUT_TYPES:
        raise _Bad(f"output_type: {out!r} is not an lm-eval output type ({', '.join(OUTPUT_TYPES)})")
    for key in data:
        if key not in READ_KEYS:
            raise _Bad(f"unknown key {key!r} (fuselm reads: {', '.join(READ_KEYS)})")
    for key, value in data.items():
        _no_code(value, key)
    name = data.get("task")
    if not isinstance(name, str) or not name.strip():
        raise _Bad("task: expected the task's name (a group of tasks is not read)")
    if data.get("repeats", 1) != 1:
        raise _Bad("repeats: only 1 is read (one output per row)")
    fewshot = data.get("fewshot_config")
    if fewshot is not None:
        if not isinstance(fewshot, dict):
            raise _Bad("fewshot_config: expected {sampler: first_n, samples: [...]}")
        extra = sorted(set(fewshot) - {"sampler", "samples"})
        if extra:
            raise _Bad(f"fewshot_config: unknown key {extra[0]!r} (fuselm reads: sampler: first_n, samples)")
        if fewshot.get("sampler", "first_n") != "first_n":
            raise _Bad(
                f"fewshot_config.sampler: {fewshot['sampler']!r} is not read: fuselm takes the first num_fewshot"
                " examples, in order (sampler: first_n)"
            )
        samples = fewshot.get("samples")
        if samples is not None and (not isinstance(samples, list) or not all(isinstance(r, dict) for r in samples)):
            raise _Bad("fewshot_config.samples: expected a list of rows ({column: value, ...})")


def _hook(ext: dict[str, Any]) -> TaskHook | None:
    name = ext.get("hook")
    if name is None:
        return None
    # imported here: the tasks package, which holds the hooks, reads its task files with this module
    from .tasks.hooks import HOOKS

    if not isinstance(name, str) or name not in HOOKS:
        raise _Bad(f"fuselm.hook: {UnknownNameError('task hook', str(name), HOOKS)}")
    return HOOKS.get(name)


def _hub(ext: dict[str, Any]) -> tuple[str, str | None, str] | None:
    """fuselm.hub, `NAME[:CONFIG]:SPLIT` as `--data hub:` takes it: where the rows came from."""
    spec = _string(ext, "hub", where="fuselm.")
    if spec is None:
        return None
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise _Bad(f"fuselm.hub: expected NAME[:CONFIG]:SPLIT (as --data hub: takes it), got {spec!r}")
    return parts[0], parts[1] if len(parts) == 3 else None, parts[-1]


def _check_choice_row(gold: _Gold, row: dict[str, Any], data_name: str, index: int) -> None:
    """The choices and the right one(s) of a row read when the file is read: an error names the file."""
    try:
        gold(row)
    except _RowError as e:
        raise _Bad(f"{e.key}: {e.what} on row {index} of {data_name}") from None


def _build(path: Path, shown: str, builtin: bool) -> FileTask:
    data = _read_yaml(path, shown)
    _check_keys(data)
    ext = _fuselm_section(data)
    hook = _hook(ext)
    relative_to = ext.get("files_relative_to", "task_file")
    if relative_to not in RELATIVE_TO:
        raise _Bad(f"fuselm.files_relative_to: expected task_file or data_dir, got {relative_to!r}")
    # under the data directory, the files are known only when the task runs: nothing is read now
    under_data_dir = relative_to == "data_dir"
    base = path.parent
    files = _data_files(data, None if under_data_dir else base, hook)
    test = _split(data, "test_split", files)
    validation = _split(data, "validation_split", files)
    training = _split(data, "training_split", files)
    fewshot = _split(data, "fewshot_split", files)
    evaluated = test or validation
    if evaluated is None:
        raise _Bad(f"test_split: missing: name the split to evaluate (data_files has: {', '.join(files)})")
    eval_path, eval_name = files[evaluated]
    dev = validation if test is not None and validation is not None else None
    if dev is not None and files[dev][0] == eval_path:
        dev = None  # the test file itself: calibrate on it with --dev-data test --offset
    n_shots = data.get("num_fewshot") or 0
    if not isinstance(n_shots, int) or isinstance(n_shots, bool) or n_shots < 0:
        raise _Bad(f"num_fewshot: expected a number of examples, got {data.get('num_fewshot')!r}")
    if n_shots and under_data_dir:
        raise _Bad(
            "num_fewshot: examples are rendered when the file is read, and files under the data directory are"
            " read when the task runs: give them as fuselm.prompt_prefix_file"
        )
    # lm-eval's order of few-shot sources: fewshot_split, fewshot_config.samples, the training,
    # validation and test splits
    inline = (data.get("fewshot_config") or {}).get("samples") if fewshot is None else None
    shot_split = None if inline is not None else fewshot or training or validation or evaluated
    target_delimiter = _string(data, "target_delimiter", " ")
    fewshot_delimiter = _string(data, "fewshot_delimiter", "\n\n")
    assert target_delimiter is not None and fewshot_delimiter is not None

    # rows to check the templates on: the first of each named file (the few-shot file's first N + 1)
    samples: dict[Path, tuple[str, list[dict[str, Any]]]] = {}
    for split, (p, name) in ({} if under_data_dir else files).items():
        need = n_shots + 1 if split == shot_split else 1
        if p in samples and len(samples[p][1]) >= need:
            continue
        rows = _first_rows(p, need, f"dataset_kwargs.data_files.{split}", name)
        if not rows:
            raise _Bad(f"dataset_kwargs.data_files.{split}: {name} has no rows")
        samples[p] = (name, rows)
    eval_rows = samples[eval_path][1] if not under_data_dir else []
    columns = list(eval_rows[0]) if eval_rows else None
    mc = data.get("output_type", "generate_until") == "multiple_choice"
    gold_constant = data.get("doc_to_target") if mc else None
    if isinstance(gold_constant, bool) or not isinstance(gold_constant, int):
        gold_constant = None  # (an index for every row: lm-eval allows an integer)
    fields: dict[str, _Field] = {}
    for key in ("doc_to_text", "doc_to_target", "description"):
        if key == "doc_to_target" and gold_constant is not None:
            continue
        source = _string(data, key)
        if key != "description" and source is None:
            raise _Bad(f"{key}: missing (a Jinja template over a row, or a column name)")
        if source:
            fields[key] = _Field.parse(key, source, shown, columns, eval_name)
    choice_source = data.get("doc_to_choice")
    choices: _Choices | None = None
    gold: _Gold | None = None
    if choice_source is not None and not mc:
        raise _Bad("doc_to_choice: read with output_type: multiple_choice only")
    if mc:
        if isinstance(choice_source, str):
            fields["doc_to_choice"] = _Field.parse("doc_to_choice", choice_source, shown, columns, eval_name)
            choices = _Choices(shown, field=fields["doc_to_choice"])
        elif isinstance(choice_source, (list, dict)) and choice_source:
            values = list(choice_source.values()) if isinstance(choice_source, dict) else choice_source
            choices = _Choices(shown, constant=tuple(str(v) for v in values))
        else:
            raise _Bad(
                "doc_to_choice: missing for output_type: multiple_choice (a YAML list, a column holding a list, or a"
                ' template that renders one, e.g. "{{choices.text}}")'
                if choice_source is None
                else f"doc_to_choice: expected a list, a column or a template, got {choice_source!r}"
            )
        gold = _Gold(shown, choices, constant=gold_constant, field=fields.get("doc_to_target"))
        for key in ("generation_kwargs", "filter_list"):
            if key in data:
                raise _Bad(
                    f"{key}: not read with output_type: multiple_choice (its choices are scored, nothing is generated)"
                )
        if "extractor" in ext:
            raise _Bad("fuselm.extractor: not read with output_type: multiple_choice (nothing is generated)")
        if hook is not None:
            raise _Bad(
                "fuselm.hook: not read with output_type: multiple_choice (its choices are scored by eval/choice.py)"
            )
    for name, rows in samples.values():
        for f in fields.values():
            f.check(rows[0], name, 0)
        if gold is not None:
            _check_choice_row(gold, rows[0], name, 0)
    text, description = fields["doc_to_text"], fields.get("description")
    if gold is not None and eval_rows and text.text(eval_rows[0]).strip().isdigit():
        raise _Bad(
            "doc_to_text: renders an index on row 0 of "
            f"{eval_name}: lm-eval's multiple inputs (each choice a context, one continuation) are not read yet"
        )
    target = fields.get("doc_to_target") or _Field("doc_to_target", str(gold_constant), shown, template=None)

    if shot_split is None:
        shot_name, shot_rows = "fewshot_config.samples", inline
    else:
        shot_path, shot_name = files[shot_split]
        shot_rows = samples[shot_path][1] if not under_data_dir else []
    if len(shot_rows) < n_shots:
        raise _Bad(f"num_fewshot: {n_shots} examples asked for, {shot_name} has {len(shot_rows)} rows")
    shots = []
    for i, row in enumerate(shot_rows[: n_shots + 1]):
        for f in (text, target) if gold is None else (f for f in fields.values() if f is not description):
            f.check(row, shot_name, i)
        if gold is not None:
            _check_choice_row(gold, row, shot_name, i)
        answer = _first(target.target(row)) if gold is None else gold.first_text(row)
        shots.append((_content(row), text.text(row) + target_delimiter + answer + fewshot_delimiter))

    file_text, named = None, [str(path.resolve())]
    if not under_data_dir:
        named += sorted({str(p) for p, _ in files.values()})
    prompt_file = ext.get("prompt_prefix_file")
    if prompt_file is not None and not isinstance(prompt_file, str):
        raise _Bad(f"fuselm.prompt_prefix_file: expected a file name, got {prompt_file!r}")
    if prompt_file is not None and not under_data_dir:
        pf = (base / prompt_file).expanduser()
        if not pf.is_file():
            raise _Bad(f"fuselm.prompt_prefix_file: file not found: {prompt_file} (relative to {base})")
        try:
            file_text = pf.read_text(encoding="utf-8").rstrip()
        except (OSError, UnicodeDecodeError) as e:
            raise _Bad(f"fuselm.prompt_prefix_file: cannot read {prompt_file}: {e}") from None
        named.append(str(pf.resolve()))

    to_reference = hook.reference if hook is not None else None

    def target_reference(row: dict[str, Any]) -> str | list[str]:
        """doc_to_target's value, made a reference by the hook where it has a rule (gsm8k's final number)."""
        value = target.target(row)
        if to_reference is None:
            return value
        return [to_reference(v) for v in value] if isinstance(value, list) else to_reference(value)

    if gold is None:
        until, max_tokens = _generation(data, fewshot_delimiter)
        pipelines = _pipelines(data)
        sample, corpus = _metrics(data, pipelines, lambda row: _references(target_reference(row)), hook)
    else:
        until, max_tokens = (), DEFAULT_MAX_GEN_TOKS
        pipelines = [("none", EXTRACTORS["whole"][0])]
        sample, corpus = _choice_metrics(data), {}
    main = ext.get("main_metric") or next(iter([*sample, *corpus]))
    if main not in sample and main not in corpus:
        raise _Bad(f"fuselm.main_metric: {main!r} is not one of its metrics ({', '.join([*sample, *corpus])})")
    chat = ext.get("chat", "raw")
    if chat not in ("raw", "chat", "auto"):
        raise _Bad(f"fuselm.chat: expected raw, chat or auto, got {chat!r}")
    about = _string(ext, "description", "", where="fuselm.") or ""
    marker = _string(ext, "shot_marker", "Question:", where="fuselm.") or "Question:"
    row_id = _string(ext, "row_id", "doc_id", where="fuselm.") or "doc_id"

    prompter = _Prompter(text, target, description, file_text, fewshot_delimiter, n_shots, tuple(shots))
    ending = _ending(until, fewshot_delimiter)
    if gold is None:
        reference: Callable[[dict[str, Any]], Any] = target_reference
        reference_text = lambda row: target_delimiter + _first(target_reference(row)) + ending  # noqa: E731
        if hook is not None and hook.target is not None:
            reference_text = hook.target
    else:
        reference = gold
        reference_text = lambda row: target_delimiter + gold.first_text(row)  # noqa: E731
    # the columns every data row must have: the hook's, and those the templates read that the test file has
    read = [c for f in fields.values() for c in sorted(f.columns) if columns is None or c in columns]
    return FileTask(
        name=data["task"].strip() if builtin else str(path.resolve()),
        description=about,
        fields=tuple(dict.fromkeys([*(hook.fields if hook is not None else ()), *read])),
        build_prompt=prompter.build,
        extract=pipelines[0][1],
        reference=reference,
        metrics=sample,
        corpus_metrics=corpus,
        stop=until,
        max_new_tokens=max_tokens,
        data_file=str(eval_path),
        prompt_file=prompt_file if under_data_dir else None,  # read from the data directory when the task runs
        hub=_hub(ext),
        train_file=str(files[training][0]) if training and files[training][0] != eval_path else None,
        dev_file=str(files[dev][0]) if dev else None,
        main_metric=main,
        chat=chat,
        shot_marker=marker,
        target=reference_text,
        output_type="multiple_choice" if mc else "generate_until",
        choices=choices,
        gold=gold,
        target_delimiter=target_delimiter,
        row_id=row_id,
        task_name=data["task"].strip(),
        source=str(path.resolve()),
        named_files=tuple(dict.fromkeys(named)),
        prompter=prompter,
        builtin=builtin,
    )


_CACHE: dict[tuple[str, bool], tuple[tuple[Any, ...], FileTask]] = {}


def _stamp(files: tuple[str, ...]) -> tuple[Any, ...]:
    out = []
    for f in files:
        try:
            st = Path(f).stat()
            out.append((f, st.st_mtime_ns, st.st_size))
        except OSError:
            out.append((f, None, None))
    return tuple(out)


def load_task_file(ref: str | Path, builtin: bool = False) -> FileTask:
    """The task of a task file (read again only when it or a file it names changed); a one-line
    FuselmError naming the file and the key for anything it cannot read. `builtin`: a file packaged
    with fuselm (`tasks/`), named by its `task:` rather than its path."""
    shown = str(ref)
    path = Path(ref).expanduser()
    if not path.is_file():
        raise FuselmError(f"task file not found: {shown}")
    key = (str(path.resolve()), builtin)
    hit = _CACHE.get(key)
    if hit is not None and hit[0] == _stamp(hit[1].named_files):
        return hit[1]
    try:
        task = _build(path, shown, builtin)
    except _Bad as e:
        raise FuselmError(f"{shown}: {e}") from None
    _CACHE[key] = (_stamp(task.named_files), task)
    return task
