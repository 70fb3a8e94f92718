"""The data layer (moetune.data.sources): every kind of source, columns, prompt and answer
formats, mixtures, streaming, and the errors a user gets.

This machine cannot download: a folder laid out as the hub lays out GSM8K (a README's
`configs`, parquet files per subset and split) goes through the same `datasets.load_dataset`
call as a hub id."""

import json

import datasets
import pytest

from moetune.config.build import RecipeError
from moetune.config.schema import (
    DataSection,
    MixtureEntry,
    PromptSection,
    SFTDataSection,
)
from moetune.data.problems import load_problems, stream_problems
from moetune.data.sft_data import load_sft_datasets
from moetune.data.sources import boxed_answer, gsm8k_answer, load_rows
from moetune.recipes.loader import load_recipe
from moetune.recipes.run import resolve
from moetune.rl.prompt_stream import StreamedPrompts

README = """---
configs:
- config_name: main
  data_files:
  - split: train
    path: main/train-*
  - split: test
    path: main/test-*
- config_name: socratic
  data_files:
  - split: train
    path: socratic/train-*
---
"""


def gsm8k_row(a: int, b: int, subset: str = "main") -> dict:
    total = a * b
    return {
        "question": f"{subset}: {a} boxes of {b} pens. How many pens?",
        "answer": f"{a} * {b} = <<{a}*{b}={total}>>{total}\n#### {total:,}",
    }


@pytest.fixture(scope="module")
def gsm8k(tmp_path_factory):
    """GSM8K's hub layout: subsets main (train 12 rows, test 4) and socratic (train 6)."""
    root = tmp_path_factory.mktemp("hub") / "gsm8k"
    for subset, split, rows in (
        ("main", "train", [gsm8k_row(a, 7 + a) for a in range(12)]),
        ("main", "test", [gsm8k_row(a, 300) for a in range(1, 5)]),
        ("socratic", "train", [gsm8k_row(a, 2, "socratic") for a in range(6)]),
    ):
        (root / subset).mkdir(parents=True, exist_ok=True)
        datasets.Dataset.from_list(rows).to_parquet(
            root / subset / f"{split}-00000-of-00001.parquet"
        )
    (root / "README.md").write_text(README)
    return str(root)


GSM8K = dict(subset="main", columns={"question": "prompt"}, answer_format="gsm8k")


def test_a_hub_layout_subset_and_split_with_columns_and_gold_answers(gsm8k):
    problems = load_problems(DataSection(gsm8k, **GSM8K), "data", "test")
    assert [p["answer"] for p in problems] == ["300", "600", "900", "1200"]  # 1,200 -> 1200
    assert problems[0]["prompt"] == "main: 1 boxes of 300 pens. How many pens?"
    train = load_problems(PromptSection(gsm8k, **GSM8K), "data", "train", limit=5)
    assert [p["answer"] for p in train] == [str(a * (7 + a)) for a in range(5)]
    socratic = load_problems(
        PromptSection(gsm8k, subset="socratic", split="train", columns={"question": "prompt"}),
        "data",
        "test",
    )
    assert len(socratic) == 6 and socratic[0]["answer"].endswith("#### 0")  # answer_format none


def test_unknown_subset_split_and_column_are_named_with_what_there_is(gsm8k):
    with pytest.raises(
        RecipeError,
        match=r"data.subset: 'mian' is not a subset of .*gsm8k; "
        r"it has: main, socratic",
    ):
        load_rows(DataSection(gsm8k, subset="mian"), "data", "test")
    with pytest.raises(
        RecipeError, match=r"data.subset: name a subset of .*; it has: main, socratic"
    ):
        load_rows(DataSection(gsm8k), "data", "test")
    with pytest.raises(
        RecipeError,
        match=r"data.split: 'validation' is not a split of .*gsm8k "
        r"\(main\); it has: train, test",
    ):
        load_rows(DataSection(gsm8k, subset="main", split="validation"), "data", "test")
    with pytest.raises(
        RecipeError,
        match=r"data.columns: .*gsm8k has no column 'problem'; its "
        r"columns: question, answer",
    ):
        load_rows(DataSection(gsm8k, subset="main", columns={"problem": "prompt"}), "data", "test")
    with pytest.raises(
        RecipeError, match="data: rows of .* have no `prompt` column; they have question, answer"
    ):
        load_problems(DataSection(gsm8k, subset="main"), "data", "test")
    with pytest.raises(RecipeError, match="data.source: missing.jsonl: no such file or folder"):
        load_rows(DataSection("missing.jsonl"), "data", "test")


def test_a_gold_answer_that_cannot_be_parsed_names_its_row(tmp_path):
    path = tmp_path / "math.jsonl"
    rows = [{"problem": "1+1", "solution": "so \\boxed{2}"}, {"problem": "x", "solution": "none"}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    spec = DataSection(
        str(path), columns={"problem": "prompt", "solution": "answer"}, answer_format="boxed"
    )
    with pytest.raises(
        RecipeError, match=r"data: row 1 of .*math.jsonl: no boxed answer in 'none'"
    ):
        load_problems(spec, "data", "test")


def test_answer_formats():
    assert gsm8k_answer("48/2 = <<48/2=24>>24\n#### 1,024") == "1024"
    assert gsm8k_answer("no marker 24") is None
    assert boxed_answer(r"first \boxed{1} then \boxed{\frac{a}{b^{2}}} end") == r"\frac{a}{b^{2}}"
    assert boxed_answer(r"\boxed{unclosed") is None and boxed_answer("plain") is None


def test_an_extraction_function_by_reference_and_a_prompt_format(tmp_path):
    (tmp_path / "gold.py").write_text("def last_word(text):\n    return text.split()[-1]\n")
    path = tmp_path / "rows.csv"
    path.write_text("q,a\nseven plus one,it is eight\n")
    spec = DataSection(
        str(path),
        columns={"a": "answer"},
        prompt_format="Q: {q}\nA:",
        answer_format=f"{tmp_path / 'gold.py'}:last_word",
    )
    assert load_problems(spec, "data", "test") == [
        {"q": "seven plus one", "answer": "eight", "prompt": "Q: seven plus one\nA:"}
    ]
    with pytest.raises(RecipeError, match=r"data.prompt_format: \{question\} is not a column"):
        load_rows(DataSection(str(path), prompt_format="{question}"), "data", "test")
    with pytest.raises(RecipeError, match="data.answer_format: 'latex'"):
        load_rows(
            DataSection(str(path), columns={"a": "answer"}, answer_format="latex"), "data", "test"
        )


@pytest.mark.parametrize("suffix", ["jsonl", "json", "parquet", "csv", "arrow"])
def test_every_file_format_and_a_save_to_disk_folder(tmp_path, suffix):
    table = datasets.Dataset.from_list(
        [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(6)]
    )
    path = tmp_path / f"rows.{suffix}"
    if suffix == "arrow":
        table.save_to_disk(tmp_path / "saved")
        path = next((tmp_path / "saved").glob("*.arrow"))
    else:
        {
            "jsonl": lambda: table.to_json(path),
            "json": lambda: path.write_text(json.dumps(table.to_list())),
            "parquet": lambda: table.to_parquet(path),
            "csv": lambda: table.to_csv(path, index=False),
        }[suffix]()
    problems = load_problems(DataSection(str(path)), "data", "test")
    assert [(p["prompt"], str(p["answer"])) for p in problems] == [
        (f"{i}+1=", str(i + 1)) for i in range(6)
    ]
    folder = tmp_path / "dict"
    datasets.DatasetDict({"train": table, "test": table.select(range(2))}).save_to_disk(folder)
    assert len(load_problems(DataSection(str(folder)), "data", "test")) == 2
    with pytest.raises(
        RecipeError, match="data.split: 'dev' is not a split of .*; it has: train, test"
    ):
        load_problems(DataSection(str(folder), split="dev"), "data", "test")


def test_a_mixture_takes_each_sets_share_of_rows_in_their_common_columns(gsm8k, tmp_path):
    local = tmp_path / "extra.jsonl"
    local.write_text(
        "".join(
            json.dumps({"prompt": f"p{i}", "answer": str(i), "level": 1}) + "\n" for i in range(10)
        )
    )
    mixture = [
        MixtureEntry(gsm8k, split="train", **GSM8K, weight=0.5),
        MixtureEntry(str(local), weight=0.3),
    ]
    problems = load_problems(PromptSection(mixture), "data", "train")
    assert len(problems) == 6 + 3 and all(set(p) == {"prompt", "answer"} for p in problems)
    assert sum(p["prompt"].startswith("main:") for p in problems) == 6
    again = load_problems(PromptSection(mixture), "data", "train")
    assert again == problems  # the same rows in the same order for the same seed
    with pytest.raises(RecipeError, match=r"data.source\[1\].weight: 0.0: must be in \(0, 1\]"):
        load_rows(
            PromptSection([mixture[0], MixtureEntry(str(local), weight=0.0)]), "data", "train"
        )
    with pytest.raises(RecipeError, match="data.subset: set it on each data set of the mixture"):
        load_rows(PromptSection(mixture, subset="main"), "data", "train")
    streamed = load_rows(PromptSection(mixture), "data", "train", streaming=True)
    assert isinstance(streamed, datasets.IterableDataset)
    rows = list(streamed)
    assert {r["prompt"][:5] for r in rows} >= {"main:", "p0"}


def test_mixture_entries_and_streaming_come_from_recipe_yaml(gsm8k, tmp_path):
    recipe = load_recipe(
        resolve("grpo/arith_tiny"),
        [
            (
                f"data.source=[{{source: {gsm8k}, subset: main, columns: {{question: prompt}}, "
                "answer_format: gsm8k, weight: 0.5}]"
            ),
            "data.streaming=true",
        ],
    )
    assert recipe.data.source == [
        MixtureEntry(
            gsm8k, subset="main", columns={"question": "prompt"}, answer_format="gsm8k", weight=0.5
        )
    ]
    with pytest.raises(
        RecipeError,
        match=r"unknown key 'data.source\[0\].wieght'; did you mean 'data.source\[0\].weight'",
    ):
        load_recipe(resolve("grpo/arith_tiny"), [f"data.source=[{{source: {gsm8k}, wieght: 1}}]"])


def test_streamed_prompts_shard_reshuffle_and_resume_exactly(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(
        "".join(json.dumps({"prompt": f"p{i}", "answer": str(i)}) + "\n" for i in range(10))
    )
    spec = PromptSection(str(path))
    stream = StreamedPrompts(stream_problems(spec, "data", "train"), seed=3, buffer_size=4)
    first_epoch = [p["prompt"] for p in stream.take(10)]
    assert sorted(first_epoch) == sorted(f"p{i}" for i in range(10))
    taken = [p["prompt"] for p in stream.take(4)]  # epoch 1: another order
    state = stream.state()
    rest = [p["prompt"] for p in stream.take(9)]
    resumed = StreamedPrompts(stream_problems(spec, "data", "train"), seed=3, buffer_size=4)
    resumed.restore(state)
    assert [p["prompt"] for p in resumed.take(9)] == rest
    assert state == {"epoch": 1, "cursor": 4} and taken + rest[:6] != first_epoch
    halves = [
        StreamedPrompts(stream_problems(spec, "data", "train"), 0, rank, 2).take(5)
        for rank in (0, 1)
    ]
    assert sorted(p["prompt"] for half in halves for p in half) == sorted(
        f"p{i}" for i in range(10)
    )


def test_sft_reads_a_hub_layout_with_a_held_out_split_and_streams(gsm8k):
    section = SFTDataSection(
        gsm8k,
        subset="main",
        columns={"question": "prompt", "answer": "completion"},
        eval_split="test",
    )
    train, held_out = load_sft_datasets(section, seed=0)
    assert (len(train), len(held_out)) == (12, 4) and train.column_names == ["prompt", "completion"]
    streamed = SFTDataSection(
        gsm8k,
        subset="main",
        streaming=True,
        limit=5,
        columns={"question": "prompt", "answer": "completion"},
    )
    train, _ = load_sft_datasets(streamed, seed=0)
    assert isinstance(train, datasets.IterableDataset) and len(list(train)) == 5
    with pytest.raises(RecipeError, match="data.eval_fraction: a streamed data set has no length"):
        load_sft_datasets(
            SFTDataSection(gsm8k, subset="main", streaming=True, eval_fraction=0.1), 0
        )
    with pytest.raises(
        RecipeError, match="data: give one of eval_source, eval_split, eval_fraction"
    ):
        load_sft_datasets(SFTDataSection(gsm8k, eval_split="test", eval_fraction=0.1), 0)


def test_an_empty_data_set_fails_before_training(tmp_path):
    path = tmp_path / "empty.parquet"
    datasets.Dataset.from_dict({"prompt": [], "completion": []}).to_parquet(path)
    with pytest.raises(RecipeError, match="data.source: .*empty.parquet: no rows"):
        load_problems(DataSection(str(path)), "data", "test")
    with pytest.raises(RecipeError, match="data.source: .*empty.parquet: no rows"):
        load_sft_datasets(SFTDataSection(str(path)), seed=0)


def test_moetune_eval_of_a_hub_layout_subset_with_columns_and_answer_format(
    gsm8k, tmp_path, capsys
):
    from tiny_configs import v3_config

    from moetune.model import DeepseekV3ForCausalLM
    from moetune.model.char_tokenizer import char_tokenizer
    from moetune.recipes.cli import main

    model = DeepseekV3ForCausalLM(
        v3_config(num_nextn_predict_layers=0, vocab_size=128, eos_token_id=1)
    )
    model.save_pretrained(tmp_path / "model")
    char_tokenizer().save(str(tmp_path / "model" / "tokenizer.json"))
    flags = [
        "eval",
        "--model",
        str(tmp_path / "model"),
        "--data",
        gsm8k,
        "--subset",
        "main",
        "--columns",
        "question:prompt",
        "--answer-format",
        "gsm8k",
        "--reward",
        "math_accuracy",
        "--n",
        "1",
        "--max-new-tokens",
        "3",
        "--output",
        str(tmp_path / "out"),
    ]
    assert main(flags) == 0
    rows = [
        json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()
    ]
    assert [r["prompt"] for r in rows] == [
        f"main: {a} boxes of 300 pens. How many pens?" for a in range(1, 5)
    ]
    assert main([*flags[:5], "--subset", "mian", *flags[7:]]) == 2
    assert "moetune eval: data.subset: 'mian' is not a subset of" in capsys.readouterr().err


def test_num_proc_maps_in_worker_processes_to_the_same_rows(gsm8k):
    one = load_problems(DataSection(gsm8k, **GSM8K), "data", "test")
    two = load_problems(DataSection(gsm8k, **GSM8K, num_proc=2), "data", "test")
    assert two == one
    mixture = DataSection([MixtureEntry(gsm8k, **GSM8K)], num_proc=2)
    mixed = load_problems(mixture, "data", "test")  # shuffled
    assert sorted(mixed, key=lambda p: p["prompt"]) == sorted(one, key=lambda p: p["prompt"])
    with pytest.raises(RecipeError, match=r"^data: num_proc must be at least 1, got 0$"):
        load_recipe(resolve("grpo/arith_tiny"), ["data.num_proc=0"])
