"""A recipe's SFT `data` section -> `datasets` for training and an optional eval split.

Any source the data layer reads (moetune.data.sources: hub ids, folders, files, builtin
sets, mixtures). Rows must hold one of TRL's formats, after `columns`: `prompt` +
`completion`, `messages` (chat), or `text`; only those columns are kept.
"""

from __future__ import annotations

from dataclasses import replace

from moetune.config.build import RecipeError
from moetune.config.schema import SFTDataSection
from moetune.data.sources import column_names, load_rows, require_rows, with_split

FORMATS = (("prompt", "completion"), ("messages",), ("text",))


def load_sft_datasets(section: SFTDataSection, seed: int):
    """(train, eval or None). The eval rows are `eval_source` (its test split), the
    `eval_split` of `source`, or `eval_fraction` of the training rows drawn with `seed`.
    Streamed (`streaming`), train is an IterableDataset."""
    held_out = [key for key in ("eval_source", "eval_split") if getattr(section, key)]
    if len(held_out) + bool(section.eval_fraction) > 1:
        raise RecipeError(
            f"data: give one of eval_source, eval_split, eval_fraction "
            f"(got {', '.join(held_out + ['eval_fraction'] * bool(section.eval_fraction))})"
        )
    if section.streaming and section.eval_fraction:
        raise RecipeError(
            "data.eval_fraction: a streamed data set has no length to split; give "
            "data.eval_split or data.eval_source"
        )
    count = section.arithmetic.count
    train = sft_rows(section, "data.source", "train", count, section.streaming)
    if section.limit:
        train = (
            train.take(section.limit)
            if section.streaming
            else train.select(range(min(section.limit, len(train))))
        )
    require_rows(train, "data", section.source)
    evaluation = None
    if section.eval_source:
        other = replace(section, source=section.eval_source, subset=None, split=None, revision=None)
        evaluation = sft_rows(other, "data.eval_source", "test", max(count // 10, 1), False)
    elif section.eval_split:
        evaluation = sft_rows(
            with_split(section, section.eval_split),
            "data.eval_split",
            section.eval_split,
            max(count // 10, 1),
            False,
        )
    elif section.eval_fraction:
        if not 0 < section.eval_fraction < 1:
            raise RecipeError(f"data.eval_fraction: {section.eval_fraction} must be in (0, 1)")
        parts = train.train_test_split(test_size=section.eval_fraction, seed=seed)
        train, evaluation = parts["train"], parts["test"]
    if evaluation is not None:
        require_rows(evaluation, "data", "the eval rows")
    return train, evaluation


def sft_rows(section: SFTDataSection, key: str, split: str, count: int, streaming: bool):
    dataset = load_rows(
        section, "data", split, streaming=streaming, count=count, arithmetic=section.arithmetic
    )
    names = column_names(dataset)
    for columns in FORMATS:
        if all(c in names for c in columns):
            return dataset.select_columns(list(columns))
    raise RecipeError(
        f"{key}: rows of {section.source} have columns {names}; expected prompt + "
        "completion, messages, or text (map yours with data.columns)"
    )
