"""A recipe's `data` section -> `datasets.Dataset`s for SFT (train and optional eval split).

Sources: `builtin:arithmetic` (generated, with the recipe's difficulty knobs), a local
.jsonl/.json/.parquet/.csv file, or a folder written by `Dataset.save_to_disk`. Rows must
hold one of TRL's formats: `prompt` + `completion`, `messages` (chat), or `text`. Only
those columns are kept.
"""

from __future__ import annotations

from pathlib import Path

from moetune.config.build import RecipeError
from moetune.config.schema import SFTDataSection

FORMATS = (("prompt", "completion"), ("messages",), ("text",))
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def load_sft_datasets(section: SFTDataSection, seed: int):
    """(train, eval or None). The eval split is `eval_source`, or `eval_fraction` of the
    rows drawn from `source` with `seed`."""
    train = read_source(section.source, section, "data.source")
    if section.limit:
        train = train.select(range(min(section.limit, len(train))))
    evaluation = None
    if section.eval_source:
        evaluation = read_source(section.eval_source, section, "data.eval_source", split="test")
    elif section.eval_fraction:
        if not 0 < section.eval_fraction < 1:
            raise RecipeError(f"data.eval_fraction: {section.eval_fraction} must be in (0, 1)")
        parts = train.train_test_split(test_size=section.eval_fraction, seed=seed)
        train, evaluation = parts["train"], parts["test"]
    return train, evaluation


def read_source(source: str, section: SFTDataSection, key: str, split: str = "train"):
    import datasets

    if source == "builtin:arithmetic":
        from moetune.data.arithmetic import arithmetic_problems

        try:
            spec = arithmetic_spec(section.arithmetic)
            count = section.arithmetic.count
            rows = arithmetic_problems(count if split == "train" else max(count // 10, 1), spec, split)
        except ValueError as error:
            raise RecipeError(f"data.arithmetic: {error}") from None
        dataset = datasets.Dataset.from_list(rows)
    elif source.startswith("builtin:"):
        raise RecipeError(f"{key}: unknown built-in data set {source!r} (builtin:arithmetic)")
    else:
        path = Path(source)
        if not path.exists():
            raise RecipeError(f"{key}: {source}: no such file or folder")
        if path.is_dir():
            dataset = datasets.load_from_disk(str(path))
            if isinstance(dataset, datasets.DatasetDict):
                dataset = dataset[split] if split in dataset else dataset["train"]
        elif path.suffix in FILE_BUILDERS:
            dataset = datasets.load_dataset(FILE_BUILDERS[path.suffix], data_files=str(path),
                                            split="train")
        else:
            raise RecipeError(f"{key}: {source}: expected .jsonl, .json, .parquet, .csv or a "
                              "save_to_disk folder")
    return keep_format_columns(dataset, key)


def arithmetic_spec(section):
    """The ArithmeticSpec of a recipe's `data.arithmetic` knobs."""
    from moetune.data.arithmetic import ArithmeticSpec

    return ArithmeticSpec(section.digits, section.terms, section.operations, section.test_fraction,
                          section.style, section.sign_slip)


def keep_format_columns(dataset, key: str):
    for columns in FORMATS:
        if all(c in dataset.column_names for c in columns):
            return dataset.select_columns(list(columns))
    raise RecipeError(f"{key}: rows have columns {dataset.column_names}; expected prompt + "
                      "completion, messages, or text")
