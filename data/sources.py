"""One loader for every data set that SFT, GRPO and eval read (a recipe's DatasetSpec).

`load_rows(spec, key, default_split, ...)` returns a `datasets.Dataset` (an
`IterableDataset` when streaming) whatever the source:
  - a hub data set id, with `subset` (config name), `split` and `revision`;
  - a folder laid out as on the hub (parquet or json files, a README's `configs`): the same
    `datasets.load_dataset` call as a hub id, so it is how the tests stand in for the hub;
  - a folder written by `save_to_disk`, or a local .jsonl/.json/.parquet/.csv/.arrow file;
  - `builtin:arithmetic` (generated with the recipe's knobs) or `builtin:humaneval`;
  - a list of these with weights, a mixture (open-r1's dataset_mixture).
Then every row passes `columns` (the set's names -> ours), `prompt_format` (builds `prompt`)
and `answer_format` (takes the gold out of `answer`), as `datasets` maps: cached, lazy when
streaming. Errors are RecipeErrors naming the recipe key, the data set and what it has.
"""

from __future__ import annotations

import math
import string
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from moetune.config.build import RecipeError
from moetune.config.references import UnresolvedReference, is_reference, load_reference
from moetune.config.schema import ArithmeticSection, DatasetSpec, MixtureEntry

FILE_BUILDERS = {
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".arrow": "arrow",
}
BUILTINS = ("builtin:arithmetic", "builtin:humaneval")


def load_rows(
    spec: DatasetSpec,
    key: str,
    default_split: str,
    *,
    seed: int = 0,
    streaming: bool = False,
    count: int = 100,
    arithmetic: ArithmeticSection | None = None,
):
    """The rows of `spec` (its `source` one data set or a list of MixtureEntry), `split` or
    else `default_split`. `count`: rows a builtin set generates; `key`: the spec's recipe key
    (e.g. "data"), named in errors."""
    if isinstance(spec.source, list):
        for name in ("subset", "split", "revision", "prompt_format"):
            if getattr(spec, name) is not None:
                raise RecipeError(
                    f"{key}.{name}: set it on each data set of the mixture {key}.source"
                )
        if spec.columns or spec.answer_format != "none":
            raise RecipeError(
                f"{key}.{'columns' if spec.columns else 'answer_format'}: set it on "
                f"each data set of the mixture {key}.source"
            )
        entries = [
            entry if entry.num_proc is not None else replace(entry, num_proc=spec.num_proc)
            for entry in spec.source
        ]
        return load_mixture(
            entries, f"{key}.source", default_split, seed, streaming, count, arithmetic
        )
    return load_one(spec, key, default_split, streaming, count, arithmetic, seed)


def with_split(spec: DatasetSpec, split: str | None) -> DatasetSpec:
    """`spec` reading `split`: of its one data set, or of each data set of its mixture."""
    if isinstance(spec.source, list):
        return replace(spec, source=[replace(entry, split=split) for entry in spec.source])
    return replace(spec, split=split)


def load_one(
    spec: DatasetSpec,
    key: str,
    default_split: str,
    streaming: bool,
    count: int,
    arithmetic: ArithmeticSection | None,
    seed: int = 0,
):
    """One data set with its columns, prompt and answer formats applied."""
    dataset = open_source(spec, key, default_split, streaming, count, arithmetic, seed)
    names = column_names(dataset)
    missing = [name for name in spec.columns if name not in names]
    if missing:
        raise RecipeError(
            f"{key}.columns: {spec.source} has no column {missing[0]!r}; its "
            f"columns: {', '.join(names)}"
        )
    clashes = [
        ours
        for theirs, ours in spec.columns.items()
        if ours in names and ours != theirs and ours not in spec.columns
    ]
    if clashes:
        raise RecipeError(
            f"{key}.columns: {spec.source} already has a column {clashes[0]!r}; "
            f"map that one too (e.g. {clashes[0]}: original_{clashes[0]})"
        )
    # `datasets` maps a Dataset in num_proc worker processes; an IterableDataset lazily, in one.
    streamed = not hasattr(dataset, "__len__")
    processes = {} if streamed or spec.num_proc is None else {"num_proc": spec.num_proc}
    if spec.columns:
        dataset = dataset.rename_columns(dict(spec.columns))
        names = column_names(dataset)
    if spec.prompt_format is not None:
        fields = [f for _, f, _, _ in string.Formatter().parse(spec.prompt_format) if f]
        unknown = [f for f in fields if f not in names]
        if unknown:
            raise RecipeError(
                f"{key}.prompt_format: {{{unknown[0]}}} is not a column of "
                f"{spec.source} (after columns); it has: {', '.join(names)}"
            )
        template = spec.prompt_format
        dataset = dataset.map(lambda row: {"prompt": template.format(**row)}, **processes)
    if spec.answer_format != "none":
        if "answer" not in names:
            raise RecipeError(
                f"{key}.answer_format: {spec.source} has no `answer` column (map one "
                f"with {key}.columns); its columns: {', '.join(names)}"
            )
        extract = answer_extractor(spec.answer_format, f"{key}.answer_format")
        dataset = dataset.map(GoldAnswer(extract, spec, key), with_indices=True, **processes)
    return dataset


class GoldAnswer:
    """A map over rows: `answer` -> the gold answer `extract` finds in it (a RecipeError
    naming the row where there is none). A class, so `datasets` can fingerprint and cache it."""

    def __init__(self, extract: Callable[[str], str | None], spec: DatasetSpec, key: str):
        self.extract, self.source, self.key, self.format = (
            extract,
            spec.source,
            key,
            spec.answer_format,
        )

    def __call__(self, row: dict, index: int) -> dict:
        gold = self.extract(str(row["answer"]))
        if not gold:
            raise RecipeError(
                f"{self.key}: row {index} of {self.source}: no {self.format} answer "
                f"in {str(row['answer'])[-80:]!r}"
            )
        return {"answer": gold}


def gsm8k_answer(text: str) -> str | None:
    """GSM8K's gold: what follows the last `####`, without thousands separators."""
    if "####" not in text:
        return None
    return text.rsplit("####", 1)[1].strip().replace(",", "") or None


def boxed_answer(text: str) -> str | None:
    r"""MATH's gold: the contents of the last \boxed{...} (nested braces kept)."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for i in range(begin, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth < 0:
            return text[begin:i].strip() or None
    return None


ANSWER_FORMATS = {"gsm8k": gsm8k_answer, "boxed": boxed_answer}


def answer_extractor(name: str, key: str) -> Callable[[str], str | None]:
    if name in ANSWER_FORMATS:
        return ANSWER_FORMATS[name]
    if is_reference(name):
        try:
            return load_reference(name, "answer_format")
        except UnresolvedReference as error:
            raise RecipeError(f"{key}: {error}") from None
    raise RecipeError(
        f"{key}: {name!r}: expected none, {', '.join(ANSWER_FORMATS)}, or a "
        "function as package.module:function or file.py:function"
    )


def open_source(
    spec: DatasetSpec,
    key: str,
    default_split: str,
    streaming: bool,
    count: int,
    arithmetic: ArithmeticSection | None,
    seed: int,
):
    """The data set `spec.source` names, before any column work."""
    import datasets

    source, split = spec.source, spec.split or default_split
    if source.startswith("builtin:"):
        rows = builtin_rows(source, split, count, seed, arithmetic, key)
        dataset = datasets.Dataset.from_list(rows)
        return dataset.to_iterable_dataset() if streaming else dataset
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix not in FILE_BUILDERS:
            raise RecipeError(
                f"{key}.source: {source}: expected a "
                f"{', '.join(FILE_BUILDERS)} file, a folder or a hub data set id"
            )
        if spec.subset or spec.split:
            raise RecipeError(
                f"{key}.{'subset' if spec.subset else 'split'}: {source} is one "
                "file, one split; name another file for other rows"
            )
        try:
            return datasets.load_dataset(
                FILE_BUILDERS[path.suffix], data_files=str(path), split="train", streaming=streaming
            )
        except ValueError as error:  # e.g. 'Instruction "train" corresponds to no data'
            raise RecipeError(f"{key}.source: {source}: no rows ({error})") from None
    if path.is_dir() and saved_to_disk(path):
        dataset = datasets.load_from_disk(str(path))
        if isinstance(dataset, datasets.DatasetDict):
            if split not in dataset:
                raise RecipeError(
                    f"{key}.split: {split!r} is not a split of {source}; it has: "
                    f"{', '.join(dataset)}"
                )
            dataset = dataset[split]
        return dataset.to_iterable_dataset() if streaming else dataset
    if names_a_missing_path(source):
        raise RecipeError(f"{key}.source: {source}: no such file or folder")
    return load_hub_layout(spec, key, split, streaming)


def load_hub_layout(spec: DatasetSpec, key: str, split: str, streaming: bool):
    """A hub data set id or a folder laid out as the hub lays sets out."""
    import datasets

    source = spec.source
    try:
        return datasets.load_dataset(
            source, name=spec.subset, split=split, revision=spec.revision, streaming=streaming
        )
    except ValueError as error:
        message = str(error)
        if "BuilderConfig" in message or "Config name is missing" in message:
            subsets = datasets.get_dataset_config_names(source, revision=spec.revision)
            what = f"{spec.subset!r} is not a subset of" if spec.subset else "name a subset of"
            raise RecipeError(
                f"{key}.subset: {what} {source}; it has: {', '.join(subsets)}"
            ) from None
        if "Unknown split" in message:
            splits = datasets.get_dataset_split_names(source, spec.subset, revision=spec.revision)
            of = f"{source} ({spec.subset})" if spec.subset else source
            raise RecipeError(
                f"{key}.split: {split!r} is not a split of {of}; it has: {', '.join(splits)}"
            ) from None
        raise RecipeError(f"{key}.source: {source}: {message}") from None
    except (FileNotFoundError, ConnectionError, datasets.exceptions.DatasetNotFoundError) as error:
        raise RecipeError(
            f"{key}.source: {source}: not a local file or folder, and no data set "
            f"the hub gives ({type(error).__name__}: {error})"
        ) from None


def names_a_missing_path(source: str) -> bool:
    """Whether `source` reads as a local path (a file suffix, or /, ., ~ first) that is not
    there, rather than as a hub data set id."""
    path = Path(source).expanduser()
    looks_local = path.suffix in FILE_BUILDERS or source.startswith(("/", ".", "~"))
    return looks_local and not path.exists()


def local_sources(spec: DatasetSpec) -> list[str]:
    """The sources of `spec` (one, or each of a mixture) that are not builtin sets."""
    sources = [e.source for e in spec.source] if isinstance(spec.source, list) else [spec.source]
    return [source for source in sources if not source.startswith("builtin:")]


def saved_to_disk(folder: Path) -> bool:
    return (folder / "dataset_dict.json").exists() or (folder / "state.json").exists()


def builtin_rows(
    source: str, split: str, count: int, seed: int, arithmetic: ArithmeticSection | None, key: str
) -> list[dict]:
    if source == "builtin:arithmetic":
        from moetune.data.arithmetic import arithmetic_problems, arithmetic_spec

        try:
            return arithmetic_problems(
                count, arithmetic_spec(arithmetic or ArithmeticSection()), split=split, seed=seed
            )
        except ValueError as error:
            raise RecipeError(f"{key}.arithmetic: {error}") from None
    if source == "builtin:humaneval":
        from moetune.data.problems import humaneval_problems

        return humaneval_problems()
    raise RecipeError(f"{key}.source: unknown built-in data set {source!r} ({', '.join(BUILTINS)})")


def load_mixture(
    entries: list[MixtureEntry],
    key: str,
    default_split: str,
    seed: int,
    streaming: bool,
    count: int,
    arithmetic: ArithmeticSection | None,
):
    """Each data set's `weight` share of its rows (streamed: sampled with probability
    proportional to weight), in the columns all of them have, shuffled with `seed`."""
    import datasets

    if not entries:
        raise RecipeError(f"{key}: an empty mixture; give at least one data set")
    for i, entry in enumerate(entries):
        if not (entry.weight > 0 and (streaming or entry.weight <= 1)) or math.isnan(entry.weight):
            raise RecipeError(
                f"{key}[{i}].weight: {entry.weight}: must be in (0, 1]"
                + (" (or > 0, streamed)" if not streaming else "")
            )
    parts = [
        load_one(entry, f"{key}[{i}]", default_split, streaming, count, arithmetic, seed)
        for i, entry in enumerate(entries)
    ]
    common = [c for c in column_names(parts[0]) if all(c in column_names(p) for p in parts[1:])]
    if "prompt" not in common and "messages" not in common and "text" not in common:
        raise RecipeError(
            f"{key}: its data sets share only the columns {common}; map each one's "
            "prompt (or messages, text) with its `columns`"
        )
    parts = [part.select_columns(common) for part in parts]
    try:
        if streaming:
            total = sum(entry.weight for entry in entries)
            return datasets.interleave_datasets(
                parts,
                probabilities=[entry.weight / total for entry in entries],
                seed=seed,
                stopping_strategy="all_exhausted",
            )
        parts = [
            part.shuffle(seed=seed).select(range(round(len(part) * entry.weight)))
            for part, entry in zip(parts, entries)
        ]
        return datasets.concatenate_datasets(parts).shuffle(seed=seed)
    except ValueError as error:  # columns of different types
        kinds = "; ".join(f"[{i}]: {dict(part.features)}" for i, part in enumerate(parts))
        raise RecipeError(
            f"{key}: its data sets do not line up ({error}); column types {kinds}"
        ) from None


def column_names(dataset) -> list[str]:
    """Column names, also for a streamed set whose features are not known up front."""
    if dataset.column_names is not None:
        return list(dataset.column_names)
    return list(next(iter(dataset)).keys())


def require_rows(dataset, key: str, source) -> None:
    """A RecipeError when a loaded, in-memory data set has no rows."""
    if hasattr(dataset, "__len__") and len(dataset) == 0:
        raise RecipeError(f"{key}: {source}: no rows (after split, limit and filters)")
