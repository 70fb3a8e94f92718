"""TRL's reward calling convention: every function is called by keyword as TRL's
GRPOTrainer calls it, and the reward functions TRL ships run unchanged, through `score`,
`moetune reward score` and a GRPO step, giving the values TRL's own call gives."""

import json

import pytest
import trl.rewards
from test_rewards_cli import run_cli

from moetune.rewards import RewardSpec, TrainerState, get_reward, register_reward, score

CONVERSATIONAL_PROMPTS = [[{"role": "user", "content": "What is 1/3 + 0?"}]] * 3
TEXTS = [
    "<think>\nadd nothing\n</think>\nIt is $\\boxed{\\frac{1}{3}}$",
    "<think>\nguess\n</think>\n\\boxed{\\frac{1}{2}}",
    "no reasoning, \\boxed{\\frac{1}{3}}",
]
SOLUTIONS = ["$\\frac{1}{3}$"] * 3


def trl_call(fn, prompts, completions, completion_ids, columns, state):
    """A reward function called exactly as TRL 1.16's GRPOTrainer._calculate_rewards calls it
    (log_extra/log_metric there append to the trainer's tables; here to `logged`)."""
    logged = {"extra": {}, "metrics": {}}
    return fn(
        prompts=prompts,
        completions=completions,
        completion_ids=completion_ids,
        **columns,
        trainer_state=state,
        log_extra=lambda column, values: logged["extra"].setdefault(column, []).extend(values),
        log_metric=lambda name, value: logged["metrics"].setdefault(name, []).append(value),
    ), logged


def as_messages(texts):
    return [[{"role": "assistant", "content": text}] for text in texts]


@pytest.mark.parametrize(
    "name", ["think_format_reward", "accuracy_reward", "reasoning_accuracy_reward"]
)
def test_trl_text_rewards_on_conversational_rows_equal_trls_call(name):
    fn = getattr(trl.rewards, name)
    ids = [[1, 2, 3]] * 3
    state = TrainerState(global_step=4, max_steps=10, epoch=0.5)
    expected, logged = trl_call(
        fn, CONVERSATIONAL_PROMPTS, as_messages(TEXTS), ids, {"solution": SOLUTIONS}, state
    )
    result = score(
        [RewardSpec(f"trl.rewards:{name}")],
        CONVERSATIONAL_PROMPTS,
        TEXTS,
        {"solution": SOLUTIONS},
        completion_ids=ids,
        trainer_state=state,
    )
    assert result.values[f"trl.rewards:{name}"] == expected
    assert result.extra == logged["extra"] and result.metrics == logged["metrics"]
    assert set(expected) != {expected[0]}  # the rows tell right from wrong


def test_trl_factories_on_standard_rows_equal_trls_call():
    """`get_*` factories take only options: moetune builds the reward from them."""
    ids = [[1, 2], [1, 2, 1, 2, 1, 2], [4] * 7, list(range(9))]  # repeats; 2 to 9 tokens
    prompts, texts = ["p"] * 4, ["a b a b a b", "x y z", "q", "w w w w"]
    for factory, options in (
        (
            trl.rewards.get_soft_overlong_punishment,
            {"max_completion_len": 8, "soft_punish_cache": 4},
        ),
        (trl.rewards.get_repetition_penalty_reward, {"ngram_size": 2, "max_penalty": -1.0}),
    ):
        expected, _ = trl_call(factory(**options), prompts, texts, ids, {}, TrainerState())
        name = f"trl.rewards:{factory.__name__}"
        result = score([RewardSpec(name, kwargs=options)], prompts, texts, completion_ids=ids)
        assert result.values[name] == pytest.approx(expected)
        assert len(set(expected)) > 1, name
    with pytest.raises(TypeError, match="needs the option 'max_completion_len'"):
        get_reward("trl.rewards:get_soft_overlong_punishment", soft_punish_cache=4)


def test_every_argument_arrives_by_keyword():
    seen = {}

    @register_reward("test_keyword_only")
    def keyword_only(
        answer, log_extra, completions, *, log_metric, trainer_state, prompts, completion_ids
    ):  # an order only keyword calls get right
        seen.update(
            prompts=prompts,
            completions=completions,
            ids=completion_ids,
            answer=answer,
            step=trainer_state.global_step,
        )
        log_metric("mean_length", sum(map(len, completions)) / len(completions))
        log_extra("length", [len(c) for c in completions])
        return [1.0] * len(completions)

    result = score(
        [RewardSpec("test_keyword_only")],
        ["p0", "p1"],
        ["a", "bcd"],
        {"answer": ["1", "2"]},
        completion_ids=[[5], [6, 7]],
        trainer_state=TrainerState(global_step=3),
    )
    assert seen == {
        "prompts": ["p0", "p1"],
        "completions": ["a", "bcd"],
        "ids": [[5], [6, 7]],
        "answer": ["1", "2"],
        "step": 3,
    }
    assert result.metrics == {"mean_length": [2.0]} and result.extra == {"length": [1, 3]}


def test_sample_by_sample_retry_keeps_logged_columns_aligned():
    @register_reward("test_logs_then_fails_on_b")
    def logs_then_fails(completions, log_extra):
        log_extra("first_char", [c[0] for c in completions])
        if "b" in completions:
            raise ValueError("no b")
        return [1.0] * len(completions)

    result = score(
        [RewardSpec("test_logs_then_fails_on_b", on_error="zero")], ["", "", ""], ["a", "b", "c"]
    )
    assert result.values["test_logs_then_fails_on_b"] == [1.0, 0.0, 1.0]
    assert result.extra == {"first_char": ["a", "b", "c"]}


def test_builtins_take_conversational_rows():
    plain = score(
        [RewardSpec("math_accuracy"), RewardSpec("format")], ["q"] * 3, TEXTS, {"answer": SOLUTIONS}
    )
    chat = score(
        [RewardSpec("math_accuracy"), RewardSpec("format")],
        CONVERSATIONAL_PROMPTS,
        TEXTS,
        {"answer": SOLUTIONS},
    )
    assert chat.values == plain.values
    assert plain.values["math_accuracy"] == [1.0, 0.0, 1.0]


def test_cli_runs_trl_rewards_unchanged(tmp_path, capsys):
    rows = [
        {"prompt": prompt, "completion": text, "solution": solution, "completion_ids": [1] * k}
        for prompt, text, solution, k in zip(CONVERSATIONAL_PROMPTS, TEXTS, SOLUTIONS, (3, 7, 9))
    ]
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    overlong = "trl.rewards:get_soft_overlong_punishment"
    argv = [
        "reward",
        "score",
        "--reward",
        f"trl.rewards:think_format_reward,{overlong}",
        "--options",
        json.dumps({overlong: {"max_completion_len": 8, "soft_punish_cache": 4}}),
        "--input",
        str(source),
        "--output",
        str(target),
    ]
    assert run_cli(argv) == 0
    scored = [json.loads(line)["rewards"] for line in target.read_text().splitlines()]
    assert scored == [
        {"trl.rewards:think_format_reward": 1.0, overlong: 0.0},
        {"trl.rewards:think_format_reward": 1.0, overlong: -0.75},
        {"trl.rewards:think_format_reward": 0.0, overlong: -1.0},
    ]
    bad = argv[:4] + ["--options", json.dumps({"math_acuracy": {}})] + argv[6:]
    assert run_cli(bad) == 2
    assert "--options names math_acuracy, not among --reward" in capsys.readouterr().err
    assert run_cli(["reward", "score", "--reward", overlong, *argv[6:]]) == 2
    assert "needs the option 'max_completion_len'" in capsys.readouterr().err


def test_a_function_written_for_positional_calls_fails_before_scoring():
    """`fn(p, c, **columns)` cannot receive keyword calls: one clear error, whatever on_error
    says, never a batch silently scored 0."""

    @register_reward("test_positional_names")
    def positional(p, c, **columns):
        return [1.0] * len(c)

    from moetune.rewards import RewardError

    with pytest.raises(
        RewardError,
        match=r"'test_positional_names' takes p, c, which no call "
        r"gives it: reward functions are called by keyword",
    ):
        score([RewardSpec("test_positional_names", on_error="zero")], ["q"], ["a"])


def test_factories_are_built_once_and_extra_columns_do_not_collide():
    built = []

    def counting_factory(scale: float):
        built.append(scale)
        return lambda completions, log_extra, **kwargs: (
            log_extra("length", [len(c) for c in completions]) or [scale] * len(completions)
        )

    register_reward("test_counting_factory")(counting_factory)
    spec = RewardSpec("test_counting_factory", kwargs={"scale": 2.0})
    for _ in range(3):
        assert score([spec], ["q"], ["abc"]).values["test_counting_factory"] == [2.0]
    assert built == [2.0]  # as TRL builds its reward functions once

    @register_reward("test_also_logs_length")
    def also_logs_length(completions, log_extra):
        log_extra("length", [0] * len(completions))
        return [0.0] * len(completions)

    from moetune.rewards import RewardError

    with pytest.raises(RewardError, match="logs the extra column 'length', which another"):
        score([spec, RewardSpec("test_also_logs_length")], ["q"], ["abc"])
