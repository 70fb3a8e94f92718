"""How a problem's `prompt` becomes the text the model sees, the same in SFT, GRPO and eval.

A recipe's `template` section (moetune.config.schema.TemplateSection) picks:
  chat: wrap the prompt as a user turn with the tokenizer's chat template (and the
        generation prompt); otherwise the raw prompt text;
  system_prompt: a system turn (chat) or a leading paragraph (raw);
  few_shot: k solved examples before the prompt (user/assistant turns, or
        prompt + completion paragraphs), taken from `few_shot_source` rows with `prompt` and
        `completion` (for builtin:arithmetic, from its train split).
Training writes the template beside its checkpoint (`moetune_template.json`); evaluating a
checkpoint or adapter with another template logs a warning, since scores then mislead.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from moetune.config.schema import TemplateSection

FILE = "moetune_template.json"
log = logging.getLogger(__name__)


def few_shot_examples(template: TemplateSection, source: str, arithmetic=None) -> list[dict]:
    """The `few_shot` solved examples (prompt + completion) the template prepends."""
    if not template.few_shot:
        return []
    if template.few_shot_source:
        from moetune.config.schema import DatasetSpec
        from moetune.data.problems import load_problems

        rows = load_problems(
            DatasetSpec(template.few_shot_source),
            "template.few_shot_source",
            "train",
            template.few_shot,
        )
    elif source == "builtin:arithmetic":
        from moetune.data.arithmetic import ArithmeticSpec, arithmetic_problems

        rows = arithmetic_problems(
            template.few_shot, arithmetic or ArithmeticSpec(), "train", seed=10_007
        )
    else:
        raise ValueError(
            "template.few_shot: set template.few_shot_source (rows with prompt and "
            "completion) for a data source other than builtin:arithmetic"
        )
    missing = [i for i, row in enumerate(rows) if "completion" not in row]
    if missing:
        raise ValueError(f"template.few_shot_source: rows {missing[:5]} have no `completion`")
    return rows[: template.few_shot]


def messages(prompt: str, template: TemplateSection, shots: list[dict]) -> list[dict]:
    turns = (
        [{"role": "system", "content": template.system_prompt}] if template.system_prompt else []
    )
    for shot in shots:
        turns += [
            {"role": "user", "content": shot["prompt"]},
            {"role": "assistant", "content": shot["completion"]},
        ]
    return turns + [{"role": "user", "content": prompt}]


def render(prompt: str, template: TemplateSection, tokenizer, shots: list[dict]) -> str:
    """The text to generate from (a chat template's generation prompt included)."""
    if template.chat:
        return tokenizer.apply_chat_template(
            messages(prompt, template, shots), tokenize=False, add_generation_prompt=True
        )
    head = f"{template.system_prompt}\n\n" if template.system_prompt else ""
    return head + "".join(f"{s['prompt']}{s['completion']}\n\n" for s in shots) + prompt


def sft_row(row: dict, template: TemplateSection, shots: list[dict]) -> dict:
    """A prompt + completion row as SFT trains on it: conversational under `chat` (TRL
    applies the chat template and trains on the assistant turn), else raw text."""
    if template.chat:
        return {
            "prompt": messages(row["prompt"], template, shots),
            "completion": [{"role": "assistant", "content": row["completion"]}],
        }
    return {"prompt": render(row["prompt"], template, None, shots), "completion": row["completion"]}


def save_template(folder: str | Path, template: TemplateSection) -> None:
    Path(folder, FILE).write_text(json.dumps(dataclasses.asdict(template), indent=2))


def warn_on_mismatch(folder: str | Path, template: TemplateSection) -> str | None:
    """Log (and return) a warning when `folder` was trained with another template."""
    path = Path(folder, FILE)
    if not path.exists():
        return None
    trained = json.loads(path.read_text())
    used = dataclasses.asdict(template)
    differing = sorted(k for k in used if trained.get(k) != used[k])
    if not differing:
        return None
    message = (
        f"{folder} was trained with another prompt template ({', '.join(differing)}: "
        f"trained {[trained.get(k) for k in differing]}, now {[used[k] for k in differing]}); "
        "scores may mislead - set the recipe's template section to match"
    )
    log.warning(message)
    return message
