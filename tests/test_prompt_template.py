"""Prompt templates: the same text in SFT, GRPO and eval, and a warning when they differ."""

from moetune.config.schema import TemplateSection
from moetune.data.prompt_template import (
    few_shot_examples,
    render,
    save_template,
    sft_row,
    warn_on_mismatch,
)
from moetune.model.char_tokenizer import char_tokenizer_fast

SHOTS = [
    {"prompt": "Compute: 1+2\nAnswer:", "completion": " 3"},
    {"prompt": "Compute: 5-4\nAnswer:", "completion": " 1"},
]


def test_raw_template_puts_system_and_shots_before_the_prompt():
    template = TemplateSection(system_prompt="Add and subtract.", few_shot=2)
    text = render("Compute: 7+1\nAnswer:", template, None, SHOTS)
    assert text == (
        "Add and subtract.\n\nCompute: 1+2\nAnswer: 3\n\nCompute: 5-4\nAnswer: 1\n\n"
        "Compute: 7+1\nAnswer:"
    )
    row = sft_row({"prompt": "Compute: 7+1\nAnswer:", "completion": " 8"}, template, SHOTS)
    assert row == {"prompt": text, "completion": " 8"}


def test_chat_template_wraps_turns_and_adds_the_generation_prompt():
    template = TemplateSection(chat=True, system_prompt="Be exact.", few_shot=1)
    text = render("7+1", template, char_tokenizer_fast(), SHOTS[:1])
    assert text == (
        "Be exact.\nUser: Compute: 1+2\nAnswer:\nAssistant:  3<|end|>\nUser: 7+1\nAssistant: "
    )
    row = sft_row({"prompt": "7+1", "completion": "8"}, template, SHOTS[:1])
    assert row["prompt"][0] == {"role": "system", "content": "Be exact."}
    assert row["completion"] == [{"role": "assistant", "content": "8"}]


def test_few_shot_examples_come_from_the_train_split():
    shots = few_shot_examples(TemplateSection(few_shot=3), "builtin:arithmetic")
    assert len(shots) == 3 and all(s["completion"].strip().lstrip("-").isdigit() for s in shots)
    assert few_shot_examples(TemplateSection(), "builtin:arithmetic") == []


def test_mismatch_warning_names_the_differing_keys(tmp_path):
    save_template(tmp_path, TemplateSection(chat=True))
    assert warn_on_mismatch(tmp_path, TemplateSection(chat=True)) is None
    message = warn_on_mismatch(tmp_path, TemplateSection(chat=False, few_shot=2))
    assert "chat, few_shot" in message and "trained [True, 0], now [False, 2]" in message
    assert warn_on_mismatch(tmp_path / "untracked", TemplateSection()) is None
