"""The plugin API: where reward functions come from, how score() combines them, and how it
fails."""

import asyncio
import sys
import textwrap
import time

import pytest

from moetune.rewards import (
    RewardError,
    RewardNotFound,
    RewardSpec,
    available_rewards,
    get_reward,
    register_reward,
    report_timeout,
    score,
    score_async,
)

PROMPTS = ["p0", "p1", "p2", "p3"]
COMPLETIONS = ["a", "bb", "ccc", "dddd"]


@register_reward("test_length")
def length_reward(prompts, completions, scale=1.0):
    return [scale * len(c) for c in completions]


@register_reward("test_fails_on_ccc")
def fails_on_ccc(prompts, completions, **columns):
    if "ccc" in completions:
        raise ZeroDivisionError("no ccc, please")
    return [1.0] * len(completions)


def test_decorator_registration_and_bound_options():
    assert "test_length" in available_rewards()
    assert get_reward("test_length", scale=2.0)([], ["ab"]) == [4.0]
    with pytest.raises(ValueError, match="already registered by .*length_reward"):
        register_reward("test_length")(lambda prompts, completions: [])


def test_unknown_names_and_options_say_what_to_do():
    with pytest.raises(RewardNotFound, match="Did you mean 'math_accuracy'"):
        get_reward("math_acuracy")
    with pytest.raises(TypeError, match="no option 'timeout'; did you mean 'timeout_s'"):
        get_reward("math_accuracy", timeout=3)
    with pytest.raises(TypeError, match="'soft_overlong' needs the option 'max_length'"):
        get_reward("soft_overlong", cache_length=4)


def test_entry_point_of_an_installed_package(tmp_path, monkeypatch):
    package = tmp_path / "moetune_plugin_demo"
    package.mkdir()
    (package / "__init__.py").write_text(
        "def shout(prompts, completions, **columns):\n"
        "    return [float(c.isupper()) for c in completions]\n"
    )
    dist_info = tmp_path / "moetune_plugin_demo-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: moetune-plugin-demo\nVersion: 0.1\n"
    )
    (dist_info / "entry_points.txt").write_text(
        "[moetune.rewards]\nplugin_shout = moetune_plugin_demo:shout\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "plugin_shout" in available_rewards()
    result = score([RewardSpec("plugin_shout")], ["", ""], ["LOUD", "quiet"])
    assert result.values == {"plugin_shout": [1.0, 0.0]}


def test_file_and_module_references(tmp_path, monkeypatch):
    source = textwrap.dedent("""
        def starts_with(prompts, completions, prefix="x"):
            return [float(c.startswith(prefix)) for c in completions]
    """)
    (tmp_path / "my_rewards.py").write_text(source)
    (tmp_path / "moetune_ref_pkg").mkdir()
    (tmp_path / "moetune_ref_pkg" / "__init__.py").write_text("")
    (tmp_path / "moetune_ref_pkg" / "checks.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    for reference in (
        "my_rewards.py:starts_with",
        f"{tmp_path}/my_rewards.py:starts_with",
        "moetune_ref_pkg.checks:starts_with",
    ):
        assert get_reward(reference, prefix="y")([], ["yes", "no"]) == [1.0, 0.0]
    # loaded once, and registered in sys.modules so its functions pickle by reference
    assert get_reward("my_rewards.py:starts_with") is get_reward(
        f"{tmp_path}/my_rewards.py:starts_with"
    )
    assert get_reward("my_rewards.py:starts_with").__module__ in sys.modules
    with pytest.raises(RewardNotFound, match="has no function 'missing'"):
        get_reward("my_rewards.py:missing")
    with pytest.raises(RewardNotFound, match="does not exist"):
        get_reward("nowhere.py:f")


def test_weighted_totals_leave_out_none():
    @register_reward("test_even_only")
    def even_only(prompts, completions):
        return [1.0 if len(c) % 2 == 0 else None for c in completions]

    specs = [RewardSpec("test_length", weight=0.5), RewardSpec("test_even_only", weight=2.0)]
    result = score(specs, PROMPTS, COMPLETIONS)
    assert result.values["test_even_only"] == [None, 1.0, None, 1.0]
    assert result.totals == [0.5, 3.0, 1.5, 4.0]
    assert result.errors == {"test_length": 0, "test_even_only": 0}


def test_columns_reach_the_functions_that_take_them():
    seen = {}

    @register_reward("test_wants_answer")
    def wants_answer(prompts, completions, answer):
        seen["named"] = answer
        return [0.0] * len(completions)

    @register_reward("test_takes_everything")
    def takes_everything(prompts, completions, **columns):
        seen["all"] = sorted(columns)
        return [0.0] * len(completions)

    columns = {"answer": ["1", "2", "3", "4"], "level": [1, 2, 3, 4]}
    score(
        [RewardSpec("test_wants_answer"), RewardSpec("test_takes_everything")],
        PROMPTS,
        COMPLETIONS,
        columns,
    )
    # **columns takes everything TRL's trainer passes besides prompts and completions
    assert seen == {
        "named": ["1", "2", "3", "4"],
        "all": ["answer", "level", "log_extra", "log_metric", "trainer_state"],
    }
    with pytest.raises(ValueError, match="'level' has 1 rows for 4 completions"):
        score([RewardSpec("test_length")], PROMPTS, COMPLETIONS, {"level": [1]})


def test_a_raising_reward_names_itself_and_the_sample():
    with pytest.raises(
        RewardError,
        match=r"'test_fails_on_ccc' failed on sample 2: "
        r"ZeroDivisionError: no ccc, please",
    ):
        score([RewardSpec("test_fails_on_ccc")], PROMPTS, COMPLETIONS)


def test_on_error_zero_scores_only_the_failing_samples_zero(caplog):
    spec = RewardSpec("test_fails_on_ccc", on_error="zero")
    result = score([spec, RewardSpec("test_length")], PROMPTS, COMPLETIONS)
    assert result.values["test_fails_on_ccc"] == [1.0, 1.0, 0.0, 1.0]
    assert result.errors == {"test_fails_on_ccc": 1, "test_length": 0}
    assert result.totals == [2.0, 3.0, 3.0, 5.0]
    assert "failed on sample 2" in caplog.text


def test_wrong_number_of_values_names_the_function():
    @register_reward("test_too_few")
    def too_few(prompts, completions):
        return [1.0] * (len(completions) - 1)

    with pytest.raises(RewardError, match="'test_too_few' returned 3 values for 4 samples"):
        score([RewardSpec("test_too_few")], PROMPTS, COMPLETIONS)
    result = score([RewardSpec("test_too_few", on_error="zero")], PROMPTS, COMPLETIONS)
    assert result.values["test_too_few"] == [0.0] * 4 and result.errors["test_too_few"] == 4


def test_values_must_be_finite_numbers_or_none():
    @register_reward("test_nan_on_bb")
    def nan_on_bb(prompts, completions):
        return [float("nan") if c == "bb" else 1 for c in completions]

    with pytest.raises(RewardError, match=r"'test_nan_on_bb' returned nan for sample 1"):
        score([RewardSpec("test_nan_on_bb")], PROMPTS, COMPLETIONS)


def test_async_rewards_are_awaited_concurrently():
    running, overlap = [0], [0]

    async def slow(prompts, completions):
        running[0] += 1
        overlap[0] = max(overlap[0], running[0])
        await asyncio.sleep(0.4)
        running[0] -= 1
        return [1.0] * len(completions)

    register_reward("test_slow_a")(slow)
    register_reward("test_slow_b")(slow)
    start = time.monotonic()
    result = score(
        [RewardSpec("test_slow_a"), RewardSpec("test_slow_b"), RewardSpec("test_length")],
        PROMPTS,
        COMPLETIONS,
    )
    assert time.monotonic() - start < 0.75 and overlap[0] == 2
    assert result.totals == [3.0, 4.0, 5.0, 6.0]


def test_async_failures_name_the_sample_too():
    @register_reward("test_async_fails")
    async def async_fails(prompts, completions):
        if "dddd" in completions:
            raise KeyError("dddd")
        return [0.0] * len(completions)

    with pytest.raises(RewardError, match="'test_async_fails' failed on sample 3: KeyError"):
        score([RewardSpec("test_async_fails")], PROMPTS, COMPLETIONS)


def test_timeouts_reported_by_a_reward_are_counted():
    @register_reward("test_times_out")
    def times_out(prompts, completions):
        report_timeout(2)
        return [0.0] * len(completions)

    result = score([RewardSpec("test_times_out"), RewardSpec("test_length")], PROMPTS, COMPLETIONS)
    assert result.timeouts == {"test_times_out": 2, "test_length": 0}


def test_score_async_inside_an_event_loop():
    async def main():
        with pytest.raises(RuntimeError, match="await score_async"):
            score([RewardSpec("test_length")], PROMPTS, COMPLETIONS)
        return await score_async([RewardSpec("test_length")], PROMPTS, COMPLETIONS)

    assert asyncio.run(main()).totals == [1.0, 2.0, 3.0, 4.0]


def test_spec_validation():
    with pytest.raises(ValueError, match="on_error must be 'raise' or 'zero'"):
        RewardSpec("test_length", on_error="ignore")
    with pytest.raises(ValueError, match="rewards listed twice: test_length"):
        score([RewardSpec("test_length"), RewardSpec("test_length")], PROMPTS, COMPLETIONS)
